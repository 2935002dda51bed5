"""`ganserve import` of pix2pix/CycleGAN generators (junyanz/pytorch-CycleGAN-and-pix2pix state
dicts): generator, depth, width, norm and dropout are read off the tensors, the imported network
reproduces the reference's own eval-mode output, the entry serves `/translate` and the v2 tensor
path at sizes other than the training size, and a bad checkpoint is a one-line error with no entry."""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from ganserve_cli import app
from repository.importers.junyanz import import_junyanz
from service.uploads import to_model_input
from tests.serving import running_server

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "junyanz"
CONFIGS = json.loads((FIXTURE / "configs.json").read_text())
TOLERANCE = 1e-4


def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference.safetensors"))


def run_import(tmp_path: Path, checkpoint: Path, name: str, *options: str):
    return CliRunner().invoke(app, ["import", str(checkpoint), "--name", name, "--version", "1", "--repository", str(tmp_path / "repo"), *options])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_layout_is_read_off_the_state_dict_and_reproduces_the_reference(config):
    generator, params = import_junyanz((FIXTURE / f"{config}.pth").read_bytes())
    described = CONFIGS[config]
    depth_key = "n_blocks" if described["generator"] == "resnet" else "num_downs"
    assert (params["generator"], params[depth_key], params["ngf"], params["norm"]) == (
        described["generator"], described["depth"], described["ngf"], described["norm"])
    if described["generator"] == "resnet":
        assert params["dropout"] == described["dropout"]
    expected = reference()
    with torch.no_grad():
        output = generator(expected[f"{config}.input"])
    assert (output - expected[f"{config}.output"]).abs().max() <= TOLERANCE


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("junyanz")
    for config in ("resnet6_instance", "unet128_batch"):
        result = run_import(root, FIXTURE / f"{config}.pth", config, "--options", "train_resolution=64,domains=sketch:photo")
        assert result.exit_code == 0, result.output
    return root / "repo"


def test_import_writes_a_translation_entry_that_says_what_was_inferred(imported):
    spec = json.loads((imported / "resnet6_instance" / "1" / "spec.json").read_text())
    assert spec["kind"] == "translation" and spec["arch"] == "resnet" and spec["size_multiple"] == 4 and spec["norm"] == "instance"
    assert spec["domains"] == ["sketch", "photo"] and spec["direction"] == "AtoB" and spec["tiling"] == "whole image"
    assert spec["source"]["format"] == "junyanz" and spec["source"]["hyperparameters"]["inferred"]["n_blocks"] == 6
    assert all(info["parity_max_abs_error"] <= 1e-4 for name, info in spec["formats"].items() if name != "eager")
    unet = json.loads((imported / "unet128_batch" / "1" / "spec.json").read_text())
    assert unet["size_multiple"] == 128 and unet["norm"] == "batch"
    # the gallery's samples.png (imported image models had none): the photo at the training size and its translation beside it
    assert Image.open(imported / "resnet6_instance" / "1" / "samples.png").size == (2 * 64 + 4, 64)
    assert Image.open(imported / "unet128_batch" / "1" / "samples.png").size == (2 * 128 + 4, 128)  # (at least one U-Net multiple)


def test_an_import_over_an_existing_entry_is_refused_unless_replace_is_asked_and_shows_its_steps(imported, tmp_path):
    """Importing another checkpoint under a name and version already taken replaced the entry
    without a word (a super-resolution model over a translator; a server polling the repository
    swaps it in); and a long import showed nothing of what it was doing (a StyleGAN3: 15 minutes)."""
    import shutil

    shutil.copytree(imported, tmp_path / "repo")
    refused = run_import(tmp_path, FIXTURE / "unet128_batch.pth", "resnet6_instance")
    assert refused.exit_code == 2 and "already holds a 'translation' entry" in refused.output and "--replace" in refused.output
    assert json.loads((tmp_path / "repo" / "resnet6_instance" / "1" / "spec.json").read_text())["arch"] == "resnet"
    replaced = run_import(tmp_path, FIXTURE / "unet128_batch.pth", "resnet6_instance", "--replace", "--options", "train_resolution=64")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((tmp_path / "repo" / "resnet6_instance" / "1" / "spec.json").read_text())["arch"] == "unet"
    for step in ("exporting model: TorchScript", "exporting model: ONNX", "checking model: onnx and torchscript", "measuring model in bf16"):
        assert step in replaced.output, replaced.output


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_server_translates_with_imported_generators_as_the_reference_does(imported):
    expected = reference()
    generators = {config: import_junyanz((FIXTURE / f"{config}.pth").read_bytes())[0] for config in ("resnet6_instance", "unet128_batch")}
    rng = np.random.default_rng(0)
    with running_server(imported) as server, server.client() as client:
        for config, generator in generators.items():
            # the raw tensor path: the reference's own input and output, at the fixture's (non-training) size
            x = expected[f"{config}.input"]
            body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
            served = client.post(f"/v2/models/{config}/infer", json=body)
            assert served.status_code == 200, served.text
            tensor = np.asarray(served.json()["outputs"][0]["data"], np.float32).reshape(x.shape)
            assert np.abs(tensor - expected[f"{config}.output"].numpy()).max() <= TOLERANCE
            # an upload: mirror-padded to the size multiple, translated whole, cropped back to its own size
            pixels = rng.integers(0, 256, (72, 100, 3), dtype=np.uint8)
            response = client.post(f"/v1/models/{config}/translate?format=npy", content=png_bytes(pixels), headers={"content-type": "image/png"})
            assert response.status_code == 200, response.text
            got = np.load(io.BytesIO(response.content))
            assert got.shape == (1, 72, 100, 3)
            multiple = 4 if config.startswith("resnet") else 128
            padded = np.pad(to_model_input(pixels, 3), ((0, 0), (0, -(-72 // multiple) * multiple - 72), (0, -(-100 // multiple) * multiple - 100)), mode="symmetric")
            with torch.no_grad():
                want = generator(torch.from_numpy(padded)[None])[0, :, :72, :100]
            want = np.clip(np.rint((want.numpy().transpose(1, 2, 0) + 1) * 127.5), 0, 255)
            assert np.abs(got[0].astype(int) - want.astype(int)).max() <= 1


def truncated(tmp_path: Path) -> Path:
    path = tmp_path / "cut.pth"
    path.write_bytes((FIXTURE / "resnet6_instance.pth").read_bytes()[:3000])
    return path


def unknown_architecture(tmp_path: Path) -> Path:
    path = tmp_path / "other.pth"
    torch.save({"conv_first.weight": torch.zeros(4, 3, 3, 3), "body.0.rdb1.conv1.weight": torch.zeros(4, 4, 3, 3)}, path)
    return path


def code_archive(tmp_path: Path) -> Path:
    """A torch.save archive whose pickle calls os.system when loaded by an ordinary unpickler."""
    path = tmp_path / "evil.pth"
    torch.save({"model.model.0.weight": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    payload = b"\x80\x02cos\nsystem\n" + b"(" + pickle.dumps("touch /tmp/ganserve-pwned", protocol=2)[2:-1] + b"tR."
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in members.items():
            archive.writestr(member, payload if member.endswith("data.pkl") else content)
    return path


BAD = [
    ("unknown architecture", unknown_architecture, (), "not a pix2pix/CycleGAN generator"),
    ("truncated file", truncated, (), "damaged or truncated"),
    ("pickle with code", code_archive, (), "never loads (it calls os.system)"),  # named, without torch's advice to load it unsafely
    ("shapes contradict --options", lambda tmp: FIXTURE / "resnet6_instance.pth", ("--options", "ngf=64"), "tensors make it 8"),
    ("unknown option", lambda tmp: FIXTURE / "resnet6_instance.pth", ("--options", "colour=blue"), "unknown --options"),
]


@pytest.mark.parametrize("case,make,options,mentions", BAD, ids=[c[0] for c in BAD])
def test_a_bad_translator_checkpoint_is_a_one_line_error_and_no_entry(tmp_path, case, make, options, mentions):
    result = run_import(tmp_path, make(tmp_path), "bad", "--format", "junyanz", *options)
    assert result.exit_code == 1, result.output
    assert mentions in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "repo" / "bad").exists()
    assert not Path("/tmp/ganserve-pwned").exists()
