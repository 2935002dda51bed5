"""Lanes and admission through the real server on the shipped models: a heavy model queues
behind itself only, and work that cannot finish before its deadline is refused up front."""
from __future__ import annotations

import io
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from bench.limits import model_figures
from tests.serving import running_server
from tests.service.test_hostile import SHIPPED

pytestmark = pytest.mark.quiet_host  # admission here counts the cores other processes take (another worker's tests would refuse its requests)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(((np.random.default_rng(0).random((height, width)) > 0.5) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_dcgan_generate_answers_quickly_while_heavy_translates_occupy_their_own_lane():
    """Three clients keep cyclegan busy with 768² translates (about a second of compute each on
    one thread); DCGAN generates beside them wait for their own lane only. Before lanes they
    waited behind every translate (3.2 s p50)."""
    big = png(768, 768)
    with running_server(SHIPPED, models=["cyclegan-thin2thick", "dcgan-digits"]) as server, server.client(timeout=60) as client:
        stop = threading.Event()
        translated = []

        def keep_translating() -> None:
            with server.client(timeout=60) as own:
                while not stop.is_set():
                    translated.append(own.post("/v1/models/cyclegan-thin2thick/translate", content=big, headers={"content-type": "image/png"}).status_code)

        with ThreadPoolExecutor(3) as pool:
            for _ in range(3):
                pool.submit(keep_translating)
            time.sleep(1.5)  # the translate lane is saturated
            latencies = []
            for seed in range(20):
                started = time.perf_counter()
                assert client.post("/v1/models/dcgan-digits/generate", json={"seed": seed}).status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.05)
            stop.set()
    assert translated and set(translated) <= {200, 503}
    assert 200 in translated  # the translates really ran meanwhile
    assert statistics.median(latencies) < 0.25, latencies
    assert max(latencies) < 1.0, latencies


def test_a_burst_that_cannot_finish_before_its_deadline_is_refused_up_front_not_timed_out():
    """32 upscales at once against a 3-second deadline: the lane takes what it can finish in
    time; the rest get 503 with a Retry-After at once, and nobody waits 3 s for a 504."""
    small = png(32, 32)
    with running_server(SHIPPED, request_timeout_s=3, models=["sr-rrdb-x4"]) as server:
        def upscale(_) -> tuple[int, float, str | None]:
            with server.client(timeout=30) as client:
                started = time.perf_counter()
                response = client.post("/v1/models/sr-rrdb-x4/upscale", content=small, headers={"content-type": "image/png"})
                return response.status_code, time.perf_counter() - started, response.headers.get("retry-after")

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(upscale, range(32)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1
    refused = [(elapsed, retry) for status, elapsed, retry in results if status == 503]
    assert all(retry is not None and int(retry) >= 1 for _, retry in refused)
    assert max(elapsed for elapsed, _ in refused) < 1.5


def test_a_large_translate_is_estimated_at_no_less_than_what_it_takes():
    """Admission is only as good as the estimate: CycleGAN's cost per pixel grows with the input,
    and a fit between 64² and 128² put a 1024² translate at 0.44 s where it took 0.70 (2048²: 1.8
    against 3.9-4.4 s), so bursts of them were admitted past their deadline (a CI run's 504).
    Warmed up to 512² as well, the fit sees it."""
    with running_server(SHIPPED, intra_op_threads=2, models=["cyclegan-thin2thick"]) as server, server.client(timeout=60) as client:
        cost = client.get("/v1/models/cyclegan-thin2thick").json()["versions"][0]["costs"]["model"]
        estimated = cost["seconds_per_unit"] * 1024 * 1024 / cost["unit_pixels"] + cost["batch_overhead_seconds"]
        body = png(1024, 1024)
        computed = []
        for _ in range(3):
            response = client.post("/v1/models/cyclegan-thin2thick/translate", content=body, headers={"content-type": "image/png"})
            assert response.status_code == 200
            computed.append(float(response.headers["server-timing"].split("compute;dur=")[1].split(",")[0]) / 1000)
    assert cost["warmed_units"][-1] == (512 / 64) ** 2
    assert estimated >= 0.85 * statistics.median(computed), (estimated, computed)


def test_a_burst_to_two_models_sharing_the_cores_is_refused_up_front_not_timed_out():
    """Three 160² upscales and three 1024² translates at once against a 3-second deadline, each
    runtime on both cores. Each lane alone could finish its first two in time, but the lanes
    share the cores: judged lane by lane, an upscale and a translate were admitted beside each
    other and both waited the whole deadline for a 504. Counting the other lane's work beside
    each request, what cannot finish is refused at once."""
    small, large = png(160, 160), png(1024, 1024)
    with running_server(SHIPPED, request_timeout_s=3, intra_op_threads=2, models=["sr-rrdb-x4", "cyclegan-thin2thick"]) as server:
        # a warm-up slowed by something beside it once refused 160² here: then the idle re-measure
        # (after 30 s; not sooner, so that none runs during the burst) has to relax the limits first
        server.wait_for_side("sr-rrdb-x4", 160, timeout_s=90)
        server.wait_for_side("cyclegan-thin2thick", 1024, timeout_s=90)  # (a CI run's warm-up once advertised 1062²)

        def call(job: tuple[str, bytes]) -> tuple[str, int, float, str | None]:
            path, body = job
            with server.client(timeout=30) as client:
                started = time.perf_counter()
                response = client.post(f"/v1/models/{path}", content=body, headers={"content-type": "image/png"})
                return path, response.status_code, time.perf_counter() - started, response.headers.get("retry-after")

        with server.client(timeout=30) as client:  # alone first: no first runs below
            for path, body in (("sr-rrdb-x4/upscale", small), ("cyclegan-thin2thick/translate", large)):
                alone = client.post(f"/v1/models/{path}", content=body, headers={"content-type": "image/png"})
                assert alone.status_code == 200, (path, alone.text, client.get(f"/v1/models/{path.split('/')[0]}").json()["versions"][0]["limits"])
        time.sleep(1)
        jobs = [job for _ in range(3) for job in (("sr-rrdb-x4/upscale", small), ("cyclegan-thin2thick/translate", large))]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(call, jobs))
    statuses = [status for _, status, _, _ in results]
    assert set(statuses) <= {200, 503} and 200 in statuses, results
    refused = [(elapsed, retry) for _, status, elapsed, retry in results if status == 503]
    assert all(retry is not None and int(retry) >= 1 for _, retry in refused), results
    assert max(elapsed for elapsed, _ in refused) < 1.5, results


def streams_deadline(tile_s: float) -> float:
    """A deadline whose listed compute share (95 % of 80 % of it) a 224² upscale (9 tiles of
    `tile_s`) fills to about three quarters alone: beside the streams (about twice as long) it
    cannot fit, a 160² one (4 tiles) still does, and the model may run a third slower than its
    fit before a 224² is refused for that alone."""
    return round(max(2.0, 9 * tile_s / (0.8 * 0.95 * 0.75)), 2)


def settled_tile_s() -> float:
    """sr-rrdb-x4's seconds a tile on this machine now, as its idle re-measure times it (a
    fresh process's first runs, which warm-up times, can be 2-3x slow): a server of its own,
    timed again once idle (the warm-up's figure where that does not come within 60 s)."""
    with running_server(SHIPPED, intra_op_threads=2, remeasure_idle_s=0.5, models=["sr-rrdb-x4"]) as server:
        waited = time.monotonic() + 60
        while server.metric("ganserve_cost_remeasures_total") < 1 and time.monotonic() < waited:
            time.sleep(0.25)
        cost = model_figures(server.url, "sr-rrdb-x4")["cost"]
    return cost["seconds_per_unit"] * cost["observed_over_measured"]


def upscales_beside_translate_streams(server) -> tuple[list, list[int]]:
    """Four clients stream 128² translates; meanwhile 224² and 160² upscales go one at a time."""
    small = png(128, 128)
    with server.client(timeout=60) as client:
        def upscale(side: int):
            return client.post("/v1/models/sr-rrdb-x4/upscale", content=png(side, side), headers={"content-type": "image/png"})

        assert upscale(224).status_code == 200  # alone it fits its deadline
        stop, streamed = threading.Event(), []

        def stream() -> None:
            with server.client(timeout=60) as own:
                while not stop.is_set():
                    answer = own.post("/v1/models/cyclegan-thin2thick/translate", content=small, headers={"content-type": "image/png"})
                    streamed.append(answer.status_code)
                    if answer.status_code == 503:  # a client that waits out its Retry-After
                        time.sleep(float(answer.headers["retry-after"]))

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(stream)
            time.sleep(5)  # the stream's demand shows within the lanes' 4 s window
            answers = []
            for side in (224, 160, 224, 160, 224):
                answers.append((side, upscale(side)))
                time.sleep(0.5)
            stop.set()
    return answers, streamed


def test_a_request_beside_other_models_streams_of_small_requests_is_refused_up_front_not_timed_out():
    """A stream of small requests to another model leaves almost nothing queued at any moment,
    yet its lane computes the whole time a long request runs beside it (probed: a 640² image
    admitted at 13.3 s beside streams of StyleGAN and small translates ran 2.7x that and got 504).
    Here four clients stream 128² translates (each too small a push on a booked upscale to be
    refused for it) while 224² upscales (alone about three quarters of the compute the limits
    list for the deadline) and 160² ones (a third of it) are sent one at a time. Counted at the queued backlog alone, every 224² upscale was admitted, ran 3.8-4 s and
    was answered 504 after the whole deadline; counting the translate lane's steady demand, they
    are refused at once (they would take about twice as long), and the 160² ones are served,
    their Server-Timing `beside` showing what the streams were counted to add.

    The deadline is fitted to the tile time this machine shows now (`streams_deadline`), so the
    test asks the same question at any speed: a fixed one (4-4.5 s) listed 224² only on some
    machines and moments (two CI runs timed out waiting 90 s), and where it did, a 224² filling
    over 90 % of its share alone was refused for the model's own slowness after one slow run."""
    deadline = streams_deadline(settled_tile_s())
    with running_server(SHIPPED, request_timeout_s=deadline, intra_op_threads=2, models=["sr-rrdb-x4", "cyclegan-thin2thick"]) as server:
        server.wait_for_side("sr-rrdb-x4", 224, timeout_s=90)
        answers, streamed = upscales_beside_translate_streams(server)
    statuses = [(side, answer.status_code) for side, answer in answers]
    assert all(status in (200, 503) for _, status in statuses), statuses  # never a 504 after the whole deadline
    reasons = [answer.json()["error"]["message"] for side, answer in answers if side == 224 and answer.status_code == 503]
    assert len(reasons) == 3, statuses  # each refused up front, not admitted to miss its deadline
    # mostly for the streams; a test machine's own clients may be read as other processes first (a `make test` run)
    assert any("other models on the same device" in reason for reason in reasons), reasons
    # (or, on a slow moment of the machine, the model's own slowness lately: refused up front all the same)
    assert all("other models on the same device" in reason or "other processes want" in reason or "slower than measured lately" in reason
               for reason in reasons), reasons
    for side, answer in answers:
        if side == 224:
            assert int(answer.headers["retry-after"]) >= 1
        else:
            assert answer.status_code == 200, statuses
            assert "beside;dur=" in answer.headers["server-timing"]
    assert set(streamed) <= {200, 503} and 200 in streamed
