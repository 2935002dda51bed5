"""The KServe v2 tensor endpoints."""
import json

import numpy as np
import torch


def test_v2_health_and_model_readiness(server):
    with server.client() as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/cdigits/ready").json() == {"name": "cdigits", "ready": True}
        meta = client.get("/v2/models/cdigits").json()
    assert [i["name"] for i in meta["inputs"]] == ["z", "label"] and meta["outputs"][0]["shape"] == [-1, 1, 32, 32]


def test_v2_infer_round_trip_matches_the_seeded_generate_image(server):
    z = torch.randn(1, 64, generator=torch.Generator().manual_seed(42)).numpy()
    z = np.concatenate([z, np.zeros((1, 64), np.float32)])
    body = {"id": "r1", "inputs": [
        {"name": "z", "shape": [2, 64], "datatype": "FP32", "data": z.ravel().tolist()},
        {"name": "label", "shape": [2], "datatype": "INT64", "data": [4, 0]},
    ]}
    with server.client() as client:
        response = client.post("/v2/models/cdigits/infer", json=body)
        npy = client.post("/v1/models/cdigits/generate", json={"seed": 42, "class": 4, "format": "npy"})
        body["inputs"][0]["data"] = z.tolist()  # nested as its shape, as KServe's examples send it (refused: "needs 128 values, got 2")
        nested = client.post("/v2/models/cdigits/infer", json=body)
    assert response.status_code == 200, response.text
    assert nested.status_code == 200 and nested.json()["outputs"] == response.json()["outputs"], nested.text[:300]
    output = response.json()["outputs"][0]
    assert output["shape"] == [2, 1, 32, 32] and response.json()["id"] == "r1"
    tensor = np.asarray(output["data"], np.float32).reshape(output["shape"])
    as_uint8 = np.clip(np.rint((tensor[0, 0] + 1) * 127.5), 0, 255).astype(np.uint8)
    assert np.array_equal(as_uint8, np.load(__import__("io").BytesIO(npy.content))[0, :, :, 0])


def test_v2_infer_rejects_wrong_shapes_types_and_names(server):
    good = {"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
    cases = [
        {"inputs": [{**good, "shape": [1, 63]}]},
        {"inputs": [{**good, "datatype": "INT64"}]},
        {"inputs": [{**good, "name": "x"}]},
        {"inputs": [{**good, "data": [0.0] * 10}]},
        {"inputs": [{**good, "data": ["0.5"] * 64}]},  # a number in a string is not a number (numpy would parse it)
        {"inputs": [{**good, "data": [[0.0] * 63]}]},  # nested, but not as its shape
        {"inputs": [{**good, "data": [[0.0] * 64, [0.0] * 64]}]},
        {"inputs": [{**good, "data": [[0.0] * 32, [0.0] * 32]}]},
    ]
    with server.client() as client:
        for body in cases:
            assert client.post("/v2/models/digits/infer", json=body).status_code == 422, body
        assert client.post("/v2/models/digits/infer", json={"inputs": [good]}).status_code == 200
        for media in ("application/x-www-form-urlencoded", "text/plain"):  # curl -d's and a fetch of a string's (415 before)
            assert client.post("/v2/models/digits/infer", content=json.dumps({"inputs": [good]}), headers={"content-type": media}).status_code == 200
        assert client.post("/v2/models/digits/infer", content=b"x", headers={"content-type": "image/png"}).status_code == 415


def test_a_json_answer_never_carries_nan_and_the_binary_one_may():
    """JSON has no NaN: an output that holds one is refused for JSON (json.dumps would write a bare
    `NaN` token that strict clients cannot parse) and carried as it is in binary."""
    import json

    import pytest

    from service.errors import ApiError
    from service.tensor_protocol import InferRequest, encode_response

    outputs = {"image": np.array([[0.5, np.nan]], np.float32)}
    as_json = InferRequest.model_validate({"inputs": [{"name": "z", "shape": [1], "datatype": "FP32", "data": [0.0]}]})
    with pytest.raises(ApiError) as refused:
        encode_response("m", 1, as_json, outputs)
    assert refused.value.status == 422 and "binary" in refused.value.message
    as_binary = InferRequest.model_validate({"inputs": as_json.model_dump()["inputs"], "outputs": [{"name": "image", "parameters": {"binary_data": True}}]})
    content, headers, _ = encode_response("m", 1, as_binary, outputs)
    header = int(headers["Inference-Header-Content-Length"])
    json.loads(content[:header], parse_constant=lambda token: pytest.fail(f"{token} in JSON"))
    assert np.isnan(np.frombuffer(content[header:], "<f4")).tolist() == [False, True]


def test_a_json_answer_reads_back_as_the_same_float32_values_beside_a_binary_one():
    """JSON answers are written by orjson from the arrays (json.dumps of 786 k values held the GIL
    for 0.67 s and stopped every other request): each float32 in its shortest form, which must
    read back as the same float32."""
    import json

    from service.tensor_protocol import InferRequest, encode_response

    body = InferRequest.model_validate({"id": "a, b", "inputs": [{"name": "z", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}],
                                        "outputs": [{"name": "extra", "parameters": {"binary_data": True}}]})
    image = np.random.default_rng(0).standard_normal((3, 3, 5000)).astype(np.float32)
    image[0, 0, :3] = [0.1, -0.0, 3.4e38]
    extra = np.arange(6, dtype=np.float32).reshape(2, 3)
    content, headers, media = encode_response("m", 3, body, {"image": image, "extra": extra})
    length = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(content[:length])
    assert media == "application/octet-stream" and answer["model_name"] == "m" and answer["model_version"] == "3" and answer["id"] == "a, b"
    written, binary = answer["outputs"]
    assert written["shape"] == [3, 3, 5000] and written["datatype"] == "FP32"
    assert np.array_equal(np.asarray(written["data"], np.float32), image.ravel())
    assert binary["parameters"]["binary_data_size"] == extra.nbytes and np.array_equal(np.frombuffer(content[length:], "<f4").reshape(2, 3), extra)


def test_a_binary_answer_is_written_from_the_items_outputs_with_one_copy():
    """A 1.26 GB binary answer raised a server's memory by 4.9 GB where 3.3 GB were reserved (a
    hostile probe): the items' outputs were stacked, the stack copied by `tobytes()`, and that
    joined to the header, four times the answer at once. Now the items' outputs go straight into
    the body, which is all the encoding allocates; the JSON path (rows stacked) gives the same values."""
    import json
    import tracemalloc

    from service.tensor_protocol import InferRequest, encode_response

    rows = [np.full((3, 256, 256), index, np.float32) for index in range(16)]  # 12.6 MB of outputs
    answer_bytes = sum(row.nbytes for row in rows)
    body = InferRequest.model_validate({"inputs": [{"name": "z", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}],
                                        "outputs": [{"name": "image", "parameters": {"binary_data": True}}]})
    tracemalloc.start()
    try:
        content, headers, _ = encode_response("m", 1, body, {"image": rows})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    length = int(headers["Inference-Header-Content-Length"])
    assert json.loads(content[:length])["outputs"][0]["shape"] == [16, 3, 256, 256]
    assert np.array_equal(np.frombuffer(content[length:], "<f4").reshape(16, 3, 256, 256), np.stack(rows))
    assert peak < 1.2 * answer_bytes, peak / answer_bytes  # the body alone (3x before)
    as_json = InferRequest.model_validate({"inputs": [{"name": "z", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}]})
    small = [row[:, :2, :2] for row in rows[:2]]
    written = json.loads(encode_response("m", 1, as_json, {"image": small})[0])["outputs"][0]
    assert written["shape"] == [2, 3, 2, 2] and np.array_equal(np.asarray(written["data"], np.float32), np.stack(small).ravel())


def test_a_json_header_of_more_rows_than_the_model_can_serve_is_refused_before_it_is_parsed(repository):
    """The value count allowed 256 rows whatever the model: a 256² StyleGAN that serves about 5 in
    one request parsed 8 MB of JSON values (0.64 s holding the GIL; a benign request's p99 60 →
    1,055 ms in a probe) before its 413 for their compute. Now the count is what the compute limit
    serves, the rows `admit` takes."""
    import pytest

    from service.admission import ModelLimits, RequestCost, admit, compute_seconds
    from service.costs import GraphCost
    from service.errors import ApiError
    from service.lanes import Lane
    from service.memory import MemoryBudget
    from service.registry import LoadedModel
    from service.repository import scan_repository
    from service.admission import servable_rows
    from service.routes.v2 import JSON_STRUCTURE_COMMAS, check_json_values, json_value_limit
    from service.settings import Settings

    entry = next(e for e in scan_repository(repository) if e.name == "styles")
    lane = Lane("v2-rows-test", 1)
    cost = GraphCost(per_unit_s=0.1, overhead_s=0.02, bytes_per_unit=0, reference_pixels=None)
    model = LoadedModel(entry, lane=lane, costs={"model": cost}, limits=ModelLimits(compute_seconds=0.5))
    settings = Settings(repository=repository)
    try:
        assert servable_rows(model, settings) == 4  # 4 x 0.1 + 0.02 fits 0.5 s; 5 do not
        admit(model, RequestCost(compute_seconds(cost, [1.0] * 4, settings.max_batch_size), 0), 30.0, MemoryBudget(10**9))
        with pytest.raises(ApiError):  # (what the parse would have ended in)
            admit(model, RequestCost(compute_seconds(cost, [1.0] * 5, settings.max_batch_size), 0), 30.0, MemoryBudget(10**9))
        ((name, dims),) = [(t["name"], t["shape"][1:]) for t in entry.spec["inputs"]]
        per_row = int(np.prod(dims))

        def header(rows: int) -> bytes:
            return (f'{{"inputs":[{{"name":"{name}","shape":[{rows},{",".join(map(str, dims))}],"datatype":"FP32","data":['
                    + ",".join(["0"] * rows * per_row) + "]}]}").encode()

        limit = json_value_limit(model, settings)
        check_json_values("styles", limit, header(4), len(header(4)))
        too_many = 5 + JSON_STRUCTURE_COMMAS // per_row  # (the count allows the commas of keys and shapes besides)
        with pytest.raises(ApiError) as refused:
            check_json_values("styles", limit, header(too_many), len(header(too_many)))
        assert refused.value.status == 413 and "at most 4 rows" in refused.value.message
        assert too_many < 256  # (allowed before)
    finally:
        lane.shutdown()


def test_a_header_length_in_other_bytes_is_refused_naming_its_bytes():
    """A header's bytes come as Latin-1: `٣` (UTF-8 d9 a3) was named 'Ù£' in the 422."""
    import pytest

    from service.errors import ApiError
    from service.tensor_protocol import json_part_bytes

    with pytest.raises(ApiError) as refused:
        json_part_bytes("\xd9\xa3", 100)
    assert refused.value.status == 422 and "b'\\xd9\\xa3'" in refused.value.message, refused.value.message
    assert json_part_bytes("00000000000000106", 200) == 106  # leading zeros are still a count
