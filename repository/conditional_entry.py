"""Writing a `conditional` entry for an imported class-conditional generator (BigGAN-deep): one
graph (z, label, truncation_stats) → image with parity, the weights for the eager runtime, a sample
grid and a `spec.json` that says where the model came from and how its truncation works.

BigGAN's truncation is not StyleGAN's ψ: z is drawn from a normal truncated to ±2 and scaled by
the truncation t ∈ (0, 1], and the batch-norm statistics are those stored for t
(`models.biggan`). The spec's `truncation` block tells the service to do both.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from models.biggan import Z_BOUND, truncated_latent, truncation_stats_weights
from models.spec import ModelSpec
from repository.entries import check_export_request, write_entry
from repository.graphs import EAGER_FORMAT, PARITY_SEEDS, PARITY_TOLERANCE, Graph, TensorSpec, export_graph
from repository.style_entry import save_sample_grid

DEFAULT_TRUNCATION = 1.0
PARITY_TRUNCATIONS = (1.0, 0.75, 0.4, 0.3, 0.05)  # grid points and values between them, cycled over the parity seeds
SAMPLE_SEEDS = list(range(16))


def biggan_inputs(spec: ModelSpec, seeds: list[int], truncations: list[float]) -> tuple[torch.Tensor, ...]:
    """(z, label, truncation_stats) per seed, drawn as the service draws them; classes cycle."""
    n_stats = spec.options["n_stats"]
    z = torch.stack([truncated_latent(seed, spec.z_dim, t) for seed, t in zip(seeds, truncations)])
    labels = torch.arange(len(seeds)) % spec.num_classes
    stats = torch.tensor([truncation_stats_weights(t, n_stats) for t in truncations], dtype=torch.float32)
    return z, labels, stats


def write_conditional_entry(generator: nn.Module, spec: ModelSpec, name: str, version: int, repository: Path, formats: list[str],
                            source: dict, tolerance: float = PARITY_TOLERANCE) -> Path:
    """Writes `repository/name/version/` for a BigGAN-deep generator; raises ExportError on parity failure."""
    check_export_request(formats, version)
    generator = generator.float().cpu().eval()
    n_stats = spec.options["n_stats"]
    started = time.perf_counter()

    def fill(staging: Path) -> None:
        save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(staging / "model.safetensors"))
        truncations = [PARITY_TRUNCATIONS[i % len(PARITY_TRUNCATIONS)] for i in range(len(PARITY_SEEDS))]
        inputs = [TensorSpec("z", "float32", [-1, spec.z_dim]), TensorSpec("label", "int64", [-1]),
                  TensorSpec("truncation_stats", "float32", [-1, n_stats])]
        image = TensorSpec("image", "float32", [-1, spec.channels, spec.resolution, spec.resolution])
        block = export_graph(Graph("model", generator, biggan_inputs(spec, PARITY_SEEDS, truncations), inputs, [image]), staging, formats, tolerance,
                             (-1.0, 1.0))
        with torch.no_grad():  # a few images at a time: a 512² BigGAN-deep holds gigabytes of activations per batch
            sample_inputs = biggan_inputs(spec, SAMPLE_SEEDS, [DEFAULT_TRUNCATION] * len(SAMPLE_SEEDS))
            samples = torch.cat([generator(*chunk) for chunk in zip(*(x.split(4) for x in sample_inputs))])
        save_sample_grid(samples, staging / "samples.png")
        entry = {
            "name": name, "version": version, "kind": "conditional", "arch": spec.arch, "resolution": spec.resolution,
            "channels": spec.channels, "value_range": [-1.0, 1.0], "z_dim": spec.z_dim, "class_names": spec.class_names,
            "inputs": block["inputs"], "outputs": block["outputs"],
            "formats": block["formats"] | EAGER_FORMAT, "half_precision": block["half_precision"],
            "model": spec.to_dict(),
            "truncation": {"method": "biggan", "z_bound": Z_BOUND, "n_stats": n_stats, "default": DEFAULT_TRUNCATION},
            "source": source | {"imported_seconds": round(time.perf_counter() - started, 2)},
            "metrics_file": "metrics.json", "parity": {"seeds": PARITY_SEEDS, "truncations": truncations, "tolerance": tolerance},
        }
        (staging / "spec.json").write_text(json.dumps(entry, indent=2))
        (staging / "metrics.json").write_text("{}")

    return write_entry(repository, name, version, fill)
