"""The KServe v2 tensor endpoints."""
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
    assert response.status_code == 200, response.text
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
    ]
    with server.client() as client:
        for body in cases:
            assert client.post("/v2/models/digits/infer", json=body).status_code == 422, body
        assert client.post("/v2/models/digits/infer", json={"inputs": [good]}).status_code == 200
