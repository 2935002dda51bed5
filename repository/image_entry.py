"""Writing a `translation` or `super_resolution` entry: one fully convolutional graph with dynamic
batch, height and width axes (ONNX + TorchScript), parity-checked at a square size and at a second,
non-square size that the trace never saw (so a graph that froze its spatial shape fails here, not
in the service). Shared by the export of our own image-to-image runs and the import of
pix2pix/CycleGAN and super-resolution checkpoints.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from repository.entries import check_export_request, write_entry
from repository.graphs import EAGER_FORMAT, PARITY_TOLERANCE, Graph, TensorSpec, export_graph

PARITY_IMAGES = 16
SAMPLE_GAP = 4  # pixels between a sample's input and output
SR_SAMPLE_SIDE = 64  # an upscaler's sample input: the photo at 64², shown beside its x2/x4 output
TRANSLATION_SAMPLE_MAX_SIDE = 256  # a translator's: its training size, at most this (one forward pass on the CPU)


def parity_images(channels: int, height: int, width: int, count: int, seed: int) -> torch.Tensor:
    """Smooth random images in [-1, 1] (blurred noise: closer to real inputs than white noise)."""
    noise = torch.rand(count, channels, max(2, height // 4), max(2, width // 4), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)


def sample_pair(generator: torch.nn.Module, fields: dict) -> bytes:
    """samples.png of an imported translator or upscaler (the playground's gallery showed "no
    samples" for every imported image model): scikit-image's astronaut photo at the network's
    training size (an upscaler: at 64²), and the network's output beside it, the input shown at
    the output's size."""
    import skimage.data

    multiple, scale = fields["size_multiple"], fields["scale"]
    side = SR_SAMPLE_SIDE if fields["kind"] == "super_resolution" else min(fields["train_resolution"], TRANSLATION_SAMPLE_MAX_SIDE)
    side = max(side, multiple, fields.get("size_requirements", {}).get("minimum") or 1)
    side = -(-side // multiple) * multiple
    photo = np.array(Image.fromarray(skimage.data.astronaut()).resize((side, side), Image.Resampling.BICUBIC))  # (writable: torch warns)
    x = torch.from_numpy(photo).permute(2, 0, 1).float()[None] / 127.5 - 1
    if fields["in_channels"] == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    low, high = fields["value_range"]
    with torch.no_grad():
        y = generator.float().cpu().eval()(x)[0]
    output = ((y.clamp(low, high) - low) / (high - low) * 255).round().byte().permute(1, 2, 0).numpy()
    output = np.repeat(output, 3, axis=2) if output.shape[2] == 1 else output
    shown = np.asarray(Image.fromarray(photo).resize((side * scale, side * scale), Image.Resampling.NEAREST))
    if fields["in_channels"] == 1:
        shown = np.repeat(np.asarray(Image.fromarray(shown).convert("L"))[..., None], 3, axis=2)
    canvas = np.full((side * scale, 2 * side * scale + SAMPLE_GAP, 3), 255, np.uint8)
    canvas[:, : side * scale], canvas[:, side * scale + SAMPLE_GAP :] = shown, output
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, "PNG")
    return buffer.getvalue()


def translator_graph(generator: torch.nn.Module, fields: dict, parity_side: int | None = None) -> Graph:
    """The graph and its parity inputs: `parity_side` (default: the training size in input pixels)
    and a non-square size a few multiples larger."""
    multiple, channels = fields["size_multiple"], fields["in_channels"]
    side = parity_side or max(fields["train_resolution"] // fields["scale"], 2 * multiple)  # no axis of size 1 inside: export would specialise it
    side = -(-side // multiple) * multiple
    example = parity_images(channels, side, side, PARITY_IMAGES, seed=0)
    step = multiple * max(1, 8 // multiple)
    other = parity_images(channels, side + step, side + 2 * step, 2, seed=1)
    inputs = [TensorSpec("image", "float32", [-1, channels, -1, -1])]
    outputs = [TensorSpec("output", "float32", [-1, fields["channels"], -1, -1])]
    return Graph("model", generator, (example,), inputs, outputs, size_multiple=multiple, other_sizes=((other,),))


def write_image_entry(generator: torch.nn.Module, fields: dict, name: str, version: int, repository: Path, formats: list[str],
                      provenance: dict, tolerance: float = PARITY_TOLERANCE, parity_side: int | None = None,
                      metrics: str = "{}", samples: bytes | None = None) -> Path:
    """Writes `repository/name/version/`. `fields` holds the entry's kind, arch, channels, in_channels,
    size_multiple, scale, train_resolution and value_range, `model` (what
    `models.zoo.build_translator` rebuilds it from) and any extra spec keys (domains, norm, tiling…);
    `provenance` is merged in as is (`training` for our runs, `source` for imports)."""
    check_export_request(formats, version)
    generator = generator.float().cpu().eval()
    graph = translator_graph(generator, fields, parity_side)

    def fill(staging: Path) -> None:
        save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(staging / "model.safetensors"))
        block = export_graph(graph, staging, formats, tolerance, tuple(fields["value_range"]))
        entry = {"name": name, "version": version, **fields,
                 "inputs": block["inputs"], "outputs": block["outputs"],
                 "formats": block["formats"] | EAGER_FORMAT, "half_precision": block["half_precision"],
                 **provenance, "metrics_file": "metrics.json",
                 "parity": {"images": PARITY_IMAGES, "size": list(graph.example[0].shape[-2:]), "other_size": list(graph.other_sizes[0][0].shape[-2:]),
                            "tolerance": tolerance},
                 "eval_mode": "batch norm uses running statistics; instance norm the input's own; dropout is off (deterministic output)"}
        (staging / "spec.json").write_text(json.dumps(entry, indent=2))
        (staging / "metrics.json").write_text(metrics)
        if samples:
            (staging / "samples.png").write_bytes(samples)

    return write_entry(repository, name, version, fill)
