"""Trains the digits classifier whose features the digits metrics use.

Run `ganserve train-classifier` to rebuild `training/metrics/digits_classifier.safetensors`.
Trained on the digits train split only, so held-out accuracy is honest and the real-vs-real
FID floor (train vs held-out) is measured in a space the held-out set never shaped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import track
from safetensors.torch import save_file

from models.classifier import DigitsClassifier
from training.data.digits import load_digits
from training.metrics.digits_features import CLASSIFIER_PATH


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to `max_shift` px (padding with background) for augmentation."""
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    size = images.shape[-1]
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def train_digits_classifier(out_path: Path = CLASSIFIER_PATH, epochs: int = 40, seed: int = 0) -> float:
    """Trains, saves weights + a JSON card beside them, returns held-out accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train, held_out = load_digits("train", 32), load_digits("held_out", 32)
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = (len(train) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    for _ in track(range(epochs), description="training digits classifier"):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), 64):
            index = order[start : start + 64]
            loss = F.cross_entropy(model(random_shift(train.x[index], generator)), train.y[index], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    held_out_accuracy = accuracy(model, held_out.x, held_out.y)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_path))
    card = {"held_out_accuracy": held_out_accuracy, "train_accuracy": accuracy(model, train.x, train.y), "epochs": epochs, "seed": seed, "rebuild": "ganserve train-classifier"}
    out_path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return held_out_accuracy
