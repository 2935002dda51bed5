"""The model-repository extension through `tritonclient`: the index lists what is on disk and its
state, unload takes a model out of service (readiness and inference follow), load brings it back
and picks up a version added on disk while serving, a broken model cannot be loaded, and a new
version swapped in under load fails no request."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as tritonhttp
from tritonclient.utils import InferenceServerException

from bench.server import process_roles
from service.operations import latent_for_seed
from tests.serving import REPO, running_server
from models.zoo import build_generator
from training.checkpoint import save_checkpoint
from training.config import TrainConfig, load_config
from training.data import load_dataset
from training.export import export_run
from training.loop import spec_for, train


def z_input() -> tritonhttp.InferInput:
    tensor = tritonhttp.InferInput("z", [1, 64], "FP32")
    tensor.set_data_from_numpy(latent_for_seed(1, 64)[None], binary_data=True)
    return tensor


@pytest.fixture
def own_repository(repository, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy)
    return copy


def test_unload_load_and_a_new_version_through_the_standard_client(own_repository):
    with running_server(own_repository, ready_requires="all", model_control=True) as server:
        triton = tritonhttp.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120)
        index = {row["name"]: row for row in triton.get_model_repository_index()}
        assert index["digits"]["state"] == "READY" and index["digits"]["version"] == "1"
        before = triton.infer("digits", [z_input()]).as_numpy("image")

        triton.unload_model("digits")
        assert not triton.is_model_ready("digits") and triton.is_server_ready()  # an unloaded model is not required
        with pytest.raises(InferenceServerException, match="unloaded"):
            triton.infer("digits", [z_input()])
        unloaded = {row["name"]: row for row in triton.get_model_repository_index()}["digits"]
        assert unloaded["state"] == "UNAVAILABLE" and unloaded["reason"] == "unloaded"
        for overrides in ({"config": '{"max_batch_size": 4}'}, {"files": {"file:1/model.onnx": b"weights"}}):
            with pytest.raises(InferenceServerException, match="on disk"):  # once answered 200 and ignored
                triton.load_model("digits", **overrides)
        assert not triton.is_model_ready("digits")
        assert triton.is_model_ready("cdigits")  # the others are untouched

        shutil.copytree(own_repository / "digits" / "1", own_repository / "digits" / "2")  # a new version arrives on disk
        triton.load_model("digits")
        assert triton.is_model_ready("digits") and triton.is_model_ready("digits", "2")
        assert triton.get_model_metadata("digits")["versions"] == ["1", "2"]
        after = triton.infer("digits", [z_input()], model_version="2").as_numpy("image")
        assert np.array_equal(before, after)  # the same weights under the new version
        with pytest.raises(InferenceServerException, match="no model 'nope'"):
            triton.load_model("nope")

        (own_repository / "digits" / "1" / "model.onnx").write_bytes(b"broken")
        (own_repository / "digits" / "2" / "model.onnx").write_bytes(b"broken")
        with pytest.raises(InferenceServerException, match="could not be loaded"):
            triton.load_model("digits")
        # a reload that fails never takes down what it would have replaced (it took the served
        # versions, and the server's readiness, down with it)
        assert triton.is_server_ready() and triton.is_model_ready("digits", "2")
        assert np.array_equal(triton.infer("digits", [z_input()], model_version="2").as_numpy("image"), before)
        reason = {row["version"]: row for row in triton.get_model_repository_index() if row["name"] == "digits"}["2"]
        assert reason["state"] == "READY" and "the reload failed" in reason["reason"]
        triton.close()


def test_a_load_that_would_fill_the_memory_budget_fails_and_the_served_version_stays(repository, tmp_path):
    """A version ~100 MB larger arrives on disk under a budget with ~48 MiB to spare: `load` answers
    422 naming the budget, and the served version, the pixels and readiness stay. It answered 200,
    and the server went unready, every request 413, until an operator noticed. A load that fits
    still loads."""
    cfg = load_config(REPO / "configs" / "dcgan-digits.yaml").model_dump()
    cfg["model"].update(width=384)  # ~25 M parameters: ~100 MB of float32 weights
    cfg = TrainConfig.model_validate(cfg)
    spec = spec_for(cfg, load_dataset(cfg.data)[0])
    wide = build_generator(spec)  # untrained: its size is what matters (training it took 13 s)
    save_checkpoint(tmp_path / "wide" / "checkpoints" / "last.safetensors", {"G_ema": wide}, {}, torch.Generator(),
                    {"spec": spec.to_dict(), "config": cfg.model_dump()})
    staged = export_run(tmp_path / "wide", "digits", 2, tmp_path / "staged", ["onnx"], "last")
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits" / "1", repo / "digits" / "1")
    settings = {"model_control": True, "max_batch_size": 4}

    with running_server(repo, memory_budget=4 * 2**30, **settings) as server:  # what the served model holds resident here
        resident = 4 * 2**30 - server.metric("ganserve_memory_budget_bytes")
    with running_server(repo, memory_budget=int(resident) + 48 * 2**20, **settings) as server, server.client(timeout=120) as client:
        before = client.post("/v1/models/digits/generate", json={"seed": 3, "format": "npy"})
        assert before.status_code == 200
        shutil.copytree(staged, repo / "digits" / "2")
        refused = client.post("/v2/repository/models/digits/load")
        assert refused.status_code == 422 and "GANSERVE_MEMORY_BUDGET" in refused.json()["error"], refused.text
        assert client.get("/health/ready").status_code == 200 and server.metric("ganserve_memory_budget_bytes") > 0
        again = client.post("/v1/models/digits/generate", json={"seed": 3, "format": "npy"})
        assert again.status_code == 200 and again.content == before.content and again.headers["x-model-version"] == "1"
        index = {row["version"]: row for row in client.post("/v2/repository/index").json() if row["name"] == "digits"}
        assert index["1"]["state"] == "READY" and "the reload failed" in index["1"]["reason"]
        assert index["2"]["state"] == "UNAVAILABLE" and "GANSERVE_MEMORY_BUDGET" in index["2"]["reason"]

        shutil.rmtree(repo / "digits" / "2")
        shutil.copytree(repo / "digits" / "1", repo / "digits" / "3")  # a version of the same size fits
        loaded = client.post("/v2/repository/models/digits/load")
        assert loaded.status_code == 200 and loaded.json()["versions"] == {"1": "ready", "3": "ready"}, loaded.text
        assert client.get("/health/ready").status_code == 200


def test_a_new_version_swapped_in_under_load_fails_no_request(own_repository, tmp_path):
    """Four clients generate the same seed in a loop while version 2 (other weights) arrives on disk
    and is loaded: every request succeeds, and each client's answers switch from v1's image to
    v2's at one point."""
    cfg = load_config(REPO / "configs" / "dcgan-digits.yaml").model_dump()
    cfg.update(max_steps=2, sample_every=2, checkpoint_every=2, batch_size=8, seed=7)
    cfg["eval"].update(every=2, num_samples=50)
    cfg["model"].update(width=8)
    train(TrainConfig.model_validate(cfg), tmp_path / "run2", show_progress=False)
    staged = export_run(tmp_path / "run2", "digits", 2, tmp_path / "staged", ["onnx"], "last")

    with running_server(own_repository, max_queue_delay_ms=2, model_control=True) as server:
        answers: dict[int, list[bytes]] = {client: [] for client in range(4)}
        statuses: list[int] = []
        stop = threading.Event()

        def generate_loop(client_id: int) -> None:
            with server.client() as client:
                while not stop.is_set():
                    response = client.post("/v1/models/digits/generate", json={"seed": 1, "format": "npy"})
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        answers[client_id].append(response.content)

        threads = [threading.Thread(target=generate_loop, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and min(len(a) for a in answers.values()) < 5:
                time.sleep(0.1)
            shutil.copytree(staged, own_repository / "digits" / "2")
            with server.client(timeout=120) as client:
                assert client.post("/v2/repository/models/digits/load").status_code == 200
            time.sleep(3)  # traffic goes on against the new version
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    first = answers[0][0]
    for sequence in answers.values():
        switched = [answer != first for answer in sequence]
        assert switched[0] is False and switched[-1] is True  # v1 before, v2 after
        assert switched == sorted(switched)  # one switch, never back



def test_an_unload_while_uploads_decode_answers_them_503_never_500(own_repository):
    """An upload admitted just before its model is unloaded is still decoding when the unload
    lands; it must get the API's 503 (retry) or, if it made it into the queue, its image: once
    it was a 500 (the unloaded model's runtimes were gone when the request asked for its queue)."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (768, 768, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")  # noise: tens of ms to decode
    upload = buffer.getvalue()
    answers = []
    with running_server(own_repository, model_control=True) as server, server.client(timeout=120) as control:
        for delay_s in (0.01, 0.02, 0.03, 0.045):
            request = threading.Thread(target=lambda: answers.append(
                httpx.post(f"{server.url}/v1/models/gray/translate", content=upload, headers={"content-type": "image/png"}, timeout=120)))
            request.start()
            time.sleep(delay_s)
            assert control.post("/v2/repository/models/gray/unload").status_code == 200
            request.join()
            assert control.post("/v2/repository/models/gray/load").status_code == 200
    assert {a.status_code for a in answers} <= {200, 503}, [(a.status_code, a.text[:200]) for a in answers]
    for refused in (a for a in answers if a.status_code == 503):
        assert "gray" in refused.json()["error"]["message"] and refused.headers["retry-after"]

@pytest.mark.parametrize("unloaded_first", [False, True], ids=["reload", "unload then load"])
def test_a_reload_of_the_same_network_under_a_busy_machine_keeps_the_limits_it_served_with(repository, unloaded_first):
    """A reload warms while the machine is busy (here, busy loops on every core; in a probe, the
    traffic the replaced version still served): it timed upx4's tiles slow and tightened its
    limits, so an upscale served a moment before got 413. The same network served the same way
    keeps the faster of the two fits — also when it was unloaded first (a load right after an
    unload warmed beside the batch the unloaded version still computed, and kept nothing)."""
    from bench.limits import start_loops, stop
    from tests.service.test_remeasure import upx4_costs

    with running_server(repository, models=["upx4"], model_control=True, remeasure_idle_s=0) as server, server.client(timeout=120) as client:
        limits, cost = upx4_costs(client)
        if unloaded_first:
            assert client.post("/v2/repository/models/upx4/unload").status_code == 200
        loops = start_loops(3 * (os.cpu_count() or 1))
        try:
            assert client.post("/v2/repository/models/upx4/load").status_code == 200
        finally:
            stop(loops)
        reloaded_limits, reloaded_cost = upx4_costs(client)
    assert reloaded_cost["seconds_per_unit"] <= cost["seconds_per_unit"], (cost, reloaded_cost)
    assert reloaded_limits["max_input_side"] >= limits["max_input_side"], (limits, reloaded_limits)


def test_a_reload_beside_held_answers_neither_shrinks_the_budget_for_good_nor_stretches_it(repository):
    """A load or unload reads what the process holds resident; beside admitted work it read that
    work's memory too, and the budget left for requests stayed short by it until the next load (a
    hostile probe: 1,486 → 1,029 MiB after a reload beside one 272² upscale, and the same upscale
    413 on the idle server). Here eight unread answers of ~8 MB each are held while digits
    reloads: the budget is never above its idle figure (taking RSS less every reservation once
    admitted past the budget under steady traffic), and is back within less than half of what
    they held (what serving left resident, ~10 MiB) once they are gone."""
    from tests.service.test_intake import stalled_answer

    with running_server(repository, send_timeout_s=60, model_control=True, models=["upx4", "digits"]) as server:
        budget = lambda: server.metric("ganserve_memory_budget_bytes")  # noqa: E731
        reserved = lambda: server.metric("ganserve_memory_reserved_bytes")  # noqa: E731
        answered = lambda: server.metric("ganserve_requests_total", model="upx4", operation="infer", status="200")  # noqa: E731
        idle_budget, idle_reserved = budget(), reserved()
        stalled = [stalled_answer(server, side=96, batch=2) for _ in range(8)]  # tiles: the arena stays as warm-up left it
        try:
            assert wait_for(lambda: answered() == 8)
            held = reserved() - idle_reserved
            assert held > 8 * 6e6, f"{held:.0f} bytes held"
            with server.client(timeout=120) as client:
                assert client.post("/v2/repository/models/digits/load").status_code == 200
            after_reload = budget()
        finally:
            for sock in stalled:
                sock.close()
        assert after_reload <= idle_budget + 8 * 2**20, f"{(after_reload - idle_budget) / 2**20:.0f} MiB over the idle budget"
        assert wait_for(lambda: reserved() <= idle_reserved, 30)
        short = lambda: f"{(idle_budget - budget()) / 2**20:.0f} MiB short of the idle budget after {held / 2**20:.0f} MiB held"  # noqa: E731
        assert wait_for(lambda: budget() >= idle_budget - held / 2, 10), short()  # read again at rest (every second)


def wait_for(check, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_polling_picks_up_versions_added_and_removed_on_disk(own_repository):
    with running_server(own_repository, repository_poll_s=0.5, ready_requires="any") as server, server.client() as client:
        def versions(name: str) -> list[str] | None:
            response = client.get(f"/v2/models/{name}")
            return response.json()["versions"] if response.status_code == 200 else None

        assert versions("digits") == ["1"]
        shutil.copytree(own_repository / "digits" / "1", own_repository / "digits" / "2")
        assert wait_for(lambda: versions("digits") == ["1", "2"])
        assert client.get("/v2/models/digits/versions/2/ready").status_code == 200
        shutil.rmtree(own_repository / "digits" / "2")
        assert wait_for(lambda: versions("digits") == ["1"])
        shutil.rmtree(own_repository / "cdigits")
        assert wait_for(lambda: client.get("/v2/models/cdigits/ready").status_code == 503)
        assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200


def test_polling_loads_a_version_whose_files_arrive_after_its_spec(own_repository):
    """A copy that writes spec.json first, and the model's files a while later: the version was
    picked up half-copied and stayed `failed` for good (only spec.json was watched), holding the
    server unready under GANSERVE_READY_REQUIRES=all."""
    with running_server(own_repository, repository_poll_s=0.3, ready_requires="all") as server, server.client() as client:
        target = own_repository / "digits" / "2"
        target.mkdir()
        shutil.copy(own_repository / "digits" / "1" / "spec.json", target / "spec.json")
        time.sleep(1.5)  # a few polls see the version without its graph
        for source in (own_repository / "digits" / "1").iterdir():
            if source.name != "spec.json":
                shutil.copy(source, target / source.name)
        assert wait_for(lambda: client.get("/v2/models/digits/versions/2/ready").status_code == 200, 60)
        assert client.get("/health/ready").status_code == 200
        assert client.post("/v1/models/digits/generate", json={"seed": 1, "version": 2}).status_code == 200


@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "engine and two fronts"])
def test_a_version_retired_by_a_reload_takes_its_metric_series_with_it(own_repository, workers):
    """Each version served added ~230 series (operations × statuses × buckets) that stayed after it
    was retired: 2,225 after nine versions under `latest:1` (under `--workers` too, whose
    multiprocess files cannot drop a series: the scrape leaves them out). And what a load or
    unload changes reaches every front at once (the others answered 503 until their next
    snapshot), and loads fired in a loop wait in a bounded line (429 past it)."""
    with running_server(own_repository, version_policy="latest:1", model_control=True, models=["digits"], workers=workers,
                        model_control_hosts=["ganserve.internal"]) as server, server.client() as client:
        def series(version: str) -> int:
            return sum('model="digits"' in line and f'version="{version}"' in line for line in client.get("/metrics").text.splitlines())

        assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200
        assert client.post("/v1/models/digits/generate", json={"n": 300}).status_code == 422
        assert series("1") > 20
        shutil.copytree(own_repository / "digits" / "1", own_repository / "digits" / "2")
        assert client.post("/v2/repository/models/digits/load").status_code == 200
        assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200
        assert series("1") == 0 and series("2") > 20
        assert client.post("/v2/repository/models/digits/load").status_code == 200  # a reload of the served version keeps its series
        assert series("2") > 20
        # a load's configuration is refused in both modes (under --workers the front passed no body on, and it was ignored)
        overridden = client.post("/v2/repository/models/digits/load", json={"parameters": {"config": '{"max_batch_size": 4}'}})
        assert overridden.status_code == 422 and "on disk" in overridden.json()["error"], overridden.text
        # the index's `ready` field: only the ready entries (it was ignored)
        ready_only = client.post("/v2/repository/index", json={"ready": True}).json()
        assert {(row["name"], row["version"]) for row in ready_only} == {("digits", "2")}
        rows = {(row["name"], row["version"]): row for row in client.post("/v2/repository/index").json()}
        assert rows[("digits", "1")]["reason"] == "excluded by the version policy" and rows[("upx4", "1")]["reason"] == "not in GANSERVE_MODELS"
        assert client.post("/v2/repository/index", json={"ready": "yes"}).status_code == 422
        # a misspelt field was ignored (every entry listed), and an oversized body was 422, not 413
        assert client.post("/v2/repository/index", json={"redy": True}).status_code == 422
        assert client.post("/v2/repository/index", json={"ready": True, "x": "a" * 100_000}).status_code == 413
        assert client.post("/v2/repository/models/digits/load", json={"parameters": []}).status_code == 422  # (once taken as none)
        twice = client.post("/v2/repository/index", content=b'{"ready": true, "ready": false}', headers={"content-type": "application/json"})
        assert twice.status_code == 422 and "'ready' more than once" in twice.json()["error"], twice.text  # (as v1's bodies; the last was taken)
        # a body declared as another format is 415 before it is read (a JSON object sent as image/png was taken)
        as_image = client.post("/v2/repository/index", content=b'{"ready": true}', headers={"content-type": "image/png"})
        assert as_image.status_code == 415 and "JSON object" in as_image.json()["error"], as_image.text
        as_form = client.post("/v2/repository/models/digits/load", content=b"{}", headers={"content-type": "multipart/form-data; boundary=x"})
        assert as_form.status_code == 415, as_form.text
        curl_d = client.post("/v2/repository/index", content=b'{"ready": true}', headers={"content-type": "application/x-www-form-urlencoded"})
        assert curl_d.status_code == 200 and len(curl_d.json()) == 1  # (what `curl -d` labels it)
        # (and in both modes, model control refuses what a browser posts from another site's page)
        cross_site = client.post("/v2/repository/models/digits/unload", headers={"Origin": "http://elsewhere.example"})
        assert cross_site.status_code == 403 and "another site" in cross_site.json()["error"]
        assert client.get("/v2/models/digits/ready").status_code == 200
        same_site = client.post("/v2/repository/models/digits/load", headers={"Origin": server.url})
        assert same_site.status_code == 200, same_site.text
        # DNS rebinding: a page on an attacker's name, re-pointed at this server, is same-site to itself
        port = server.url.rsplit(":", 1)[1]
        rebound = client.post("/v2/repository/models/digits/unload", headers={"Host": f"rebound.example:{port}", "Origin": f"http://rebound.example:{port}"})
        assert rebound.status_code == 403 and "GANSERVE_MODEL_CONTROL_HOSTS" in rebound.json()["error"], rebound.text
        for host in (f"localhost:{port}", f"ganserve.internal:{port}", "[::1]"):  # what the server is known by
            assert client.post("/v2/repository/models/digits/load", headers={"Host": host}).status_code == 200, host

        def fresh_connections_generate() -> list[int]:  # (under --workers the kernel spreads them over both fronts)
            return [httpx.post(f"{server.url}/v1/models/digits/generate", json={"seed": 1}).status_code for _ in range(16)]

        assert client.post("/v2/repository/models/digits/unload").status_code == 200
        assert set(fresh_connections_generate()) == {503}
        assert client.post("/v2/repository/models/digits/load").status_code == 200
        assert set(fresh_connections_generate()) == {200}
        # a flood of model control: one runs, 15 more may wait their turn, the rest are refused at once. The
        # server is stopped while they are sent, so that they arrive together (a digits load takes ~0.1 s)
        processes = list(process_roles(server.process.pid))
        with ThreadPoolExecutor(41) as pool:
            for pid in processes:
                os.kill(pid, signal.SIGSTOP)
            try:
                flood = [pool.submit(client_post, f"{server.url}/v2/repository/models/digits/load")]
                time.sleep(0.1)
                flood += [pool.submit(client_post, f"{server.url}/v2/repository/models/digits/unload") for _ in range(40)]
                time.sleep(0.5)
            finally:
                for pid in processes:
                    os.kill(pid, signal.SIGCONT)
            answers = [future.result() for future in flood]
        statuses = [answer.status_code for answer in answers]
        assert set(statuses) == {200, 429} and statuses.count(429) >= 10, statuses
        assert all(answer.headers["retry-after"] == "5" for answer in answers if answer.status_code == 429)
        assert client.post("/v2/repository/models/digits/load").status_code == 200


def client_post(url: str) -> httpx.Response:
    return httpx.post(url, timeout=120)


def test_version_policies_choose_what_is_served(own_repository):
    for version in (2, 3):
        shutil.copytree(own_repository / "digits" / "1", own_repository / "digits" / str(version))
    policies = '{"cdigits": "specific:1,5"}'
    with running_server(own_repository, version_policy="latest:2", version_policies=policies) as server, server.client() as client:
        assert client.get("/v2/models/digits").json()["versions"] == ["2", "3"]
        assert client.get("/v2/models/digits/versions/1/ready").status_code == 404
        index = {(row["name"], row["version"]): row for row in client.post("/v2/repository/index").json()}
        assert index[("digits", "1")]["reason"] == "excluded by the version policy"
        assert client.get("/v2/models/cdigits").json()["versions"] == ["1"]  # its own policy; version 5 does not exist
        assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200


def test_load_and_unload_are_refused_unless_model_control_is_on(server):
    with server.client() as client:
        refused = client.post("/v2/repository/models/digits/unload")
        assert refused.status_code == 403 and "GANSERVE_MODEL_CONTROL" in refused.json()["error"]
        assert client.post("/v2/repository/models/digits/load").status_code == 403
        assert client.get("/v2/models/digits/ready").status_code == 200 and client.post("/v2/repository/index").status_code == 200


def test_a_host_header_is_read_as_a_name_and_a_port_or_kept_whole():
    """Model control's DNS-rebinding check reads the name in `Host`: what follows it must be a port
    (a probe's `127.0.0.1:8813.evil.com` was read as 127.0.0.1)."""
    from service.intake import host_name

    assert host_name("127.0.0.1:8813") == "127.0.0.1" and host_name("[::1]:8813") == "::1" and host_name("[::1]") == "::1"
    assert host_name("LocalHost") == "localhost" and host_name("::1") == "::1"
    for crafted in ("127.0.0.1:8813.evil.com", "[::1]evil.com", "[::1]:80x", "localhost:"):
        assert host_name(crafted) == crafted.lower(), crafted
