"""`ganserve import` of NVlabs network pickles (StyleGAN2-ADA, StyleGAN3-T and -R): the imported generator reproduces
the reference implementation's outputs, the entry's graphs do too, every style endpoint serves
it, and a pickle that asks for anything but tensors and network records is refused unrun."""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from ganserve_cli import app
from repository.importers.checkpoint import CheckpointError
from repository.importers.nvlabs import import_nvlabs
from tests.fixtures.nvlabs_pickle import network_pickle
from tests.parallel import run_two_at_a_time
from tests.serving import running_server

FIXTURE_ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = {"skip32": FIXTURE_ROOT / "stylegan2_ada" / "skip32", "orig16": FIXTURE_ROOT / "stylegan2_ada" / "orig16",
            "cond16": FIXTURE_ROOT / "stylegan2_ada" / "cond16", "res16": FIXTURE_ROOT / "stylegan2_ada" / "res16", "t16": FIXTURE_ROOT / "stylegan3" / "t16", "r16": FIXTURE_ROOT / "stylegan3" / "r16"}
CONFIGS = list(FIXTURES)
ARCH = {"skip32": "stylegan2-ada", "orig16": "stylegan2-ada", "cond16": "stylegan2-ada", "res16": "stylegan2-ada", "t16": "stylegan3", "r16": "stylegan3"}
CONDITIONAL = {"cond16": 3}
REFERENCE_TOLERANCE = 1e-3  # the issue's bound against NVlabs' own forward (float32, CPU, const noise)


def reference(config: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES[config] / "reference.safetensors"))


def mapping_inputs(config: str, expected: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (expected["z"], expected["labels"]) if config in CONDITIONAL else (expected["z"],)


def run_import(tmp_path: Path, data: bytes, name: str = "imported", *options: str):
    checkpoint = tmp_path / f"{name}.pkl"
    checkpoint.write_bytes(data)
    return CliRunner().invoke(app, ["import", str(checkpoint), "--name", name, "--version", "1", "--repository", str(tmp_path / "repo"), *options])


@pytest.mark.parametrize("config", CONFIGS)
def test_an_imported_generator_reproduces_the_reference_mapping_and_synthesis(config):
    generator = import_nvlabs(network_pickle(FIXTURES[config])).generator
    expected = reference(config)
    with torch.no_grad():
        w = generator.mapping(*mapping_inputs(config, expected))
        image = generator.synthesis(expected["ws"])
        truncated = generator.synthesis(generator.w_avg.lerp(w, 0.5)[:, None].expand(-1, generator.num_ws, -1))
    assert (w - expected["w"]).abs().max() <= REFERENCE_TOLERANCE
    assert (image - expected["image"]).abs().max() <= REFERENCE_TOLERANCE
    assert (truncated - expected["image_psi_half"]).abs().max() <= REFERENCE_TOLERANCE  # ψ as the server applies it
    assert expected["image"].abs().max() > 0.5  # the reference image is not trivially small


def import_fixture(root: Path, config: str) -> tuple[int, str]:
    """(exit code, output) of the real command on one fixture pickle."""
    result = run_import(root, network_pickle(FIXTURES[config]), config)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def imports(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, str]]]:
    """Each fixture pickle imported once with the real command, all into one repository, two at a
    time (an import exports two ONNX graphs, ~10 s): the entry tests read it, the serving test serves it."""
    root = tmp_path_factory.mktemp("imported")
    results = run_two_at_a_time([(import_fixture, (root, config)) for config in CONFIGS])
    return root / "repo", dict(zip(CONFIGS, results))


@pytest.mark.parametrize("config", CONFIGS)
def test_import_writes_a_style_entry_whose_graphs_reproduce_the_reference(imports, config):
    repo, results = imports
    exit_code, output = results[config]
    assert exit_code == 0, output
    entry = repo / config / "1"
    spec = json.loads((entry / "spec.json").read_text())
    expected = reference(config)
    synthesis = ort.InferenceSession(str(entry / "model.onnx"), providers=["CPUExecutionProvider"])
    mapping = ort.InferenceSession(str(entry / "mapping.onnx"), providers=["CPUExecutionProvider"])
    w = mapping.run(None, {name: x.numpy() for name, x in zip(("z", "label"), mapping_inputs(config, expected))})[0]
    image = synthesis.run(None, {"ws": expected["ws"].numpy()})[0]
    assert np.abs(w - expected["w"].numpy()).max() <= REFERENCE_TOLERANCE
    assert np.abs(image - expected["image"].numpy()).max() <= REFERENCE_TOLERANCE
    assert spec["kind"] == "style" and spec["arch"] == ARCH[config] and spec["num_ws"] == expected["ws"].shape[1]
    assert spec["directions"][:3] == ["pc0", "pc1", "pc2"] and spec["source"]["format"] == "nvlabs" and len(spec["source"]["sha256"]) == 64
    assert spec["source"]["hyperparameters"]["img_resolution"] == expected["image"].shape[-1]
    assert spec["class_names"] == [str(i) for i in range(CONDITIONAL.get(config, 0))]
    assert all(info["parity_max_abs_error"] <= 1e-4 for name, info in spec["formats"].items() if name != "eager")
    directions = load_file(str(entry / "latents.safetensors"))
    assert torch.allclose(directions["direction.pc0"].norm(), torch.tensor(1.0), atol=1e-5)


@pytest.fixture(scope="module")
def imported_repository(imports) -> Path:
    repo, results = imports
    assert all(exit_code == 0 for exit_code, _ in results.values()), {config: output for config, (exit_code, output) in results.items() if exit_code}
    return repo


def npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def test_every_style_endpoint_serves_imported_generators(imported_repository):
    target = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 40, 40)).save(target, "PNG")
    with running_server(imported_repository, max_jobs=2 * len(CONFIGS)) as server, server.client() as client:  # (one client holds half the slots)
        for config in CONFIGS:
            expected = reference(config)
            side, channels = expected["image"].shape[2], expected["image"].shape[1]
            body = {"inputs": [{"name": "ws", "shape": list(expected["ws"].shape), "datatype": "FP32", "data": expected["ws"].ravel().tolist()}]}
            served = client.post(f"/v2/models/{config}/infer", json=body)
            assert served.status_code == 200, served.text
            tensor = np.asarray(served.json()["outputs"][0]["data"], np.float32).reshape(expected["image"].shape)
            assert np.abs(tensor - expected["image"].numpy()).max() <= REFERENCE_TOLERANCE
            base = f"/v1/models/{config}"
            assert npy(client.post(f"{base}/generate", json={"seed": 3, "n": 2, "truncation_psi": 0.7, "format": "npy"})).shape == (2, side, side, channels)
            assert npy(client.post(f"{base}/style-mix", json={"row_seeds": [1, 2], "col_seeds": [3], "layers": "coarse", "format": "npy"})).shape == (2, side, side, channels)
            assert npy(client.post(f"{base}/interpolate", json={"seeds": [1, 2], "steps": 3, "format": "npy"})).shape == (3, side, side, channels)
            edits = npy(client.post(f"{base}/edit", json={"seed": 1, "direction": "pc0", "strengths": [-2, 0, 2], "format": "npy"}))
            assert edits.shape == (3, side, side, channels) and not np.array_equal(edits[0], edits[2])
            job = client.post(f"{base}/project?steps=3", content=target.getvalue(), headers={"content-type": "image/png"})
            assert job.status_code == 202
        conditional = "/v1/models/cond16"
        by_class = [npy(client.post(f"{conditional}/generate", json={"seed": 4, "class": label, "format": "npy"}))[0] for label in (0, 2, "2")]
        assert not np.array_equal(by_class[0], by_class[1]) and np.array_equal(by_class[1], by_class[2])  # the class changes the image; names work
        cycled = npy(client.post(f"{conditional}/generate", json={"seeds": [4, 4, 4], "format": "npy"}))
        assert np.array_equal(cycled[0], by_class[0]) and np.array_equal(cycled[2], by_class[1])  # no class: classes in turn
        assert client.post(f"{conditional}/generate", json={"seed": 1, "class": 3}).status_code == 422
        assert client.post("/v1/models/skip32/generate", json={"seed": 1, "class": 0}).status_code == 422
        assert npy(client.post(f"{conditional}/style-mix", json={"row_seeds": [1], "col_seeds": [2], "class": 1, "format": "npy"})).shape[0] == 1
        listing = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert all(listing[config]["state"] == "ready" and "pc0" in listing[config]["direction_spreads"] for config in CONFIGS)


def malicious_pickle(module: str, name: str, argument: str) -> bytes:
    """A pickle that calls module.name(argument) when loaded by an ordinary unpickler."""
    return b"\x80\x04" + f"c{module}\n{name}\n".encode() + b"(" + pickle.dumps(argument, protocol=4)[2:-1] + b"tR."


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("subprocess", "check_call"), ("torch", "load")])
def test_a_pickle_that_asks_for_code_is_refused_and_nothing_runs(tmp_path, module, name):
    marker = tmp_path / "ran"
    result = run_import(tmp_path, malicious_pickle(module, name, f"touch {marker}"), "evil")
    assert result.exit_code == 1
    assert f"{module}.{name}" in result.output and "never other code" in result.output and len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "repo" / "evil").exists()


def test_the_network_source_embedded_in_a_pickle_is_never_run():
    """The fixture pickles carry a source that would exit the process if executed."""
    assert import_nvlabs(network_pickle(FIXTURES["orig16"])).generator.num_ws == 6


def torch_archive() -> bytes:
    buffer = io.BytesIO()
    torch.save({"g_ema": {"w": torch.zeros(2)}}, buffer)
    assert zipfile.is_zipfile(io.BytesIO(buffer.getvalue()))
    return buffer.getvalue()


def discriminator(structure: dict) -> None:
    structure["class_name"] = "Discriminator"


def wider_w(structure: dict) -> None:
    structure["init_kwargs"]["w_dim"] = 64


def conditional(structure: dict) -> None:
    structure["init_kwargs"]["c_dim"] = 10


def fewer_layers(structure: dict) -> None:
    structure["init_kwargs"]["num_layers"] = 5


def narrower(structure: dict) -> None:
    structure["init_kwargs"]["channel_max"] = 8


def relu_synthesis(structure: dict) -> None:
    structure["init_kwargs"]["synthesis_kwargs"]["activation"] = "relu"


BAD_CHECKPOINTS = [
    ("not a pickle", lambda: b"just some text, no pickle", (), "neither a network pickle"),
    ("truncated", lambda: network_pickle(FIXTURES["orig16"])[:5000], (), "damaged or truncated"),
    ("another kind of network", lambda: network_pickle(FIXTURES["orig16"], discriminator), (), "not a Generator"),
    ("shapes contradict the config", lambda: network_pickle(FIXTURES["orig16"], wider_w), (), "configuration gives"),
    ("conditional config without an embedding", lambda: network_pickle(FIXTURES["orig16"], conditional), (), "has no mapping.embed"),
    ("ReLU synthesis", lambda: network_pickle(FIXTURES["orig16"], relu_synthesis), (), "are not served (leaky ReLU only)"),
    ("StyleGAN3 with fewer layers than its tensors", lambda: network_pickle(FIXTURES["t16"], fewer_layers), (), "synthesis layers"),
    ("StyleGAN3 narrower than its tensors", lambda: network_pickle(FIXTURES["t16"], narrower), (), "configuration gives"),
    ("a torch.save archive of something else", torch_archive, (), "holds no rosinality generator"),
    ("an unknown format", lambda: network_pickle(FIXTURES["orig16"]), ("--format", "caffe"), "unknown format"),
]


@pytest.mark.parametrize("case,make,options,mentions", BAD_CHECKPOINTS, ids=[c[0] for c in BAD_CHECKPOINTS])
def test_a_bad_checkpoint_is_a_one_line_error_and_no_entry(tmp_path, case, make, options, mentions):
    result = run_import(tmp_path, make(), "bad", *options)
    assert result.exit_code in (1, 2), result.output
    assert mentions in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "repo" / "bad").exists()


def test_the_checkpoint_error_type_names_what_is_wrong():
    with pytest.raises(CheckpointError, match="no G_ema or G"):
        import_nvlabs(pickle.dumps({"D": 1}, protocol=4))
