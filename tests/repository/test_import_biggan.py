"""`ganserve import` of BigGAN-deep checkpoints (the pytorch-pretrained-biggan port's folder layout):
the imported generator and its exported graph reproduce the port's own outputs at truncations on
and between its statistics grid, the server generates with a class (index or name) and a
truncation, and a bad folder is a one-line error with no entry."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ganserve_cli import app
from models.biggan import truncated_latent, truncation_stats_weights
from repository.importers.biggan import import_biggan
from tests.serving import running_server

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "biggan" / "tiny32"
REFERENCE_TOLERANCE = 1e-3  # the bound against the port's own forward (float32, CPU)
CLASSES = ["cat", "dog", "owl", "fox", "elk"]


def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference.safetensors"))


def cases(expected: dict[str, torch.Tensor]):
    """(truncation, z, label, stats weights, port image) per truncation of the fixture."""
    for index, truncation in enumerate(expected["truncations"].tolist()):
        z = expected[f"z.{index}"]
        stats = torch.tensor([truncation_stats_weights(truncation, 51)] * len(z))
        yield truncation, z, expected[f"label.{index}"], stats, expected[f"image.{index}"]


def run_import(tmp_path: Path, checkpoint: Path, name: str = "biggan", *options: str):
    return CliRunner().invoke(app, ["import", str(checkpoint), "--name", name, "--version", "1", "--repository", str(tmp_path / "repo"), *options])


def test_an_imported_biggan_reproduces_the_port_at_every_truncation():
    generator = import_biggan(FIXTURE).generator
    for truncation, z, label, stats, image in cases(reference()):
        with torch.no_grad():
            got = generator(z, label, stats)
        assert (got - image).abs().max() <= REFERENCE_TOLERANCE, truncation
        assert image.std() > 0.1  # the reference is a real image, not a constant


def test_the_statistics_interpolation_is_the_ports_double_precision_arithmetic():
    """0.3 / 0.02 is exactly 15 in double precision, so the port uses statistics 15; in float32 it is
    15.000001, which the port's (reversed) interpolation turns into nearly all of statistics 16.
    Between grid points the weights split; 1.0 is exactly the last entry."""
    assert truncation_stats_weights(0.3, 51)[15] == 1.0
    assert truncation_stats_weights(0.30001, 51)[16] > 0.99
    between = truncation_stats_weights(0.75, 51)
    assert between[37] == between[38] == 0.5 and sum(between) == 1.0
    assert truncation_stats_weights(1.0, 51)[50] == 1.0 and sum(truncation_stats_weights(1.0, 51)) == 1.0
    with pytest.raises(ValueError):
        truncation_stats_weights(0.0, 51)


def test_a_truncated_latent_is_bounded_and_fixed_by_its_seed():
    z = truncated_latent(7, 10_000, 0.5)
    assert z.abs().max() <= 1.0 and torch.equal(z, truncated_latent(7, 10_000, 0.5))
    assert 0.85 < (z / 0.5).std() < 0.9  # a standard normal truncated to ±2 has std 0.88


def test_import_writes_a_conditional_entry_whose_graph_reproduces_the_port(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    result = run_import(tmp_path, FIXTURE, "biggan", "--class-names", str(names))
    assert result.exit_code == 0, result.output
    entry = tmp_path / "repo" / "biggan" / "1"
    spec = json.loads((entry / "spec.json").read_text())
    assert spec["kind"] == "conditional" and spec["arch"] == "biggan-deep" and spec["resolution"] == 32 and spec["class_names"] == CLASSES
    assert spec["truncation"] == {"method": "biggan", "z_bound": 2.0, "n_stats": 51, "default": 1.0}
    assert spec["source"]["format"] == "biggan" and spec["source"]["hyperparameters"]["config"]["channel_width"] == 4
    assert all(info["parity_max_abs_error"] <= 1e-4 for name, info in spec["formats"].items() if name != "eager")
    session = ort.InferenceSession(str(entry / "model.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(entry / "model.pt"))
    for truncation, z, label, stats, image in cases(reference()):
        got = session.run(None, {"z": z.numpy(), "label": label.numpy(), "truncation_stats": stats.numpy()})[0]
        assert np.abs(got - image.numpy()).max() <= REFERENCE_TOLERANCE, truncation
        with torch.no_grad():
            assert (scripted(z, label, stats) - image).abs().max() <= REFERENCE_TOLERANCE
    assert (entry / "samples.png").stat().st_size > 0


def npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def test_the_server_generates_from_an_imported_biggan_by_class_and_truncation(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    assert run_import(tmp_path, FIXTURE / "pytorch_model.bin", "biggan", "--class-names", str(names)).exit_code == 0
    expected = reference()
    with running_server(tmp_path / "repo") as server, server.client() as client:
        base = "/v1/models/biggan/generate"
        by_name = npy(client.post(base, json={"seed": 3, "class": "owl", "truncation": 0.4, "format": "npy"}))
        by_index = npy(client.post(base, json={"seed": 3, "class": 2, "truncation": 0.4, "format": "npy"}))
        assert by_name.shape == (1, 32, 32, 3) and np.array_equal(by_name, by_index)
        other_class = npy(client.post(base, json={"seed": 3, "class": "fox", "truncation": 0.4, "format": "npy"}))
        other_truncation = npy(client.post(base, json={"seed": 3, "class": "owl", "truncation": 0.9, "format": "npy"}))
        assert not np.array_equal(by_name, other_class) and not np.array_equal(by_name, other_truncation)
        # a seed fixes its image whatever else shares the batch; no class → classes in turn
        several = npy(client.post(base, json={"seeds": [5, 3, 9], "truncation": 0.4, "format": "npy"}))
        alone = npy(client.post(base, json={"seed": 3, "class": 1, "truncation": 0.4, "format": "npy"}))
        assert np.array_equal(several[1], alone[0])
        # the v2 tensor path runs the port's inputs and gives the port's image
        truncation, z, label, stats, image = next(cases(expected))
        body = {"inputs": [{"name": "z", "shape": list(z.shape), "datatype": "FP32", "data": z.ravel().tolist()},
                           {"name": "label", "shape": [len(label)], "datatype": "INT64", "data": label.tolist()},
                           {"name": "truncation_stats", "shape": list(stats.shape), "datatype": "FP32", "data": stats.ravel().tolist()}]}
        served = client.post("/v2/models/biggan/infer", json=body)
        assert served.status_code == 200, served.text
        tensor = np.asarray(served.json()["outputs"][0]["data"], np.float32).reshape(image.shape)
        assert np.abs(tensor - image.numpy()).max() <= REFERENCE_TOLERANCE
        for bad in ({"seed": 1, "truncation": 0}, {"seed": 1, "truncation": 1.5}, {"seed": 1, "class": "zebra"}, {"seed": 1, "truncation_psi": 0.5}):
            answer = client.post(base, json=bad)
            assert answer.status_code == 422 and "error" in answer.json(), bad
        detail = client.get("/v1/models/biggan").json()["versions"][0]
        assert detail["state"] == "ready" and detail["class_names"] == CLASSES


def broken_copy(tmp_path: Path, edit_config=None, edit_state=None, drop: str | None = None) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(FIXTURE, folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if edit_state:
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
        edit_state(state)
        torch.save(state, folder / "pytorch_model.bin")
    if drop:
        (folder / drop).unlink()
    return folder


def fresh_spectral_vectors(state: dict) -> None:
    """u and v as a fresh spectral_norm draws them: what makes the port output NaN."""
    generator = torch.Generator().manual_seed(0)
    for key in [k for k in state if k.endswith(".weight_u") or k.endswith(".weight_v")]:
        state[key] = torch.nn.functional.normalize(torch.randn(state[key].shape, generator=generator), dim=0)


BAD_FOLDERS = [
    ("weights missing", dict(drop="pytorch_model.bin"), "pytorch_model.bin is missing"),
    ("more upsampling than output_dim", dict(edit_config=lambda c: c.update(output_dim=64)), "output_dim says 64"),
    ("wider than its tensors", dict(edit_config=lambda c: c.update(channel_width=8)), "configuration gives"),
    ("another class count", dict(edit_config=lambda c: c.update(num_classes=7)), "configuration gives"),
    ("never power-iterated", dict(edit_state=fresh_spectral_vectors), "saved before any power iteration"),
    ("a tensor missing", dict(edit_state=lambda s: s.pop("generator.bn.bias")), "has no generator.bn.bias"),
]


@pytest.mark.parametrize("case,make,mentions", BAD_FOLDERS, ids=[c[0] for c in BAD_FOLDERS])
def test_a_bad_biggan_checkpoint_is_a_one_line_error_and_no_entry(tmp_path, case, make, mentions):
    result = run_import(tmp_path, broken_copy(tmp_path, **make), "bad", "--format", "biggan")
    assert result.exit_code == 1, result.output
    assert mentions in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "repo" / "bad").exists()


def write_config(text: str):
    def edit(tmp_path: Path) -> Path:
        folder = broken_copy(tmp_path)
        (folder / "config.json").write_text(text)
        return folder
    return edit


@pytest.mark.parametrize("case,make,mentions", [
    ("config not JSON", write_config("{layers: oops"), "config.json is not JSON"),
    ("config of another model", write_config('{"hidden_size": 768}'), "config.json is not a BigGAN configuration"),
    ("weights file given, config not JSON", lambda tmp: write_config("[")(tmp) / "pytorch_model.bin", "config.json is not JSON"),
], ids=lambda c: c if isinstance(c, str) else "")
def test_a_biggan_layout_with_a_bad_config_is_named_as_such_when_the_format_is_detected(tmp_path, case, make, mentions):
    """The folder layout says BigGAN, so the config's fault is reported, not a guess at another format's."""
    result = run_import(tmp_path, make(tmp_path), "bad")
    assert result.exit_code == 1 and mentions in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
