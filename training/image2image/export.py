"""Export of translation and super-resolution runs: one fully convolutional graph with dynamic
batch, height and width axes (ONNX + TorchScript), rebuilt from the run's saved config in eval mode.

Eval mode matters twice: batch norm uses its running statistics (one request's output never
depends on the rest of its batch) and the U-Net's dropout is off (the same image in gives the same
image out). Parity is checked at the training size and at a second, non-square size that the
trace never saw, so a graph that froze its spatial shape fails here, not in the service.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from training.checkpoint import load_checkpoint
from repository.entries import check_export_request, write_entry
from repository.graphs import PARITY_TOLERANCE, ExportError, Graph, TensorSpec, export_graph
from training.image2image.config import KIND_FOR_TASK, I2IConfig
from models.zoo import build_translator

PARITY_IMAGES = 16


def load_translator(run_dir: Path, checkpoint: str = "last") -> tuple[torch.nn.Module, dict, I2IConfig]:
    """The served generator of an image-to-image run (`last`, or `l1` for an SR run's L1 model)."""
    path = run_dir / "checkpoints" / f"{checkpoint}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: has {run_dir} been trained (checkpoints: last, or l1 for SR)?")
    meta = json.loads(path.with_suffix(".json").read_text())
    spec, cfg = meta["spec"], I2IConfig.model_validate(meta["config"])
    generator = build_translator(spec["generator"])
    load_checkpoint(path, {"G": generator})
    return generator.float().eval(), spec, cfg


def parity_images(spec: dict, channels: int, height: int, width: int, count: int, seed: int) -> torch.Tensor:
    """Smooth random images in [-1, 1] (blurred noise: closer to real inputs than white noise)."""
    noise = torch.rand(count, channels, max(2, height // 4), max(2, width // 4), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)


def translator_graph(generator: torch.nn.Module, spec: dict) -> Graph:
    multiple, channels = spec["size_multiple"], spec["in_channels"]
    side = max(spec["train_resolution"] // spec["scale"], 2 * multiple)  # no axis of size 1 inside: export would specialise it
    example = parity_images(spec, channels, side, side, PARITY_IMAGES, seed=0)
    other = parity_images(spec, channels, side + multiple * max(1, 8 // multiple), side + 2 * multiple * max(1, 8 // multiple), 2, seed=1)
    inputs = [TensorSpec("image", "float32", [-1, channels, -1, -1])]
    outputs = [TensorSpec("output", "float32", [-1, spec["out_channels"], -1, -1])]
    return Graph("model", generator, (example,), inputs, outputs, size_multiple=multiple, other_sizes=((other,),))


def export_i2i_run(run_dir: Path, name: str, version: int, repository: Path, formats: list[str], checkpoint: str = "last",
                   tolerance: float = PARITY_TOLERANCE) -> Path:
    check_export_request(formats, version)
    generator, spec, cfg = load_translator(run_dir, checkpoint)
    graph = translator_graph(generator, spec)

    def fill(staging: Path) -> None:
        save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(staging / "model.safetensors"))
        block = export_graph(graph, staging, formats, tolerance)
        entry = {
            "name": name,
            "version": version,
            "kind": KIND_FOR_TASK[spec["task"]],
            "arch": spec["generator"]["generator"],
            "task": spec["task"],
            "channels": spec["out_channels"],
            "in_channels": spec["in_channels"],
            "size_multiple": spec["size_multiple"],
            "scale": spec["scale"],
            "train_resolution": spec["train_resolution"],
            "domains": spec.get("domains"),
            "value_range": spec["value_range"],
            "inputs": block["inputs"],
            "outputs": block["outputs"],
            "formats": block["formats"] | {"eager": {"file": "model.safetensors", "parity_max_abs_error": 0.0}},
            "model": spec["generator"],
            "training": {"config": cfg.model_dump(), "checkpoint": checkpoint, "run_dir": str(run_dir)},
            "metrics_file": "metrics.json",
            "parity": {"images": PARITY_IMAGES, "other_size": list(graph.other_sizes[0][0].shape[-2:]), "tolerance": tolerance},
            "eval_mode": "batch norm uses running statistics; dropout is off (deterministic output)",
        }
        (staging / "spec.json").write_text(json.dumps(entry, indent=2))
        metrics = run_dir / "metrics.json"
        (staging / "metrics.json").write_text(metrics.read_text() if metrics.exists() else "{}")
        samples = sorted((run_dir / "samples").glob("*.png"))
        if samples:
            (staging / "samples.png").write_bytes(samples[-1].read_bytes())

    if spec.get("task") not in KIND_FOR_TASK:
        raise ExportError(f"{run_dir} is not an image-to-image run")
    return write_entry(repository, name, version, fill)


def is_i2i_run(run_dir: Path) -> bool:
    config = run_dir / "config.json"
    return config.exists() and "task" in json.loads(config.read_text())

