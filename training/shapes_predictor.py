"""Trains the shapes attribute predictor (`ganserve train-shapes-predictor`), whose weights ship
in `training/metrics/shapes_predictor.safetensors` with a JSON card of its held-out accuracy and
errors. It is the project's feature network for shapes FID/KID and the judge of latent edits."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import track
from safetensors.torch import save_file

from models.classifier import ShapesPredictor
from training.data.shapes import load_shapes
from training.metrics.shapes_features import PREDICTOR_PATH


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


def train_shapes_predictor(out_path: Path = PREDICTOR_PATH, epochs: int = 8, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train, held_out = load_shapes(20_000, 32, seed=10), load_shapes(1000, 32, seed=11)
    train_targets = targets(train.factors)
    model = ShapesPredictor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(train) + 127) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for _ in track(range(epochs), description="training shapes predictor"):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), 128):
            index = order[start : start + 128]
            logits, regressed = model(train.x[index])
            loss = F.cross_entropy(logits, train.y[index]) + 10 * F.mse_loss(regressed, train_targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    report = held_out_report(model, held_out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_path))
    out_path.with_suffix(".json").write_text(json.dumps({**report, "epochs": epochs, "seed": seed, "rebuild": "ganserve train-shapes-predictor"}, indent=2))
    return report
