"""Writing a `style` entry from any style generator (an imported one): the mapping and synthesis
graphs with parity, `w_avg` and GANSpace-style PCA directions over W (`pc0…`), the weights for the
eager runtime, a sample grid and a `spec.json` that says where the model came from.

The layout is the one `ganserve export` writes for the project's own StyleGAN, so the service
cannot tell an imported model from a trained one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from models.latent import RANGE_NAMES, named_layers, seed_latents
from models.spec import ModelSpec
from repository.entries import check_export_request, write_entry
from repository.graphs import EAGER_FORMAT, PARITY_SEEDS, PARITY_TOLERANCE, Graph, TensorSpec, export_graph, progress

PCA_SAMPLES = 10_000
PCA_COMPONENTS = 10
SAMPLE_SEEDS = list(range(16))


def cycled_labels(spec: ModelSpec, count: int) -> torch.Tensor | None:
    """Classes 0, 1, 2, … in turn (as the service draws a conditional generator's images when no
    class is asked for), or None for an unconditional generator."""
    return torch.arange(count) % spec.num_classes if spec.num_classes else None


def mapping_inputs(spec: ModelSpec, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    labels = cycled_labels(spec, z.shape[0])
    return (z,) if labels is None else (z, labels)


@torch.no_grad()
def pca_directions(mapping: nn.Module, spec: ModelSpec, count: int = PCA_COMPONENTS, samples: int = PCA_SAMPLES) -> dict[str, torch.Tensor]:
    """GANSpace: the principal axes of W over `samples` fixed-seed z (all classes in turn, for a
    conditional generator), unit length, largest first; each signed so that its largest component
    is positive (the same checkpoint gives the same directions)."""
    z = torch.randn(samples, spec.z_dim, generator=torch.Generator().manual_seed(0))
    w = torch.cat([mapping(*mapping_inputs(spec, chunk)) for chunk in z.split(1000)])
    _, _, axes = torch.linalg.svd(w - w.mean(dim=0), full_matrices=False)  # axes: [w_dim, w_dim], rows by variance
    directions = {}
    for index, axis in enumerate(axes[: min(count, axes.shape[0])]):
        directions[f"pc{index}"] = (axis * torch.sign(axis[axis.abs().argmax()])).contiguous()
    return directions


def style_graphs(generator: nn.Module, spec: ModelSpec) -> list[Graph]:
    inputs = mapping_inputs(spec, seed_latents(spec.z_dim, PARITY_SEEDS))
    with torch.no_grad():
        w = generator.mapping(*inputs)
    ws = w[:, None, :].expand(-1, int(generator.num_ws), -1).contiguous()
    image = TensorSpec("image", "float32", [-1, spec.channels, spec.resolution, spec.resolution])
    mapping_specs = [TensorSpec("z", "float32", [-1, spec.z_dim])] + ([TensorSpec("label", "int64", [-1])] if spec.num_classes else [])
    return [Graph("model", generator.synthesis, (ws,), [TensorSpec("ws", "float32", [-1, ws.shape[1], spec.w_dim])], [image]),
            Graph("mapping", generator.mapping, inputs, mapping_specs, [TensorSpec("w", "float32", [-1, spec.w_dim])])]


def save_sample_grid(images: torch.Tensor, path: Path, columns: int = 4) -> None:
    """[N, C, H, W] in [-1, 1] → one PNG grid with 2 px gaps."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, h, w, c = pixels.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * (h + 2) + 2, columns * (w + 2) + 2, c), dtype=np.uint8)
    for i, picture in enumerate(pixels):
        r, col = divmod(i, columns)
        canvas[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = picture
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)


def write_style_entry(generator: nn.Module, spec: ModelSpec, name: str, version: int, repository: Path, formats: list[str],
                      source: dict, tolerance: float = PARITY_TOLERANCE) -> Path:
    """Writes `repository/name/version/` for a style generator with `.mapping`, `.synthesis`,
    `.w_avg` and `.num_ws`; `source` says where it came from. Raises ExportError on parity failure."""
    check_export_request(formats, version)
    generator = generator.float().cpu().eval()
    num_ws = int(generator.num_ws)
    started = time.perf_counter()

    def fill(staging: Path) -> None:
        save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(staging / "model.safetensors"))
        graphs = style_graphs(generator, spec)
        blocks = {graph.stem: export_graph(graph, staging, formats, tolerance, (-1.0, 1.0) if graph.stem == "model" else None) for graph in graphs}
        progress.info("directions: the principal axes of W over %d seeds' z", PCA_SAMPLES)
        directions = pca_directions(generator.mapping, spec)
        latents = {"w_avg": generator.w_avg.detach().clone().contiguous()} | {f"direction.{k}": v for k, v in directions.items()}
        save_file(latents, str(staging / "latents.safetensors"))
        progress.info("samples: %d images for samples.png", len(SAMPLE_SEEDS))
        with torch.no_grad():  # a few images at a time: large generators hold gigabytes of activations per batch
            inputs = mapping_inputs(spec, seed_latents(spec.z_dim, SAMPLE_SEEDS))
            samples = torch.cat([generator(*chunk) for chunk in zip(*(x.split(4) for x in inputs))])
        save_sample_grid(samples, staging / "samples.png")
        main = blocks["model"]
        entry = {
            "name": name, "version": version, "kind": "style", "arch": spec.arch, "resolution": spec.resolution, "channels": spec.channels,
            "value_range": [-1.0, 1.0], "z_dim": spec.z_dim, "w_dim": spec.w_dim, "num_ws": num_ws, "class_names": spec.class_names,
            "inputs": main["inputs"], "outputs": main["outputs"],
            "formats": main["formats"] | EAGER_FORMAT, "half_precision": main["half_precision"],
            "model": spec.to_dict(), "mapping": blocks["mapping"], "latents_file": "latents.safetensors",
            "directions": sorted(directions, key=lambda d: int(d[2:])),
            "layer_ranges": {r: named_layers(r, num_ws) for r in RANGE_NAMES} if num_ws >= 6 else {},
            "source": source | {"imported_seconds": round(time.perf_counter() - started, 2)},
            "metrics_file": "metrics.json", "parity": {"seeds": PARITY_SEEDS, "tolerance": tolerance},
        }
        (staging / "spec.json").write_text(json.dumps(entry, indent=2))
        (staging / "metrics.json").write_text("{}")

    return write_entry(repository, name, version, fill)
