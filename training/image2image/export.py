"""Export of translation and super-resolution runs (the entry itself: repository/image_entry.py),
rebuilt from the run's saved config in eval mode.

Eval mode matters twice: batch norm uses its running statistics (one request's output never
depends on the rest of its batch) and the U-Net's dropout is off (the same image in gives the same
image out).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from models.zoo import build_translator
from repository.entries import check_export_request
from repository.graphs import PARITY_TOLERANCE, ExportError
from repository.image_entry import write_image_entry
from training.checkpoint import load_checkpoint
from training.image2image.config import KIND_FOR_TASK, I2IConfig


def load_translator(run_dir: Path, checkpoint: str = "last") -> tuple[torch.nn.Module, dict, I2IConfig]:
    """The served generator of an image-to-image run (`best`, `last`, or `l1` for an SR run's L1 model)."""
    path = run_dir / "checkpoints" / f"{checkpoint}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: has {run_dir} been trained (checkpoints: best, last, or l1 for SR)?")
    meta = json.loads(path.with_suffix(".json").read_text())
    spec, cfg = meta["spec"], I2IConfig.model_validate(meta["config"])
    generator = build_translator(spec["generator"])
    load_checkpoint(path, {"G": generator})
    return generator.float().eval(), spec, cfg


def export_i2i_run(run_dir: Path, name: str, version: int, repository: Path, formats: list[str], checkpoint: str = "last",
                   tolerance: float = PARITY_TOLERANCE) -> Path:
    check_export_request(formats, version)
    generator, spec, cfg = load_translator(run_dir, checkpoint)
    if spec.get("task") not in KIND_FOR_TASK:
        raise ExportError(f"{run_dir} is not an image-to-image run")
    fields = {"kind": KIND_FOR_TASK[spec["task"]], "arch": spec["generator"]["generator"], "task": spec["task"], "channels": spec["out_channels"],
              "in_channels": spec["in_channels"], "size_multiple": spec["size_multiple"], "scale": spec["scale"],
              "train_resolution": spec["train_resolution"], "domains": spec.get("domains"), "value_range": spec["value_range"],
              "model": spec["generator"]}
    metrics = run_dir / "metrics.json"
    samples = sorted((run_dir / "samples").glob("*.png"))
    return write_image_entry(generator, fields, name, version, repository, formats,
                             {"training": {"config": cfg.model_dump(), "checkpoint": checkpoint, "run_dir": str(run_dir)}}, tolerance,
                             metrics=metrics.read_text() if metrics.exists() else "{}", samples=samples[-1].read_bytes() if samples else None)


def is_i2i_run(run_dir: Path) -> bool:
    config = run_dir / "config.json"
    return config.exists() and "task" in json.loads(config.read_text())

