"""Trains the two shapes attribute predictors (`ganserve train-shapes-predictor`), whose weights
ship in `training/metrics/` with a JSON card of their held-out accuracy, errors and size
calibration.

- The *features* predictor trains on the data's own size range (0.3–0.6). Its penultimate layer is
  the feature space of shapes FID/KID, the image-to-image judge and the projection's perceptual
  loss, so it stays fixed: retraining it would move every shapes metric.
- The *reader* trains on a wider size range (0.2–0.7), and on softened, dimmed, noisy renders
  besides clean ones. It judges latent edits and style mixing:
  an edit along `size` pushes shapes past the data's range, and the features predictor, never
  having seen such shapes, reads them non-monotonically (its card's calibration shows triangles of
  size 0.25 read as 0.41). A judge must read the range the edits reach.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track
from safetensors.torch import save_file

from models.classifier import ShapesPredictor
from training.data.shapes import MAX_SIZE, MIN_SIZE, SHAPE_NAMES, load_shapes
from training.metrics.shapes_features import PREDICTOR_PATH, READER_PATH

CALIBRATION_SIZES = tuple(round(0.2 + 0.05 * i, 2) for i in range(11))  # 0.20 … 0.70


@dataclass(frozen=True)
class PredictorRole:
    """Which predictor to build: where its weights go and the sizes it learns to read."""

    name: str
    path: Path
    size_range: tuple[float, float]
    robust: bool  # train on softened, noisy, dimmed renders too: generated shapes are all three


FEATURES = PredictorRole("features", PREDICTOR_PATH, (MIN_SIZE, MAX_SIZE), robust=False)
READER = PredictorRole("reader", READER_PATH, (0.2, 0.7), robust=True)
ROLES = {role.name: role for role in (FEATURES, READER)}


def targets(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, 5] = size, x, y, cos 2πhue, sin 2πhue (hue is circular)."""
    angle = 2 * math.pi * factors["hue"]
    return torch.stack([factors["size"], factors["x"], factors["y"], angle.cos(), angle.sin()], dim=1)


@torch.no_grad()
def held_out_report(model: ShapesPredictor, data) -> dict[str, float]:
    model.eval()
    logits, regressed = model(data.x)
    errors = (regressed - targets(data.factors)).abs().mean(dim=0)
    return {"class_accuracy": float((logits.argmax(1) == data.y).float().mean()),
            **{f"{name}_mean_abs_error": float(e) for name, e in zip(ShapesPredictor.REGRESSED, errors)}}


@torch.no_grad()
def size_calibration(model: ShapesPredictor, per_size: int = 300, seed: int = 12) -> dict:
    """The mean size reading and the class accuracy of rendered shapes of each known size in
    `CALIBRATION_SIZES`, per class, and whether the reading rises with the true size: what a judge
    of size edits needs, read on shapes whose size is known."""
    model.eval()
    table: dict[str, dict[str, list[float]]] = {name: {"size_read": [], "class_accuracy": []} for name in SHAPE_NAMES}
    for size in CALIBRATION_SIZES:
        data = load_shapes(per_size, 32, seed=seed, size_range=(size, size))
        logits, regressed = model(data.x)
        for index, name in enumerate(SHAPE_NAMES):
            members = data.y == index
            table[name]["size_read"].append(round(float(regressed[members, 0].mean()), 4))
            table[name]["class_accuracy"].append(round(float((logits[members].argmax(1) == index).float().mean()), 3))
    return {"sizes": list(CALIBRATION_SIZES), **table,
            "size_read_rises_with_size": {name: bool(np.all(np.diff(table[name]["size_read"]) > 0)) for name in SHAPE_NAMES}}


def soften(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Renders made to look like a generator's output: each image blended with a blurred copy of
    itself (softer edges, rounder corners), dimmed, and given a little pixel noise, each by a random
    amount. The factors it is read for (size, position, hue, class) do not change."""
    n = len(images)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blend = torch.rand(n, 1, 1, 1, generator=generator)
    softened = (1 - blend) * images + blend * blurred
    dim = 0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=generator)
    softened = (softened + 1) * dim - 1  # the background stays black
    noise = 0.05 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    return (softened + noise).clamp(-1, 1)


def train_shapes_predictor(role: PredictorRole = FEATURES, epochs: int = 8, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_shapes(20_000, 32, seed=10, size_range=role.size_range)
    held_out = load_shapes(1000, 32, seed=11, size_range=role.size_range)
    train_targets = targets(train.factors)
    model = ShapesPredictor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(train) + 127) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for _ in track(range(epochs), description=f"training shapes predictor ({role.name})"):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), 128):
            index = order[start : start + 128]
            images = soften(train.x[index], generator) if role.robust else train.x[index]
            logits, regressed = model(images)
            loss = F.cross_entropy(logits, train.y[index]) + 10 * F.mse_loss(regressed, train_targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    report = held_out_report(model, held_out)
    role.path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(role.path))
    write_card(role, report | {"epochs": epochs, "seed": seed}, model)
    return report


def reader_with_seed(seed: int, folder: Path) -> Path:
    """Weights of a reader trained by the shipped recipe but with another seed, in `folder`
    (trained once, then reused): a second opinion on the latent proofs, to see how much of a
    result belongs to the one shipped judge."""
    path = folder / f"shapes-reader-seed{seed}.safetensors"
    if not path.exists():
        train_shapes_predictor(replace(READER, path=path), seed=seed)
    return path


def write_card(role: PredictorRole, report: dict, model: ShapesPredictor) -> None:
    """The JSON card beside the weights: held-out figures, the size range trained on, the size
    calibration, and the command that rebuilds it."""
    rebuild = "ganserve train-shapes-predictor" + ("" if role is FEATURES else f" --role {role.name}")
    card = {**report, "size_range": list(role.size_range), "calibration": size_calibration(model), "rebuild": rebuild}
    role.path.with_suffix(".json").write_text(json.dumps(card, indent=2))
