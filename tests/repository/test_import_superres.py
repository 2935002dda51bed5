"""`ganserve import` of super-resolution checkpoints through spandrel: state dicts in each real
layout are built here with spandrel's own architecture classes (random weights; the newer BasicSR
key layout written out from the old one, as Real-ESRGAN publishes it), imported with the real
command, served, and compared with spandrel's own forward on the same input."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel import ModelLoader
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SPAN import SPAN
from typer.testing import CliRunner

from ganserve_cli import app
from tests.parallel import run_two_at_a_time
from tests.repository.test_import_junyanz import code_archive
from tests.serving import running_server

TOLERANCE = 1e-4  # the bound against spandrel's forward, before quantisation


def randomised(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of a trained-looking scale (biases and PReLU slopes included)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point():
            fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
            state[name] = torch.randn(tensor.shape, generator=generator) * (0.5 / fan_in**0.5 if tensor.ndim > 1 else 0.05)
        else:
            state[name] = tensor
    return state


def basicsr_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ESRGAN's original keys → the BasicSR/Real-ESRGAN names (conv_first, body.N.rdbM.convK, …)."""
    blocks = max(int(m.group(1)) for k in old if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))) + 1
    upconvs = sorted({int(m.group(1)) for k in old if (m := re.match(r"model\.(\d+)\.", k)) and int(m.group(1)) >= 3})
    names = {"0": "conv_first", f"1.sub.{blocks}": "conv_body", str(upconvs[-2]): "conv_hr", str(upconvs[-1]): "conv_last"}
    names |= {str(3 * (i + 1)): f"conv_up{i + 1}" for i in range(len(upconvs) - 2)}
    new = {}
    for key, value in old.items():
        if m := re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            new[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        else:
            owner, leaf = key.removeprefix("model.").rsplit(".", 1)
            new[f"{names[owner]}.{leaf}"] = value
    return new


def esrgan_old() -> dict:
    return randomised(ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=2, scale=4), 0)


CHECKPOINTS = {
    # name: (file suffix, state dict maker, scale, input size)
    "esrgan-old": (".pth", esrgan_old, 4, (20, 28)),
    "realesrgan-x4": (".pth", lambda: {"params_ema": basicsr_layout(esrgan_old())}, 4, (20, 28)),
    "realesrgan-x2": (".pth", lambda: {"params_ema": basicsr_layout(randomised(ESRGAN(in_nc=12, out_nc=3, num_filters=8, num_blocks=1, scale=4, shuffle_factor=2), 1))},
                      2, (20, 28)),
    "compact-x4": (".safetensors", lambda: randomised(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=4, upscale=4), 2), 4, (21, 30)),
    "span-x4": (".pth", lambda: randomised(SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=4), 3), 4, (21, 30)),
}


def write_checkpoint(folder: Path, name: str) -> Path:
    suffix, make, _, _ = CHECKPOINTS[name]
    path = folder / f"{name}{suffix}"
    state = make()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def run_import(tmp_path: Path, checkpoint: Path, name: str, *options: str):
    return CliRunner().invoke(app, ["import", str(checkpoint), "--name", name, "--version", "1", "--repository", str(tmp_path / "repo"), *options])


def import_checkpoint(root: Path, checkpoint: Path, name: str) -> tuple[int, str]:
    """(exit code, output) of the real command on one checkpoint."""
    result = run_import(root, checkpoint, name)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each checkpoint imported with the real command, two at a time (an import's export and
    parity check at the default tile, 96 px in at x4, take ~25 s)."""
    root = tmp_path_factory.mktemp("superres")
    paths = {name: write_checkpoint(root, name) for name in CHECKPOINTS}
    results = run_two_at_a_time([(import_checkpoint, (root, path, name)) for name, path in paths.items()])
    for exit_code, output in results:
        assert exit_code == 0, output
    return root / "repo", paths


def test_each_architecture_is_detected_with_its_scale_and_size_rules(imported):
    repo, _ = imported
    specs = {name: json.loads((repo / name / "1" / "spec.json").read_text()) for name in CHECKPOINTS}
    assert {name: (spec["arch"], spec["scale"]) for name, spec in specs.items()} == {
        "esrgan-old": ("ESRGAN", 4), "realesrgan-x4": ("ESRGAN", 4), "realesrgan-x2": ("ESRGAN", 2), "compact-x4": ("Compact", 4), "span-x4": ("SPAN", 4)}
    assert specs["realesrgan-x2"]["size_multiple"] == 4 and specs["realesrgan-x2"]["in_channels"] == 3  # pixel-unshuffle input
    for spec in specs.values():
        assert spec["kind"] == "super_resolution" and spec["source"]["format"] == "superres"
        assert spec["tiling"]["tile"] % spec["size_multiple"] == 0
        assert all(info["parity_max_abs_error"] <= 1e-4 for name, info in spec["formats"].items() if name != "eager")
        samples = Image.open(repo / spec["name"] / "1" / "samples.png")  # the photo at 64² beside its upscale (the gallery had none)
        assert samples.size == (2 * 64 * spec["scale"] + 4, 64 * spec["scale"])


def test_served_outputs_equal_spandrels_forward_and_uploads_come_back_scaled(imported):
    repo, paths = imported
    rng = np.random.default_rng(0)
    with running_server(repo) as server, server.client() as client:
        for name, (_, _, scale, (height, width)) in CHECKPOINTS.items():
            descriptor = ModelLoader().load_from_file(paths[name])
            x01 = torch.from_numpy(rng.random((1, 3, height, width), dtype=np.float32))
            with torch.no_grad():
                expected = descriptor(x01.clone())  # spandrel pads to its size rules itself and crops back
            x = (x01 * 2 - 1).numpy()  # the v2 path takes the graph's size rules as they are (the sizes above keep them)
            body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
            served = client.post(f"/v2/models/{name}/infer", json=body)
            assert served.status_code == 200, served.text
            output = (np.asarray(served.json()["outputs"][0]["data"], np.float32).reshape(expected.shape) + 1) / 2
            assert np.abs(output - expected.numpy()).max() <= TOLERANCE, name
            pixels = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            upscaled = client.post(f"/v1/models/{name}/upscale?format=npy", content=buffer.getvalue(), headers={"content-type": "image/png"})
            assert upscaled.status_code == 200, upscaled.text
            assert np.load(io.BytesIO(upscaled.content)).shape == (1, 37 * scale, 45 * scale, 3)
            tile = client.get(f"/v1/models/{name}").json()["versions"][0]["serving"]["upscale_tile"]
            assert tile == json.loads((repo / name / "1" / "spec.json").read_text())["tiling"]["tile"]


def junk_state(tmp_path: Path) -> Path:
    path = tmp_path / "junk.pth"
    torch.save({"encoder.weight": torch.zeros(4, 3, 3, 3), "decoder.weight": torch.zeros(3, 4, 3, 3)}, path)
    return path


def truncated_safetensors(tmp_path: Path) -> Path:
    source = write_checkpoint(tmp_path, "compact-x4")
    path = tmp_path / "cut.safetensors"
    path.write_bytes(source.read_bytes()[:500])
    return path


def truncated_pth(tmp_path: Path) -> Path:
    source = write_checkpoint(tmp_path, "span-x4")
    path = tmp_path / "cut.pth"
    path.write_bytes(source.read_bytes()[:2000])
    return path


def nan_safetensors(tmp_path: Path) -> Path:
    """One NaN in a compact SR net: refused on reading, not by the export's parity check 10 s later."""
    _, make, _, _ = CHECKPOINTS["compact-x4"]
    state = {k: v.contiguous().clone() for k, v in make().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    return path


BAD = [
    ("unknown architecture", junk_state, "no super-resolution architecture spandrel knows"),
    ("NaN in the weights", nan_safetensors, "holds NaN or infinity"),
    ("truncated safetensors", truncated_safetensors, "damaged or truncated"),
    ("truncated archive", truncated_pth, "damaged or truncated"),
    ("pickle with code", code_archive, "never loads"),
]


def test_an_import_in_a_terminal_shows_its_error_alone_without_the_dry_runs_warnings(tmp_path):
    """What a user's terminal shows, stderr included (the runner above sees stdout, and pytest keeps
    warnings to itself): the dry run on meta tensors made torch warn once per tensor it kept real,
    17 warnings (34 lines) before this one-line error, 633 for a standard ESRGAN's import."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "ganserve_cli", "import", str(nan_safetensors(tmp_path)), "--name", "bad", "--format", "superres",
                          "--repository", str(tmp_path / "repo")], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and "holds NaN or infinity" in lines[0], lines[:6]


@pytest.mark.parametrize("case,make,mentions", BAD, ids=[c[0] for c in BAD])
def test_a_bad_super_resolution_checkpoint_is_a_one_line_error_and_no_entry(tmp_path, case, make, mentions):
    result = run_import(tmp_path, make(tmp_path), "bad", "--format", "superres")
    assert result.exit_code == 1, result.output
    assert mentions in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "repo" / "bad").exists()
