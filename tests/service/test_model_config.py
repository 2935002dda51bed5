"""Per-model configuration: a `serving.json` beside an entry's spec.json sets that model's runtime,
batching, warm-up and tiles over the server's settings, `GET /v1/models/{name}` shows the effective
values, and an invalid one fails only its own entry, with the reason."""
from __future__ import annotations

import json
import shutil

from tests.serving import running_server


def test_serving_json_sets_one_models_runtime_batching_and_warmup(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    (repo / "digits" / "1" / "serving.json").write_text(json.dumps(
        {"runtime": "torchscript", "max_batch_size": 8, "max_queue_delay_ms": 3, "warmup_repeats": 1, "warmup_batch_sizes": [1, 8], "lane_threads": 2}))
    (repo / "upx4" / "1" / "serving.json").write_text(json.dumps({"upscale_tile": 48, "upscale_overlap": 8}))
    (repo / "cdigits" / "1" / "serving.json").write_text(json.dumps({"precision": "fp16"}))
    with running_server(repo, ready_requires="any") as server, server.client() as client:
        digits = client.get("/v1/models/digits").json()["versions"][0]
        assert digits["runtime"] == "torchscript" and digits["serving"]["runtime"] == "torchscript"
        assert digits["serving"]["max_batch_size"] == 8 and digits["serving"]["lane_threads"] == 2
        assert digits["costs"]["model"]["seconds_per_unit"] > 0  # measured at its own warm-up shapes
        assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200
        assert client.get("/v1/models/upx4").json()["versions"][0]["serving"]["upscale_tile"] == 48
        styles = client.get("/v1/models/styles").json()["versions"][0]
        assert styles["serving"]["runtime"] == "onnx" and styles["serving"]["max_batch_size"] == 64  # the others keep the settings
        cdigits = client.get("/v1/models/cdigits").json()["versions"][0]
        assert cdigits["state"] == "failed" and "precision" in cdigits["error"]
