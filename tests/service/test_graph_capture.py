"""Graphs captured per warmed shape (service/graph_capture.py): on this CPU through `torch.compile`,
served by the real server. The capture must not change a seed's image, batches must be padded to
captured shapes so that no request compiles, and a capture the device or runtime cannot do fails
its entry with the reason. (`cuda_graphs` runs only on a GPU: `bench/gpu_session.sh` covers it.)"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from tests.serving import running_server


def test_compiled_shapes_serve_the_same_images_and_no_request_compiles(repository, tmp_path, server):
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    (repo / "digits" / "1" / "serving.json").write_text(json.dumps(
        {"runtime": "eager", "graph_capture": "compile", "max_batch_size": 4, "warmup_batch_sizes": [4], "warmup_repeats": 1}))
    (repo / "cdigits" / "1" / "serving.json").write_text(json.dumps({"runtime": "torchscript", "graph_capture": "compile"}))
    (repo / "styles" / "1" / "serving.json").write_text(json.dumps({"runtime": "eager", "graph_capture": "cuda_graphs"}))
    tiles = {"runtime": "eager", "upscale_tile": 32, "upscale_overlap": 8, "max_batch_size": 4, "warmup_batch_sizes": [4], "warmup_repeats": 1}
    shutil.copytree(repo / "upx4", repo / "upx4plain")  # the same weights and tiles, uncaptured: the reference for the captured one
    (repo / "upx4" / "1" / "serving.json").write_text(json.dumps(tiles | {"graph_capture": "compile"}))
    (repo / "upx4plain" / "1" / "serving.json").write_text(json.dumps(tiles))
    picture = io.BytesIO()
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(picture, "PNG")  # 2 x 2 tiles of 32
    upload = {"content": picture.getvalue(), "headers": {"content-type": "image/png"}}
    bodies = [{"seed": 7, "format": "npy"}, {"seed": 3, "n": 3, "format": "npy"}, {"seeds": [9, 8, 7, 6], "format": "npy"}]
    with server.client() as client:
        reference = [np.load(io.BytesIO(client.post("/v1/models/digits/generate", json=body).content)).astype(int) for body in bodies]
    with running_server(repo, ready_requires="digits,upx4,upx4plain", models=["digits", "cdigits", "styles", "upx4", "upx4plain"]) as captured, captured.client() as client:
        answer = client.get("/v1/models/digits").json()
        digits = answer["versions"][0] if "versions" in answer else pytest.fail(str(answer))
        assert digits["state"] == "ready", digits["error"]
        z_dim = digits["spec"]["z_dim"]
        capture = digits["capture"]["model"]
        assert capture["mode"] == "compile" and capture["shapes"] == [[[4, z_dim]]]  # the one warmed shape, nothing else
        assert capture["capture_seconds"] > 0 and capture["max_abs_difference"] < 1e-3
        served = [np.load(io.BytesIO(client.post("/v1/models/digits/generate", json=body).content)).astype(int) for body in bodies]
        after = client.get("/v1/models/digits").json()["versions"][0]["capture"]["model"]
        assert after["uncaptured_runs"] == 0  # batches of 1 and 3 were padded to the captured 4: no request ran uncaptured or compiled
        assert captured.metric("ganserve_padded_items_total", model="digits") >= 3 + 1
        upscaled, plain = (np.load(io.BytesIO(client.post(f"/v1/models/{name}/upscale?format=npy", **upload).content)).astype(int) for name in ("upx4", "upx4plain"))
        assert upscaled.shape == plain.shape == (1, 160, 224, 3) and np.abs(upscaled - plain).max() <= 1
        upx4 = client.get("/v1/models/upx4").json()["versions"][0]["capture"]["model"]
        assert upx4["shapes"] == [[[4, 3, 32, 32]]] and upx4["uncaptured_runs"] == 0  # a frame's 4 tiles: one captured batch
        cdigits = client.get("/v1/models/cdigits").json()["versions"][0]
        assert cdigits["state"] == "failed" and "compile needs the eager runtime" in cdigits["error"]
        styles = client.get("/v1/models/styles").json()["versions"][0]
        assert styles["state"] == "failed" and "needs a CUDA device" in styles["error"]
    for ours, theirs in zip(served, reference):
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 1  # inductor's fused arithmetic may flip a rounding, never more


def test_the_servers_default_capture_applies_only_where_the_runtime_can_capture(repository):
    from service.model_config import serving_config
    from service.repository import scan_repository
    from service.settings import Settings

    digits = next(e for e in scan_repository(repository) if e.name == "digits")
    assert serving_config(digits, Settings(graph_capture="compile")).graph_capture == "none"  # onnx by default
    assert serving_config(digits, Settings(runtime="torchscript", graph_capture="compile")).graph_capture == "none"
    assert serving_config(digits, Settings(runtime="torchscript", graph_capture="cuda_graphs")).graph_capture == "cuda_graphs"
    assert serving_config(digits, Settings(runtime="eager", graph_capture="compile")).graph_capture == "compile"


def test_onnx_cannot_capture_and_the_serving_section_says_why():
    from pydantic import ValidationError

    from service.model_config import ServingConfig

    base = dict(lane_threads=1, max_batch_size=4, max_batch_seconds=1.0, max_queue_delay_ms=0, max_queue_size=8, max_input_pixels=4096,
                upscale_tile=32, upscale_overlap=8)
    with pytest.raises(ValidationError, match="needs the torchscript or eager runtime"):
        ServingConfig(runtime="onnx", graph_capture="cuda_graphs", **base)
    assert ServingConfig(runtime="torchscript", graph_capture="cuda_graphs", **base).graph_capture == "cuda_graphs"


def test_a_captured_graph_that_disagrees_with_the_plain_module_is_refused_not_served():
    """A capture that goes wrong (a static buffer read too late, a miscompiled kernel) would serve
    wrong images silently: warm-up compares it with the plain module and refuses it past 8/255 of
    the output's range, naming the shapes; rounding-level differences pass and are reported."""
    import torch

    from service.graph_capture import ShapeCapture

    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh()).eval()
    inputs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(0))]
    with torch.inference_mode():
        close = ShapeCapture(module, "compile", "cpu")
        close.compiled = lambda x: module(x) + 1e-4  # within rounding of a fused kernel
        assert close.capture(inputs).max_abs_difference == pytest.approx(1e-4, rel=0.01)
        broken = ShapeCapture(module, "compile", "cpu")
        broken.compiled = lambda x: module(x.flip(0))  # another request's rows: the outputs are swapped
        with pytest.raises(ValueError, match=r"input shapes \[\[4, 8\]\] differs from the plain module"):
            broken.capture(inputs)
