"""Loading a trained generator back from a run directory, to evaluate it or sample from it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from models.latent import seed_latents
from models.spec import ModelSpec
from models.zoo import build_generator
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.data import load_dataset
from training.evaluate import EVAL_SEED, evaluate_generator
from training.images import save_grid, save_scatter
from training.sampling import balanced_labels, generate, latents


class RunError(ValueError):
    """What a user asked of a trained run that it cannot give (a checkpoint name, a class)."""


def load_generator(run_dir: Path, checkpoint: str = "best") -> tuple[nn.Module, ModelSpec, TrainConfig]:
    """The EMA generator (or the raw one when EMA was off) from `best` or `last`."""
    if checkpoint not in ("best", "last"):
        raise RunError(f"checkpoint must be best or last, not {checkpoint!r}")
    path = run_dir / "checkpoints" / f"{checkpoint}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: has {run_dir} been trained?")
    meta = json.loads(path.with_suffix(".json").read_text())
    spec, cfg = ModelSpec.from_dict(meta["spec"]), TrainConfig.model_validate(meta["config"])
    generator = build_generator(spec)
    load_checkpoint(path, {"G_ema" if cfg.ema_beta > 0 else "G": generator})
    return generator.eval(), spec, cfg


def evaluate_run(run_dir: Path, checkpoint: str, num_samples: int, inception_weights: Path | None = None) -> dict:
    generator, spec, cfg = load_generator(run_dir, checkpoint)
    train, held_out = load_dataset(cfg.data)
    metrics = evaluate_generator(generator, spec, cfg.data, train, held_out, num_samples)
    if inception_weights is not None:
        metrics.update(standard_fid(generator, spec, train.x, num_samples, inception_weights))
    metrics_path = run_dir / "metrics.json"
    record = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    record["evaluation"] = {"checkpoint": checkpoint, "num_samples": num_samples, **metrics}
    metrics_path.write_text(json.dumps(record, indent=2))
    return metrics


def standard_fid(generator: nn.Module, spec: ModelSpec, real: torch.Tensor, num_samples: int, weights: Path) -> dict[str, float]:
    from training.metrics.fid import fid_from_features
    from training.metrics.inception_features import inception_features, load_fid_inception

    model = load_fid_inception(weights)
    fake = generate(generator, spec, latents(spec, num_samples, EVAL_SEED), balanced_labels(spec, num_samples))
    return {"fid_inception": fid_from_features(inception_features(model, real), inception_features(model, fake))}


def parse_label(spec: ModelSpec, label: str) -> int:
    if label in spec.class_names:
        return spec.class_names.index(label)
    if label.isdigit() and int(label) < spec.num_classes:
        return int(label)
    raise RunError(f"unknown class {label!r}: use an index below {spec.num_classes} or one of {spec.class_names}")


def sample_run(run_dir: Path, out: Path, n: int, seed: int, label: str | None, checkpoint: str, truncation: float) -> torch.Tensor:
    generator, spec, cfg = load_generator(run_dir, checkpoint)
    z = seed_latents(spec.z_dim, list(range(seed, seed + n))) * truncation  # seeds seed … seed+n-1, as the server draws them
    labels = balanced_labels(spec, n)
    if label is not None:
        if spec.kind != "conditional":
            raise RunError("--class only applies to conditional models")
        labels = torch.full((n,), parse_label(spec, label), dtype=torch.long)
    samples = generate(generator, spec, z, labels)
    if spec.is_image:
        save_grid(samples, out, nrow=spec.num_classes if spec.kind == "conditional" and label is None else None)
    else:
        save_scatter(samples, load_dataset(cfg.data)[0].x[:2000], out, title=f"{run_dir.name} seed {seed}")
    return samples
