"""`ganserve import` of rosinality stylegan2-pytorch checkpoints. rosinality's code needs its CUDA
ops to build, so the checkpoint is written here in its key layout and scale conventions (those
of its `model.py`: unscaled weights, 1/√fan_in and lr multipliers applied at run time, a
[1, out, in, k, k] conv weight, `noises.noise_k` buffers) from the NVlabs fixture, whose
reference outputs the import must then reproduce: the layout mapping is checked against an
independent implementation."""
from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ganserve_cli import app
from repository.importers.checkpoint import CheckpointError
from repository.importers.rosinality import import_rosinality

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "stylegan2_ada" / "skip32"
TOLERANCE = 1e-3


def rosinality_state(nvlabs: dict[str, torch.Tensor], resolutions: list[int]) -> dict[str, torch.Tensor]:
    """NVlabs G_ema tensors → rosinality's `g_ema` state dict (what its convert_weight.py does)."""
    state = {}
    mapping = sorted(int(k.split(".")[1][2:]) for k in nvlabs if k.startswith("mapping.fc") and k.endswith(".weight"))
    for index in mapping:  # both keep the raw weight and apply lr/√fan_in at run time
        state[f"style.{index + 1}.weight"] = nvlabs[f"mapping.fc{index}.weight"]
        state[f"style.{index + 1}.bias"] = nvlabs[f"mapping.fc{index}.bias"]
    state["input.input"] = nvlabs["synthesis.b4.const"][None]
    kernel = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(kernel, kernel) / 64

    def conv(theirs: str, ours: str, noise: int | None) -> None:
        state[f"{theirs}.conv.modulation.weight"] = nvlabs[f"{ours}.affine.weight"]
        state[f"{theirs}.conv.modulation.bias"] = nvlabs[f"{ours}.affine.bias"]
        weight = nvlabs[f"{ours}.weight"]
        if noise is None:  # ToRGB: both scale by 1/√fan_in at run time
            state[f"{theirs}.conv.weight"] = weight[None]
            state[f"{theirs}.bias"] = nvlabs[f"{ours}.bias"].reshape(1, -1, 1, 1)
            return
        state[f"{theirs}.conv.weight"] = (weight * math.sqrt(weight[0].numel()))[None]  # NVlabs' demodulated convs keep no gain
        state[f"{theirs}.noise.weight"] = nvlabs[f"{ours}.noise_strength"].reshape(1)
        state[f"{theirs}.activate.bias"] = nvlabs[f"{ours}.bias"]
        state[f"noises.noise_{noise}"] = nvlabs[f"{ours}.noise_const"][None, None]

    conv("conv1", "synthesis.b4.conv1", 0)
    conv("to_rgb1", "synthesis.b4.torgb", None)
    for level, res in enumerate(resolutions[1:]):
        conv(f"convs.{2 * level}", f"synthesis.b{res}.conv0", 2 * level + 1)
        conv(f"convs.{2 * level + 1}", f"synthesis.b{res}.conv1", 2 * level + 2)
        conv(f"to_rgbs.{level}", f"synthesis.b{res}.torgb", None)
        state[f"to_rgbs.{level}.upsample.kernel"] = kernel * 4
        state[f"convs.{2 * level}.conv.blur.kernel"] = kernel * 4
    return state


def checkpoint_bytes(with_latent_avg: bool = True, args: argparse.Namespace | None = None, edit=None) -> bytes:
    nvlabs = load_file(str(FIXTURE / "weights.safetensors"))
    state = rosinality_state(nvlabs, [4, 8, 16, 32])
    if edit:
        edit(state)
    archive = {"g_ema": state, "args": args or argparse.Namespace(size=32, latent=32, n_mlp=2, channel_multiplier=2, lr=0.002)}
    if with_latent_avg:
        archive["latent_avg"] = nvlabs["mapping.w_avg"]
    buffer = io.BytesIO()
    torch.save(archive, buffer)
    return buffer.getvalue()


def test_a_rosinality_checkpoint_reproduces_the_reference_generator():
    imported = import_rosinality(checkpoint_bytes())
    generator, expected = imported.generator, load_file(str(FIXTURE / "reference.safetensors"))
    with torch.no_grad():
        w = generator.mapping(expected["z"])
        image = generator.synthesis(expected["ws"])
    assert (w - expected["w"]).abs().max() <= TOLERANCE
    assert (image - expected["image"]).abs().max() <= TOLERANCE
    assert torch.equal(generator.w_avg, load_file(str(FIXTURE / "weights.safetensors"))["mapping.w_avg"])
    assert imported.hyperparameters["args"]["channel_multiplier"] == 2 and imported.hyperparameters["inferred"]["size"] == 32


def test_without_latent_avg_w_avg_is_the_mean_of_w():
    generator = import_rosinality(checkpoint_bytes(with_latent_avg=False)).generator
    with torch.no_grad():
        mean = generator.mapping(torch.randn(20_000, 32, generator=torch.Generator().manual_seed(5))).mean(dim=0)
    assert (generator.w_avg - mean).abs().max() < 0.05 * mean.abs().max()


def test_ganserve_import_detects_the_format_and_writes_an_entry_that_matches(tmp_path):
    path = tmp_path / "stylegan2.pt"
    path.write_bytes(checkpoint_bytes())
    result = CliRunner().invoke(app, ["import", str(path), "--name", "ros", "--version", "2", "--repository", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    entry = tmp_path / "repo" / "ros" / "2"
    spec = json.loads((entry / "spec.json").read_text())
    assert spec["source"]["format"] == "rosinality" and spec["model"]["options"]["channels"] == {"4": 32, "8": 32, "16": 32, "32": 16}
    expected = load_file(str(FIXTURE / "reference.safetensors"))
    image = ort.InferenceSession(str(entry / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"ws": expected["ws"].numpy()})[0]
    assert np.abs(image - expected["image"].numpy()).max() <= TOLERANCE


def wrong_shape(state: dict) -> None:
    state["convs.1.conv.weight"] = state["convs.1.conv.weight"][:, :, :-1]


def extra_tensor(state: dict) -> None:
    state["mystery.weight"] = torch.zeros(3)


@pytest.mark.parametrize("make,mentions", [
    (lambda: checkpoint_bytes(args=argparse.Namespace(size=64, latent=32, n_mlp=2)), "args say size=64"),
    (lambda: checkpoint_bytes(edit=wrong_shape), "configuration gives"),
    (lambda: checkpoint_bytes(edit=extra_tensor), "mystery.weight"),
    (lambda: checkpoint_bytes()[:4000], "damaged or truncated"),
])
def test_a_contradictory_or_broken_rosinality_checkpoint_is_refused(make, mentions):
    with pytest.raises(CheckpointError, match=mentions):
        import_rosinality(make())


def test_an_archive_that_pickles_code_is_refused():
    class Sneaky:
        def __reduce__(self):
            return (print, ("this ran",))

    buffer = io.BytesIO()
    torch.save({"g_ema": Sneaky()}, buffer)
    with pytest.raises(CheckpointError, match="never loads"):
        import_rosinality(buffer.getvalue())
