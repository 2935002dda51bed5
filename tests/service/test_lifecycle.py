"""Queue limits, deadlines, disconnects, readiness, load failures and graceful shutdown."""
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.server import wait_ready
from tests.serving import running_server


def test_a_request_beyond_the_queue_bound_is_refused_at_once_with_429_and_retry_after(repository):
    with running_server(repository, max_queue_size=4, max_batch_size=64, max_queue_delay_ms=1500, models=["digits"]) as server, server.client() as client:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.post, "/v1/models/digits/generate", json={"n": 3})  # sits out the queue delay
            time.sleep(0.5)
            started = time.monotonic()
            response = client.post("/v1/models/digits/generate", json={"n": 2})
            assert time.monotonic() - started < 1.0
            assert waiting.result().status_code == 200
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "queue_full"
        assert client.post("/v1/models/digits/generate", json={"n": 4}).status_code == 200  # within the bound still works
        assert server.metric("ganserve_rejected_total", model="digits", reason="queue_full") == 1


def test_a_request_larger_than_the_whole_queue_gets_a_permanent_413_not_a_429(repository):
    with running_server(repository, max_queue_size=4, models=["digits"]) as server, server.client() as client:
        response = client.post("/v1/models/digits/generate", json={"n": 8})
        assert response.status_code == 413 and "retry-after" not in response.headers
        assert "never fit" in response.json()["error"]["message"]


def test_a_burst_past_the_queue_bound_gets_some_429_and_every_accepted_request_an_image(repository):
    """32 clients, each on its own open connection, post at the same moment. Through one shared
    client the posts once trickled in under a full test suite and all 32 were served (no 429)."""
    with running_server(repository, max_queue_size=8, max_batch_size=4, max_queue_delay_ms=50, models=["digits"]) as server:
        together = threading.Barrier(32)

        def post(seed: int) -> int:
            with server.client() as client:
                client.get("/health/live")  # the connection is open before the burst
                together.wait(timeout=30)
                return client.post("/v1/models/digits/generate", json={"seed": seed, "n": 2}).status_code

        with ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(post, range(32)))
    assert set(statuses) <= {200, 429}
    assert 429 in statuses and 200 in statuses


def test_an_item_whose_deadline_passed_in_the_queue_gets_504_and_never_reaches_the_model(repository):
    with running_server(repository, request_timeout_s=0.1, max_queue_delay_ms=1000, max_batch_size=64, models=["digits"]) as server, server.client() as client:
        response = client.post("/v1/models/digits/generate", json={"seed": 1})
        assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
        time.sleep(1.2)  # the batcher wakes up and drops the expired item
        assert server.metric("ganserve_rejected_total", model="digits", reason="deadline") == 1
        assert server.metric("ganserve_batch_items_count", model="digits", operation="generate") == 0
        assert server.metric("ganserve_encoder_backlog_seconds") == 0.0  # an answer never encoded leaves the encoder pool's backlog too


def test_a_client_that_hangs_up_has_its_items_dropped_before_compute(repository):
    with running_server(repository, max_queue_delay_ms=800, max_batch_size=64, models=["digits"]) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/models/digits/generate", json={"seed": 1, "n": 3}, timeout=0.2)
        time.sleep(1.2)
        assert server.metric("ganserve_rejected_total", model="digits", reason="cancelled") == 3
        assert server.metric("ganserve_batch_items_count", model="digits", operation="generate") == 0
        assert server.metric("ganserve_encoder_backlog_seconds") == 0.0


def test_readiness_is_false_until_every_model_is_loaded_and_warmed(repository):
    with running_server(repository, wait=False, max_batch_size=2048) as server:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 200 not in seen:
            try:
                seen.append(httpx.get(f"{server.url}/health/ready", timeout=1).status_code)
            except httpx.TransportError:
                time.sleep(0.02)
        assert seen[0] == 503 and seen[-1] == 200
        assert httpx.get(f"{server.url}/health/live").status_code == 200
        states = httpx.get(f"{server.url}/health/ready").json()["models"]
        assert set(states.values()) == {"ready"}


def test_the_server_sends_onnx_runtime_no_telemetry_and_leaves_no_device_id(repository, tmp_path, monkeypatch):
    """ONNX Runtime's Linux wheels (1.29 on) write a device identifier and an event cache under the
    user's home at the first session and resolve Microsoft's event host every few seconds. A
    server started without ORT_DISABLE_TELEMETRY in its environment (as a user starts it) must
    do neither: the home it is given stays empty of them."""
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)  # (the test session's own conftest sets it)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    with running_server(repository, models=["digits"]) as server, server.client() as client:
        assert client.post("/v1/models/digits/generate", json={"seed": 3}).status_code == 200
        assert [m["runtime"] for m in client.get("/v1/models").json()["models"]] == ["onnx"]
    assert not (tmp_path / ".cache" / "Microsoft").exists()


def broken_repository(repository, root):
    """The test repository plus every way an entry can be broken."""
    repo = root / "repo"
    shutil.copytree(repository, repo)
    (repo / "cdigits" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")  # bad weights
    spec = json.loads((repo / "digits" / "1" / "spec.json").read_text())
    broken = {"not-json": "{not json", "empty": "{}", "a-list": "[1, 2]", "no-kind": json.dumps({k: v for k, v in spec.items() if k != "kind"}),
              "escapes": json.dumps(spec | {"formats": {"onnx": {"file": "../../digits/1/model.onnx"}}}),
              "bad-serving": json.dumps(spec | {"serving": {"max_batch_size": -3}})}
    upscaler = json.loads((repo / "upx4" / "1" / "spec.json").read_text())
    broken |= {"future-schema": json.dumps(spec | {"schema_version": 99}),
               "tiles-overlap": json.dumps(upscaler | {"serving": {"upscale_tile": 20, "upscale_overlap": 12}}),
               "tiles-off-multiple": json.dumps(upscaler | {"size_multiple": 8, "serving": {"upscale_tile": 20, "upscale_overlap": 4}})}
    broken["nested-deep"] = '{"a":' * 100_000 + "1" + "}" * 100_000  # once a 500 for the index and every load, and no start-up at all
    for name, text in broken.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "spec.json").write_text(text)
    (repo / "a-fifo" / "1").mkdir(parents=True)
    os.mkfifo(repo / "a-fifo" / "1" / "spec.json")  # once blocked the event loop in open()
    shutil.copytree(repo / "digits" / "1", repo / "digits" / "01")  # once listed as a second version 1
    return repo, ["cdigits", "a-fifo", *broken]


def test_broken_entries_fail_alone_with_a_reason_and_no_absolute_path(repository, tmp_path):
    repo, broken = broken_repository(repository, tmp_path)
    with running_server(repo, ready_requires="any") as server, server.client() as client:
        assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200
        listing = client.get("/v1/models")
        assert listing.status_code == 200
        models = {m["name"]: m for m in listing.json()["models"]}
        for name in broken:
            assert models[name]["state"] == "failed" and models[name]["error"], name
            assert str(tmp_path) not in models[name]["error"] and "/tmp" not in models[name]["error"], models[name]["error"]
            assert client.get(f"/v1/models/{name}").status_code == 200
            refused = client.post(f"/v1/models/{name}/generate", json={"seed": 1})
            assert refused.status_code == 503 and "failed" in refused.json()["error"]["message"]
            assert str(tmp_path) not in refused.text
        assert "spec.json" in models["not-json"]["error"] and "kind" in models["no-kind"]["error"]
        assert "newer ganserve" in models["future-schema"]["error"]
        assert "upscale_overlap" in models["tiles-overlap"]["error"] and "not a multiple" in models["tiles-off-multiple"]["error"]
        assert "nested too deeply" in models["nested-deep"]["error"] and "not a regular file" in models["a-fifo"]["error"]
        assert models["digits"]["state"] == "ready" and models["digits"]["versions"] == [1]
        index = client.post("/v2/repository/index")
        assert index.status_code == 200 and [row["version"] for row in index.json() if row["name"] == "digits"] == ["1"]


def test_readiness_is_503_while_a_model_it_requires_is_failed(repository, tmp_path):
    repo, _ = broken_repository(repository, tmp_path)
    cases = [("all", 503), ("any", 200), ("digits, styles", 200), ("digits,cdigits", 503)]
    with contextlib.ExitStack() as stack:  # the four servers start at once: each start is mostly waiting on imports
        servers = [stack.enter_context(running_server(repo, wait=False, ready_requires=requires)) for requires, _ in cases]
        for server, (requires, expected) in zip(servers, cases):
            server.wait_loaded(60)
            ready = httpx.get(f"{server.url}/health/ready")
            assert ready.status_code == expected, (requires, ready.json())
            assert ready.json()["models"]["cdigits/1"] == "failed"
            if expected == 503:  # a benchmark's wait for readiness gives up at once, naming what failed, not after 120 s
                with pytest.raises(RuntimeError, match="cannot become ready: .*cdigits/1.* failed to load"):
                    wait_ready(server.url, server.process, server.process.log_path, timeout=30)


def test_sigterm_cancels_queued_jobs_and_exits_within_the_deadline_plus_five_seconds(repository):
    with running_server(repository, request_timeout_s=3, max_projection_steps=100_000, max_job_seconds=1000, max_jobs=8, models=["styles"]) as server, server.client() as client:
        image = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(image, "PNG")
        jobs = [client.post("/v1/models/styles/project?steps=100000", content=image.getvalue(), headers={"content-type": "image/png"}) for _ in range(4)]
        assert [job.status_code for job in jobs] == [202] * 4
        time.sleep(0.5)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=30)
        assert time.monotonic() - started < 3 + 5


def test_sigterm_finishes_every_accepted_request_before_exiting(repository):
    with running_server(repository, max_queue_delay_ms=3000, max_batch_size=64, models=["digits"]) as server:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, f"{server.url}/v1/models/digits/generate", json={"seed": s}, timeout=30) for s in range(8)]
            # every request admitted and in the queue, waiting for the batch delay (a fixed 0.2 s
            # sleep let a loaded machine signal before the last client had connected)
            waited = time.monotonic()
            while server.metric("ganserve_requests_in_flight") < 8 and time.monotonic() - waited < 20:
                time.sleep(0.05)
            assert not any(f.done() for f in futures)
            server.process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 8
        # uvicorn re-raises the signal once it has shut down cleanly, as process managers expect
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)


def test_sigterm_answers_a_request_whose_body_is_still_arriving_503_at_once_instead_of_waiting_for_it(repository):
    """Such a request was never accepted. uvicorn's graceful shutdown waited for it to finish, so a
    client that sent the headers and part of the body held every shutdown (a rolling deploy,
    Kubernetes' 30 s grace) for the body timeout: 31.7 s measured, 1.6 s now."""
    with running_server(repository, models=["digits"], body_timeout_s=30) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as slow:
            slow.sendall(b"POST /v1/models/digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"seed\"")
            time.sleep(0.5)
            stopping = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            slow.settimeout(20)
            answer = b""
            while chunk := slow.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower(), answer
        assert json.loads(body)["error"]["code"] == "unavailable"
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert time.monotonic() - stopping < 10


def test_the_server_runs_on_the_torchscript_and_eager_runtimes_too(repository, server):
    """Their upscale tiles are kept as tensors where they were computed and blended there (on a
    GPU, on the device; here in torch on the CPU): the pixels of ONNX Runtime's NumPy blend. The
    eager server runs as one engine and two fronts (`--workers 2`), whose engine blends them."""
    from tests.service.test_image2image import encoded, npy, photo

    upload = {"content": encoded(photo(100, 150, seed=2)), "headers": {"content-type": "image/png"}, "params": {"format": "npy"}}
    with server.client() as client:
        reference = npy(client.post("/v1/models/upx4/upscale", **upload))  # onnx: 2 x 2 tiles at 16 px overlap, blended in NumPy
    for runtime, workers in (("torchscript", 1), ("eager", 2)):
        with running_server(repository, runtime=runtime, workers=workers, models=["digits", "cdigits", "upx4"]) as running, running.client() as client:
            assert client.get("/v1/models/digits").json()["versions"][0]["runtime"] == runtime
            assert client.post("/v1/models/cdigits/generate", json={"seed": 1, "class": 3}).status_code == 200
            upscaled = npy(client.post("/v1/models/upx4/upscale", **upload))
        assert upscaled.shape == reference.shape == (1, 400, 600, 3)
        assert np.abs(upscaled.astype(int) - reference).max() <= 1


def test_a_bad_setting_stops_serve_with_its_name_and_what_it_takes_not_a_traceback(repository):
    """An invalid GANSERVE_* value printed a page of traceback (GANSERVE_LOG_LEVEL was a free string
    that crashed logging's set-up)."""
    started = subprocess.run([sys.executable, "-m", "ganserve_cli", "serve", "--repository", str(repository), "--port", "1"],
                             capture_output=True, text=True, timeout=60,
                             env=os.environ | {"GANSERVE_LOG_LEVEL": "loud", "GANSERVE_MAX_CONNECTIONS": "abc"})
    assert started.returncode == 2 and "Traceback" not in started.stderr, started.stderr[-2000:]
    assert "GANSERVE_LOG_LEVEL" in started.stderr and "'warning'" in started.stderr and "GANSERVE_MAX_CONNECTIONS" in started.stderr


def test_a_model_name_the_repository_lacks_keeps_the_server_unready_and_names_it(repository):
    """A typo in GANSERVE_MODELS gave a server that served nothing and said it was ready (every
    model it had was): behind a load balancer, traffic went to a server without the model. The
    models it does hold are served; readiness is 503 and names what is missing."""
    with running_server(repository, wait=False, models=["digits", "nosuch"]) as server, server.client() as client:
        server.wait_loaded()
        readiness = client.get("/health/ready")
        assert readiness.status_code == 503 and readiness.json()["missing"] == ["nosuch"], readiness.text
        assert readiness.json()["models"] == {"digits/1": "ready"}
        assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200
        assert client.post("/v1/models/nosuch/generate", json={"seed": 1}).status_code == 404
        assert "nosuch" in server.process.log_path.read_text() and "does not serve" in server.process.log_path.read_text()
    with pytest.raises(RuntimeError, match="nosuch is not served"):  # a benchmark's start stops at once
        with running_server(repository, models=["nosuch"]):
            pass
    # GANSERVE_READY_REQUIRES as GANSERVE_MODELS is written (a JSON list was matched as one name:
    # unready for good), and a name in it that is not served named at once
    with running_server(repository, models=["digits", "cdigits"], ready_requires='["digits", "cdigits"]'):
        pass
    with pytest.raises(RuntimeError, match="digitz is not served"):
        with running_server(repository, models=["digits"], ready_requires="digits, digitz"):
            pass


def test_asking_for_cuda_where_there_is_none_stops_serve_with_one_line(repository):
    """ONNX models were served on the CPU without a word, and every torch model failed to load."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    started = subprocess.run([sys.executable, "-m", "ganserve_cli", "serve", "--repository", str(repository), "--port", "1"],
                             capture_output=True, text=True, timeout=60, env=os.environ | {"GANSERVE_DEVICE": "cuda"})
    assert started.returncode == 2 and "Traceback" not in started.stderr and "no CUDA device" in started.stderr, started.stderr[-2000:]


def test_a_misspelt_setting_is_named_with_the_one_it_looks_like():
    """GANSERVE_READY_REQUIRE (no s) was ignored without a word: readiness stayed `all`."""
    from service.cli import unknown_settings

    lines = unknown_settings({"GANSERVE_READY_REQUIRE": "any", "GANSERVE_PORT": "1", "GANSERVE_RAY_BODY_BUDGET_BYTES": "1", "GANSERVE_ZZZ": "1"})
    assert lines == ["GANSERVE_READY_REQUIRE is no setting, and is ignored (did you mean GANSERVE_READY_REQUIRES?)",
                     "GANSERVE_ZZZ is no setting, and is ignored"]


def test_model_name_lists_are_read_as_people_write_them_a_name_commas_or_json(monkeypatch):
    """`GANSERVE_MODELS=dcgan-digits` (one name, as one writes it) stopped start-up with a page of
    pydantic-settings traceback: lists were read as JSON only."""
    from service.settings import Settings

    for text, names in (("digits", ["digits"]), ("digits, cdigits", ["digits", "cdigits"]), ('["digits", "cdigits"]', ["digits", "cdigits"]), ("", [])):
        monkeypatch.setenv("GANSERVE_MODELS", text)
        monkeypatch.setenv("GANSERVE_MODEL_CONTROL_HOSTS", text)
        monkeypatch.setenv("GANSERVE_ALLOWED_HOSTS", text)
        settings = Settings()
        assert settings.models == settings.model_control_hosts == settings.allowed_hosts == names, text
    for text, rule, names in (("ALL", "all", []), (" any ", "any", []), ("", "all", []), ('["a", "b"]', "a,b", ["a", "b"]), ("a, b", "a,b", ["a", "b"])):
        monkeypatch.setenv("GANSERVE_READY_REQUIRES", text)
        assert (Settings().ready_requires, Settings().ready_names) == (rule, names), text
    monkeypatch.setenv("GANSERVE_MEMORY_BUDGET", "2GiB")  # byte sizes as README writes them (refused: "not a valid integer")
    monkeypatch.setenv("GANSERVE_MAX_BODY_BYTES", "8 MiB")
    assert (Settings().memory_budget, Settings().max_body_bytes) == (2 * 1024**3, 8 * 1024**2)


@pytest.mark.parametrize("setting, value", [("GANSERVE_MODELS", '["digits"'), ("GANSERVE_VERSION_POLICIES", "digits=latest:1")])
def test_a_setting_that_is_not_the_json_it_must_be_stops_serve_with_its_name_not_a_traceback(repository, setting, value):
    started = subprocess.run([sys.executable, "-m", "ganserve_cli", "serve", "--repository", str(repository), "--port", "1"],
                             capture_output=True, text=True, timeout=60, env=os.environ | {setting: value})
    assert started.returncode == 2 and "Traceback" not in started.stderr and "─" not in started.stderr, started.stderr[-2000:]
    assert setting.removeprefix("GANSERVE_").lower() in started.stderr.lower(), started.stderr


def test_a_lane_counts_how_long_its_serving_job_has_run_but_not_a_load():
    """`Lane.running_for` is what liveness reads: a job still running (here one blocked for good
    until released, as a wedged runtime is) counts up; a load (warm-up may compile for minutes)
    does not; an ended one is forgotten."""
    import asyncio

    from service.lanes import Lane

    async def scenario() -> tuple[float, float, float, float]:
        lane = Lane("wedged", threads=1)
        released = threading.Event()
        loading = lane.run(released.wait, 5, watched=False)
        await asyncio.sleep(0.3)
        while_loading = lane.running_for()
        released.set()
        await loading
        released.clear()
        serving = lane.run(released.wait, 5)
        await asyncio.sleep(0.3)
        early = lane.running_for()
        await asyncio.sleep(0.3)
        later = lane.running_for()
        released.set()
        await serving
        lane.shutdown()
        return while_loading, early, later, lane.running_for()

    while_loading, early, later, ended = asyncio.run(scenario())
    assert while_loading == 0.0 and ended == 0.0
    assert 0.25 <= early < later and later >= 0.55


@pytest.mark.parametrize("settings", [{}, {"workers": 2}], ids=["one process", "engine and two fronts"])
def test_a_batch_running_past_the_stuck_limit_makes_the_server_not_live_and_refuses_its_model_at_once(settings):
    """A lane wedged in one batch (a hung driver or runtime) is only freed by a restart: liveness
    must say so, or an orchestrator keeps a server whose model answers every request 504 at its
    deadline. Here the limit is set below one real batch (an upscale of ~2.5 s in one batch), so
    the stuck state is seen, and seen to end (and a load, longer than the limit, is not taken for
    it): meanwhile /health/live and /health/ready are 503 naming the lane, a request to that model is refused at once, another model still serves,
    and an unload answers at once (it waited for the wedged batch) while the version stays counted;
    once the batch ends all is as before (the slow upscale itself was answered, and the model loads again)."""
    from bench.limits import model_figures
    from tests.service.test_host_load import upscale_of_about
    from tests.service.test_hostile import SHIPPED
    from tests.service.test_isolation import png

    with running_server(SHIPPED, wait=False, stuck_compute_s=0.5, model_control=True,
                        max_batch_seconds=4, intra_op_threads=2, remeasure_idle_s=600, **settings) as server, server.client(timeout=60) as client:
        loading = []  # a load (the shipped models: 7-10 s) is not a stuck batch: under `--workers` the engine answers no snapshot
        deadline = time.monotonic() + 120  # while it loads, and a front took that for an engine silent past the limit
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                loading.append(client.get("/health/live", timeout=2).status_code)
                if client.get("/health/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        assert loading and set(loading) == {200}, loading
        assert client.get("/health/live").json() == {"live": True}
        width, height = upscale_of_about(3.5, model_figures(server.url, "sr-rrdb-x4"))
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(client.post, "/v1/models/sr-rrdb-x4/upscale?format=jpeg", content=png(width, height), headers={"content-type": "image/png"})
            deadline = time.monotonic() + 10
            while (live := client.get("/health/live")).status_code == 200 and time.monotonic() < deadline and not slow.done():
                time.sleep(0.05)
            ready = client.get("/health/ready")
            started = time.monotonic()
            refused = client.post("/v1/models/sr-rrdb-x4/upscale", content=png(64, 64), headers={"content-type": "image/png"})
            refused_in = time.monotonic() - started
            other = client.post("/v1/models/dcgan-digits/generate", json={"seed": 1})
            longest = server.metric("ganserve_longest_running_batch_seconds")
            started = time.monotonic()
            unloaded = client.post("/v2/repository/models/sr-rrdb-x4/unload")  # it waited for the wedged batch, holding the repository lock
            unloaded_in, batch_ran_on = time.monotonic() - started, not slow.done()
            live_after_unload = client.get("/health/live")
            upscaled = slow.result()
        assert live.status_code == 503, (width, height, live.text)
        assert list(live.json()["stuck"]) == ["sr-rrdb-x4/1"] and live.json()["stuck_after_s"] == 0.5
        assert ready.status_code == 503 and list(ready.json()["stuck"]) == ["sr-rrdb-x4/1"]
        assert refused.status_code == 503 and "stuck" in refused.json()["error"]["message"] and "retry-after" in refused.headers
        assert refused_in < 1.0
        assert other.status_code == 200
        assert longest > 0.5
        assert unloaded.status_code == 200 and batch_ran_on and unloaded_in < 1.5, (unloaded.text, unloaded_in)
        assert live_after_unload.status_code == 503 and list(live_after_unload.json()["stuck"]) == ["sr-rrdb-x4/1"]
        assert upscaled.status_code == 200  # accepted before the unload: still answered
        deadline = time.monotonic() + 5
        while client.get("/health/live").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/health/live").json() == {"live": True}
        assert client.post("/v2/repository/models/sr-rrdb-x4/load").status_code == 200 and client.get("/health/ready").status_code == 200
        assert client.post("/v1/models/sr-rrdb-x4/upscale", content=png(64, 64), headers={"content-type": "image/png"}).status_code == 200


def test_a_version_retired_while_its_lane_is_stuck_is_still_counted_and_the_limit_grows_with_lane_threads(tmp_path):
    """A reload or unload takes a version out of the served ones before it finishes its accepted
    batch: a version whose lane was stuck left them, and the server said live again while the
    wedged thread was still there (a review). The unload no longer waits for the wedged batch
    (it held `repository_lock`, so every later load, unload and poll hung): it returns, the
    version stays counted, and it is released in the background once the batch ends. And with
    the default limit, a lane of several threads may be given one request of several times the
    deadline's compute (one item runs on one thread): its limit is that many times longer."""
    import asyncio
    from types import SimpleNamespace

    from service.lanes import Lane
    from service.metrics import ServiceMetrics
    from service.registry import ModelRegistry
    from service.settings import Settings

    async def scenario() -> tuple[dict, dict, float, float]:
        registry = ModelRegistry(Settings(repository=tmp_path, request_timeout_s=0.05), ServiceMetrics())
        wedged, released = Lane("wedged/1", threads=1), threading.Event()
        model = SimpleNamespace(entry=SimpleNamespace(label="wedged/1", name="wedged", version=1, spec={}), lane=wedged,
                                config=SimpleNamespace(lane_threads=1), batchers={}, state="ready", runtimes={}, runtime=None, probes={},
                                costs={}, served_precision="fp32")
        running = wedged.run(released.wait, 5)
        await asyncio.sleep(0.3)  # past 4 x 0.05 s
        model.config.lane_threads = 2  # the same batch on a lane of two threads: 0.4 s before it is stuck
        with_two_threads = registry.stuck_lanes()
        model.config.lane_threads = 1
        registry.stop_serving(model, "unloaded")
        await asyncio.wait_for(registry.release_retired(model), timeout=1.0)  # it does not wait for the batch
        while_retiring = registry.stuck_lanes()
        held_while_wedged = model.runtimes is not None and not wedged.ended()
        released.set()
        await running
        await asyncio.wait_for(asyncio.gather(*registry.releasing), timeout=2.0)
        released_after = (registry.retiring, model.runtimes, model.runtime, wedged.ended())
        return while_retiring, with_two_threads, held_while_wedged, released_after, registry.settings.stuck_after_s, registry.stuck_limit_s(model)

    while_retiring, with_two_threads, held_while_wedged, released_after, limit, one_thread_limit = asyncio.run(scenario())
    assert list(while_retiring) == ["wedged/1"] and held_while_wedged
    assert with_two_threads == {} and 2 * one_thread_limit == 2 * limit == 0.4
    assert released_after == ([], {}, None, True)


def test_a_graceful_stop_does_not_wait_for_a_stuck_lane(tmp_path):
    """`drain` joined every lane's threads: with one wedged in a batch, a graceful stop waited
    until it was killed. Now it finishes the other models' work and returns; the wedged thread
    is a daemon and goes with the process."""
    import asyncio
    from types import SimpleNamespace

    from service.lanes import Lane
    from service.metrics import ServiceMetrics
    from service.registry import ModelRegistry
    from service.settings import Settings

    async def scenario() -> tuple[bool, bool, bool]:
        registry = ModelRegistry(Settings(repository=tmp_path, request_timeout_s=0.05), ServiceMetrics())
        wedged, healthy, released = Lane("wedged/1", threads=1), Lane("healthy/1", threads=1), threading.Event()
        for name, lane in (("wedged", wedged), ("healthy", healthy)):
            registry.models[name] = {1: SimpleNamespace(entry=SimpleNamespace(label=f"{name}/1"), lane=lane, config=SimpleNamespace(lane_threads=1),
                                                        batchers={}, state="ready", runtimes={}, runtime=None, probes={})}
        wedged.run(released.wait, 5)
        finishing = healthy.run(time.sleep, 0.3)  # accepted work on a healthy lane is still finished
        await asyncio.sleep(0.3)
        await asyncio.wait_for(registry.drain(), timeout=2.0)
        outcome = finishing.done(), healthy.ended(), wedged.ended()
        released.set()
        return outcome

    healthy_finished, healthy_ended, wedged_ended = asyncio.run(scenario())
    assert healthy_finished and healthy_ended and not wedged_ended
