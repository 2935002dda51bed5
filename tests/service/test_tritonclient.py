"""The standard Open Inference Protocol client (`tritonclient.http`) against the real server: server
and model metadata and readiness (with and without versions), and `infer` for every model kind with
JSON and binary tensors both ways, whose outputs equal what the v1 REST path gives for the same inputs."""
from __future__ import annotations

import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as tritonhttp
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.imaging import to_uint8
from service.operations import latent_for_seed
from service.uploads import to_model_input
from tests.serving import running_server

MODELS = ["digits", "cdigits", "styles", "edges", "gray", "upx4"]


@pytest.fixture
def triton(server):
    client = tritonhttp.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_standard_client_sees_the_server_and_every_model(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    server = triton.get_server_metadata()
    assert server["name"] == "ganserve" and {"binary_tensor_data", "model_repository", "schedule_policy"} <= set(server["extensions"])
    for name in MODELS:
        assert triton.is_model_ready(name) and triton.is_model_ready(name, "1") and not triton.is_model_ready(name, "7")
        metadata = triton.get_model_metadata(name)
        assert metadata == triton.get_model_metadata(name, model_version="1")
        assert metadata["platform"] == "onnxruntime_onnx" and metadata["versions"] == ["1"] and metadata["inputs"] and metadata["outputs"]
        config = triton.get_model_config(name)  # (a bare 404 "Not Found")
        assert config["name"] == name and config["max_batch_size"] >= 1 and config["instance_group"][0]["kind"] == "KIND_CPU"
        assert config["version_policy"] == {"all": {}}
        assert [(t["name"], t["dims"]) for t in config["input"]] == [(t["name"], t["shape"][1:]) for t in metadata["inputs"]]
        assert all(t["data_type"] == f"TYPE_{m['datatype']}" for t, m in zip(config["input"], metadata["inputs"]))
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.get_model_config("nope")


def test_the_configs_max_batch_size_is_the_largest_request_served(server, triton):
    """Clients split their batches by `max_batch_size`, as Triton refuses a request past it: it
    said the batcher's batch (64) where requests of 256 rows were served."""
    config = triton.get_model_config("digits")
    rows = config["max_batch_size"]
    assert rows == 256 and config["dynamic_batching"]["preferred_batch_size"] == [16]  # the test server's batcher batch
    z = np.zeros((rows, 64), np.float32)
    assert infer(triton, "digits", {"z": z}, binary=True).shape[0] == rows
    with pytest.raises(InferenceServerException, match="between 1 and 256 rows"):
        infer(triton, "digits", {"z": np.zeros((rows + 1, 64), np.float32)}, binary=True)


def infer(triton, name: str, arrays: dict[str, np.ndarray], binary: bool, request_id: str = "") -> np.ndarray:
    inputs = []
    for input_name, array in arrays.items():
        datatype = {np.float32: "FP32", np.float16: "FP16", np.int64: "INT64", np.int32: "INT32"}[array.dtype.type]
        tensor = tritonhttp.InferInput(input_name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    output_name = triton.get_model_metadata(name)["outputs"][0]["name"]
    result = triton.infer(name, inputs, request_id=request_id, outputs=[tritonhttp.InferRequestedOutput(output_name, binary_data=binary)])
    if request_id:
        assert result.get_response()["id"] == request_id
    return result.as_numpy(output_name)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_model_kind_infers_through_tritonclient_as_the_v1_path_gives(server, triton, binary):
    seeds = [3, 11]
    z = np.stack([latent_for_seed(seed, 64) for seed in seeds])
    with server.client() as client:
        # generators: z (and a class) → the v1 image for the same seeds
        images = infer(triton, "digits", {"z": z}, binary, request_id="r-7")
        assert np.array_equal(to_uint8(images, (-1.0, 1.0)), npy(client.post("/v1/models/digits/generate", json={"seeds": seeds, "format": "npy"})))
        labelled = infer(triton, "cdigits", {"z": z, "label": np.array([4, 4], np.int64)}, binary)
        expected = npy(client.post("/v1/models/cdigits/generate", json={"seeds": seeds, "class": 4, "format": "npy"}))
        assert np.array_equal(to_uint8(labelled, (-1.0, 1.0)), expected)
        # a style model's synthesis: ws → the v1 image of the same w (interpolating w with itself)
        w = np.random.default_rng(0).standard_normal(8).astype(np.float32)
        styled = infer(triton, "styles", {"ws": np.repeat(w[None, None], 6, axis=1)}, binary)
        frames = npy(client.post("/v1/models/styles/interpolate", json={"w": [w.tolist(), w.tolist()], "steps": 2, "format": "npy"}))
        assert np.array_equal(to_uint8(styled, (-1.0, 1.0))[0], frames[0])
        # image-to-image: the upload's own tensor → the v1 answer for that upload (sizes the networks take whole)
        rng = np.random.default_rng(1)
        for name, side in (("edges", 32), ("gray", 64), ("upx4", 96)):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            entry = client.get(f"/v1/models/{name}").json()["versions"][0]["spec"]
            x = to_model_input(pixels, entry["in_channels"])[None]
            out = infer(triton, name, {"image": x}, binary)
            endpoint = "translate" if entry["kind"] == "translation" else "upscale"
            answer = npy(client.post(f"/v1/models/{name}/{endpoint}?format=npy", content=png(pixels), headers={"content-type": "image/png"}))
            assert np.array_equal(to_uint8(out, (-1.0, 1.0)), answer), name


def test_narrower_wire_types_are_taken_where_the_model_input_allows(triton):
    z = np.stack([latent_for_seed(seed, 64) for seed in (5, 6)])
    exact = infer(triton, "cdigits", {"z": z, "label": np.array([1, 2], np.int64)}, True)
    narrow = infer(triton, "cdigits", {"z": z.astype(np.float16), "label": np.array([1, 2], np.int32)}, True)
    assert np.abs(narrow - exact).max() < 0.05  # FP16 rounding of z only


def test_protocol_errors_reach_the_client_as_its_exception_with_the_message(server, triton):
    bad = tritonhttp.InferInput("z", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException, match="must have shape"):
        triton.infer("digits", [bad])
    wrong_type = tritonhttp.InferInput("label", [1], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(1, np.float32))
    z = tritonhttp.InferInput("z", [1, 64], "FP32")
    z.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException, match="takes INT64"):
        triton.infer("cdigits", [z, wrong_type])
    with server.client() as client:
        header = b'{"inputs":[{"name":"z","shape":[1,64],"datatype":"FP32","parameters":{"binary_data_size":256}}]}'
        short = client.post("/v2/models/digits/infer", content=header + b"\0" * 100, headers={"Inference-Header-Content-Length": str(len(header))})
        assert short.status_code == 422 and "before its 256 binary bytes" in short.json()["error"]
        body = header + b"\0" * 256
        for length in (f"{len(header) // 10}_{len(header) % 10}", f"+{len(header)}", f"{len(header)}.0"):  # int() takes the first two
            spelled = client.post("/v2/models/digits/infer", content=body, headers={"Inference-Header-Content-Length": length})
            assert spelled.status_code == 422 and "must be an integer" in spelled.json()["error"], length
        assert client.post("/v2/models/digits/infer", content=body, headers={"Inference-Header-Content-Length": str(len(header))}).status_code == 200


def test_what_the_server_does_not_serve_is_refused_with_a_reason_not_ignored(server, triton):
    """A hostile probe found the standard client's options answered as if they worked: a gzip request
    was "not valid JSON (UnicodeDecodeError)", `class_count` gave the raw tensor back, an input with
    both `data` and `binary_data_size` lost its `data`, and a malformed header length under a large
    binary body was "413 … send the tensors as binary data" to a client that had."""
    z = tritonhttp.InferInput("z", [1, 64], "FP32")
    z.set_data_from_numpy(latent_for_seed(1, 64)[None], binary_data=True)
    for algorithm in ("gzip", "deflate"):
        with pytest.raises(InferenceServerException, match="uncompressed"):
            triton.infer("digits", [z], request_compression_algorithm=algorithm)
    with pytest.raises(InferenceServerException, match="classification"):
        triton.infer("digits", [z], outputs=[tritonhttp.InferRequestedOutput("image", class_count=3)])
    # the shared-memory extension (the output came back in the body, nothing written to the region
    # the client then reads) and a sequence's parameters (no state is kept between requests) were ignored too
    in_region = tritonhttp.InferInput("z", [1, 64], "FP32")
    in_region.set_shared_memory("inputs", 256)
    out_region = tritonhttp.InferRequestedOutput("image")
    out_region.set_shared_memory("outputs", 4096)
    for inputs, outputs in (([in_region], None), ([z], [out_region])):
        with pytest.raises(InferenceServerException, match="shared-memory"):
            triton.infer("digits", inputs, outputs=outputs)
    with pytest.raises(InferenceServerException, match="sequence"):
        triton.infer("digits", [z], sequence_id=7, sequence_start=True)
    assert triton.infer("digits", [z]).as_numpy("image").shape == (1, 1, 32, 32)  # and without them it is served
    with server.client() as client:
        both = {"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64, "parameters": {"binary_data_size": 256}}
        header = json.dumps({"inputs": [both]}).encode()
        answer = client.post("/v2/models/digits/infer", content=header + b"\0" * 256, headers={"Inference-Header-Content-Length": str(len(header))})
        assert answer.status_code == 422 and "both data and binary_data_size" in answer.json()["error"]
        image = b'{"inputs":[{"name":"image","shape":[1,3,400,400],"datatype":"FP32","parameters":{"binary_data_size":1920000}}]}'
        for length in ("0", "abc", "+123"):  # large enough a body that "all of it is JSON" passed the header limit
            answer = client.post("/v2/models/upx4/infer", content=image + b"\0" * 1_920_000, headers={"Inference-Header-Content-Length": length})
            assert answer.status_code == 422 and "Inference-Header-Content-Length" in answer.json()["error"], (length, answer.text[:200])


def test_the_clients_timeout_is_its_deadline_and_one_too_short_for_the_compute_is_413_naming_what_would_do(server, triton):
    """tritonclient's `infer(timeout=µs)`, Triton's schedule-policy timeout, was read and ignored:
    a client that gives up after a millisecond had its request queued and computed for up to the
    server's 30 s. Now the shorter of it and the server's deadline is the request's; 0 is none."""
    z = tritonhttp.InferInput("z", [1, 64], "FP32")
    z.set_data_from_numpy(latent_for_seed(1, 64)[None], binary_data=True)
    with pytest.raises(InferenceServerException) as refused:
        triton.infer("digits", [z], timeout=1)
    assert refused.value.status() == "413" and "timeout of 1 µs" in refused.value.message()
    enough = int(re.search(r"a timeout of at least (\d+) µs", refused.value.message()).group(1))
    assert 1 < enough < 1_000_000
    # the timeout it names is served (it named the bare compute: 504 or 503 "retry in 1 s", every time, in a probe)
    answers = []
    for _ in range(5):
        try:
            answers.append(triton.infer("digits", [z], timeout=enough).as_numpy("image").shape)
            break
        except InferenceServerException as error:
            answers.append(error.status())
            time.sleep(0.2)
    assert (1, 1, 32, 32) in answers, answers
    for timeout in (0, 1_000_000):  # none, and a second: served
        assert triton.infer("digits", [z], timeout=timeout).as_numpy("image").shape == (1, 1, 32, 32)
    with server.client() as client:
        for bad in (-1, True, 1.5, "1000", 2**63):
            body = {"inputs": [{"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}], "parameters": {"timeout": bad}}
            answer = client.post("/v2/models/digits/infer", json=body)
            assert answer.status_code == 422 and "parameters.timeout" in answer.json()["error"], (bad, answer.text)
        # given twice, the parser kept the last: a proxy in front may have read the first
        twice = b'{"inputs": [{"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [%s]}], "parameters": {"timeout": 1, "timeout": 0}}' % b",".join([b"0"] * 64)
        answer = client.post("/v2/models/digits/infer", content=twice)
        assert answer.status_code == 422 and "'timeout' appears more than once" in answer.json()["error"], answer.text
        # each object is checked for repeated keys: objects by the thousand, which no request needs, are refused before parsing
        braces = b'{"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [%s]}]}' % b",".join([b"{}"] * 20_000)
        answer = client.post("/v2/models/edges/infer", content=braces)
        assert answer.status_code == 422 and "JSON objects" in answer.json()["error"], answer.text


@pytest.mark.quiet_host  # its refusal must name the queue, not other processes' load
@pytest.mark.parametrize("settings", [{}, {"workers": 2}], ids=["one process", "engine and two fronts"])
def test_a_request_whose_timeout_its_models_queue_would_pass_is_refused_up_front_and_served_without_it(settings):
    """Admission weighs the queue against the client's own timeout: behind a 256² upscale (~2 s
    here), a small one that would be computed in time alone but not behind it is 503 at once with
    `Retry-After`, where it was queued and answered after the big one, long past what its client
    waits for; the same request without a timeout is served, and so is one with a timeout it fits
    in (under `--workers`, its deadline and the server's travel to the engine)."""
    shipped = Path(__file__).resolve().parents[2] / "model_repository"
    with running_server(shipped, models=["sr-rrdb-x4"], intra_op_threads=2, remeasure_idle_s=1, **settings) as server:
        server.wait_for_side("sr-rrdb-x4", 256, timeout_s=90)
        header = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 256, 256], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 3 * 256 * 256 * 4}}],
                             "parameters": {"binary_data_output": True}}).encode()
        big = header + np.zeros((1, 3, 256, 256), np.float32).tobytes()
        with ThreadPoolExecutor(1) as pool, server.client(timeout=60) as client:
            blocking = pool.submit(client.post, "/v2/models/sr-rrdb-x4/infer", content=big, headers={"Inference-Header-Content-Length": str(len(header))})
            while server.metric("ganserve_requests_in_flight", model="sr-rrdb-x4") < 1:
                assert not blocking.done(), blocking.result().text
                time.sleep(0.01)
            triton = tritonhttp.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
            small = tritonhttp.InferInput("image", [1, 3, 48, 48], "FP32")
            small.set_data_from_numpy(np.zeros((1, 3, 48, 48), np.float32), binary_data=True)
            with pytest.raises(InferenceServerException) as refused:
                triton.infer("sr-rrdb-x4", [small], timeout=500_000)
            assert refused.value.status() == "503" and "work queued" in refused.value.message() and "retry in" in refused.value.message()
            assert triton.infer("sr-rrdb-x4", [small]).as_numpy("output").shape == (1, 3, 192, 192)
            assert blocking.result().status_code == 200
            assert triton.infer("sr-rrdb-x4", [small], timeout=10_000_000).as_numpy("output").shape == (1, 3, 192, 192)
            triton.close()
