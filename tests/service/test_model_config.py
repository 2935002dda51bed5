"""Per-model configuration: a `serving.json` beside an entry's spec.json sets that model's runtime,
batching, warm-up and tiles over the server's settings, `GET /v1/models/{name}` shows the effective
values, and an invalid one fails only its own entry, with the reason."""
from __future__ import annotations

import json
import shutil

import numpy as np

from tests.serving import running_server


def test_serving_json_sets_one_models_runtime_batching_and_warmup(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    (repo / "digits" / "1" / "serving.json").write_text(json.dumps(
        {"runtime": "torchscript", "max_batch_size": 8, "max_queue_delay_ms": 3, "warmup_repeats": 1, "warmup_batch_sizes": [1, 8], "lane_threads": 2}))
    (repo / "upx4" / "1" / "serving.json").write_text(json.dumps({"upscale_tile": 48, "upscale_overlap": 8}))
    (repo / "cdigits" / "1" / "serving.json").write_text(json.dumps({"precision": "fp16"}))
    # an entry written without the default runtime's export (an imported StyleGAN has TorchScript alone) is served with one it has
    spec = json.loads((repo / "gray" / "1" / "spec.json").read_text())
    (repo / "gray" / "1" / spec["formats"].pop("onnx")["file"]).unlink()
    (repo / "gray" / "1" / "spec.json").write_text(json.dumps(spec))
    with running_server(repo, ready_requires="any") as server, server.client() as client:
        gray = client.get("/v1/models/gray").json()["versions"][0]
        assert gray["state"] == "ready" and gray["runtime"] == "torchscript", gray
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
        assert client.get("/v1/models/cdigits/samples.png").status_code == 200  # a file on disk: shown for a failed model too
        assert client.post("/v1/models/cdigits/generate", json={"seed": 1}).status_code == 503


def test_half_precision_is_served_where_its_parity_with_fp32_holds(repository, tmp_path, server):
    import io

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    small_warmup = {"max_batch_size": 4, "warmup_repeats": 1}  # bf16 convolutions are slow on a CPU without bf16 units
    for name, config in {"digits": {"runtime": "torchscript", "precision": "bf16"}, "styles": {"runtime": "eager", "precision": "fp16"},
                         "upx4": {"runtime": "eager", "precision": "bf16", "upscale_tile": 32, "upscale_overlap": 8}}.items():
        (repo / name / "1" / "serving.json").write_text(json.dumps(config | small_warmup))
    picture = io.BytesIO()
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(picture, "PNG")
    requests = [("/v1/models/digits/generate", {"json": {"seed": 4, "n": 3, "format": "npy"}}),
                ("/v1/models/styles/generate", {"json": {"seed": 4, "n": 2, "format": "npy"}}),
                ("/v1/models/upx4/upscale?format=npy", {"content": picture.getvalue(), "headers": {"content-type": "image/png"}})]
    with server.client() as client:
        full = [np.load(io.BytesIO(client.post(path, **kwargs).content)).astype(int) for path, kwargs in requests]
    with running_server(repo) as half_server, half_server.client() as client:
        for name, precision in (("digits", "bf16"), ("styles", "fp16"), ("upx4", "bf16")):
            version = client.get(f"/v1/models/{name}").json()["versions"][0]
            assert version["state"] == "ready", version["error"]
            assert version["precision"]["precision"] == precision and version["precision"]["within_bound"]
            assert 0 < version["precision"]["max_abs_error"] <= version["precision"]["max_bound"]  # measured, not assumed
        half = [np.load(io.BytesIO(client.post(path, **kwargs).content)).astype(int) for path, kwargs in requests]
    for ours, reference in zip(half, full):
        assert ours.shape == reference.shape
        # the bound (mean 1, max 8 levels) is measured on the parity batch; other seeds may pass the max a little
        assert np.abs(ours - reference).mean() <= 1.0 and np.abs(ours - reference).max() <= 16


def test_a_half_precision_graph_past_the_bound_is_measured_as_such():
    from service.precision import MAX_BOUND, measure_parity

    class Entry:
        spec = {"value_range": [-1.0, 1.0]}

    inputs = {"z": np.zeros((2, 4), dtype=np.float32)}
    exact = measure_parity(Entry(), "bf16", lambda x: np.zeros((2, 3)), lambda x: np.full((2, 3), 0.004), inputs)
    assert exact.within_bound and abs(exact.max_abs_error - 0.002) < 1e-9  # in fractions of the value range (2 wide)
    off = measure_parity(Entry(), "fp16", lambda x: np.zeros((2, 3)), lambda x: np.full((2, 3), 4 * MAX_BOUND), inputs)
    broken = measure_parity(Entry(), "fp16", lambda x: np.zeros((2, 3)), lambda x: np.full((2, 3), np.nan), inputs)
    assert not off.within_bound and not broken.within_bound


def test_auto_precision_tries_half_precision_only_on_a_cuda_torch_runtime():
    from service.precision import half_candidates

    assert half_candidates("auto", "torchscript", "cuda") == half_candidates("auto", "eager", "cuda") == ["bf16", "fp16"]
    assert half_candidates("auto", "onnx", "cuda") == half_candidates("auto", "eager", "cpu") == []  # fp32: ONNX exports are fp32; a CPU gains little
    assert half_candidates("fp16", "eager", "cpu") == ["fp16"] and half_candidates("fp32", "eager", "cuda") == []


def test_auto_precision_serves_the_first_half_precision_within_the_bound_else_fp32(repository, monkeypatch):
    """`auto` as it runs on a GPU, driven in-process on this CPU (the candidates a CUDA device would
    get): bf16 where it holds; fp16 when bf16 misses the bound; fp32, with both listed, when
    neither holds."""
    import asyncio

    import service.registry as registry_module
    from service.app import build_registry
    from service.metrics import ServiceMetrics
    from service.precision import PrecisionParity
    from service.settings import Settings

    monkeypatch.setattr(registry_module, "half_candidates", lambda requested, runtime, device: ["bf16", "fp16"] if requested == "auto" else [])
    measured = registry_module.ModelRegistry.check_precision

    def served(missing: set[str]) -> registry_module.LoadedModel:
        def check(self, model, precision):  # the real measurement, or a miss for the precisions in `missing`
            parity = measured(self, model, precision)
            return PrecisionParity(precision, 1.0, 1.0) if precision in missing else parity

        monkeypatch.setattr(registry_module.ModelRegistry, "check_precision", check)

        async def load():
            registry = build_registry(Settings(repository=repository, models=["digits"], runtime="eager", precision="auto", max_batch_size=2), ServiceMetrics())
            registry.discover()
            await registry.load_all()
            await registry.drain()
            return registry.models["digits"][1]

        return asyncio.run(load())

    bf16 = served(set())
    assert bf16.ready and bf16.served_precision == "bf16" and bf16.parity.within_bound and bf16.precision_rejected == []
    assert str(bf16.runtimes["model"].dtype) == "torch.bfloat16"
    fp16 = served({"bf16"})
    assert fp16.served_precision == "fp16" and [p.precision for p in fp16.precision_rejected] == ["bf16"]
    fp32 = served({"bf16", "fp16"})
    assert fp32.ready and fp32.served_precision == "fp32" and fp32.parity is None
    assert [p.precision for p in fp32.precision_rejected] == ["bf16", "fp16"] and str(fp32.runtimes["model"].dtype) == "torch.float32"


def test_runtimes_convert_images_to_uint8_exactly_as_the_host_does(repository):
    """Every runtime's device-side conversion, ONNX Runtime's I/O-binding path (what it takes on
    CUDA: the output left where it was computed and converted there through DLPack) included."""
    from service.imaging import to_uint8
    from service.registry import dummy_inputs
    from service.repository import scan_repository
    from service.runtimes import OnnxRuntime, load_runtime

    rng = np.random.default_rng(3)
    for entry in (e for e in scan_repository(repository) if e.name in ("digits", "cdigits")):
        inputs = dummy_inputs(entry, 5)
        inputs["z"] = rng.standard_normal(inputs["z"].shape).astype(np.float32) * 3  # past the value range too: clamped
        bound = OnnxRuntime(entry, "cpu", 1, io_binding=True)
        for runtime in [load_runtime(entry, kind, "cpu", 1) for kind in ("onnx", "torchscript", "eager")] + [bound]:
            images = runtime.run_images(inputs, tuple(entry.spec["value_range"]))
            assert images.dtype == np.uint8 and images.shape == (5, 32, 32, 1)
            assert np.array_equal(images, to_uint8(runtime.run(inputs), tuple(entry.spec["value_range"])))


def test_batches_are_padded_to_warmed_sizes_when_asked_and_every_image_stays_its_seeds(repository, tmp_path, server):
    import io
    from concurrent.futures import ThreadPoolExecutor

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    (repo / "digits" / "1" / "serving.json").write_text(json.dumps(
        {"pad_batches": True, "max_batch_size": 8, "warmup_batch_sizes": [1, 4, 8], "max_queue_delay_ms": 300}))
    with server.client() as client:
        alone = [client.post("/v1/models/digits/generate", json={"seed": s, "format": "npy"}).content for s in range(3)]
    with running_server(repo) as padded:
        with padded.client() as client:
            assert client.get("/v1/models/digits").json()["versions"][0]["costs"]["model"]["warmed_units"] == [1.0, 4.0, 8.0]
        with ThreadPoolExecutor(3) as pool:  # three requests inside the 300 ms delay: one batch of 3, padded to 4
            burst = list(pool.map(lambda s: padded.client().post("/v1/models/digits/generate", json={"seed": s, "format": "npy"}), range(3)))
        assert padded.metric("ganserve_padded_items_total", model="digits") >= 1
    assert [np.load(io.BytesIO(r.content)).tolist() for r in burst] == [np.load(io.BytesIO(a)).tolist() for a in alone]
