"""The shapes feature space and attribute readings, from the shipped shapes predictors: the
features predictor (FID/KID features, trained on the data's size range) and the reader (trained on
a wider size range, to judge latent edits); `training/shapes_predictor.py` explains the split."""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from models.classifier import ShapesPredictor

PREDICTOR_PATH = Path(__file__).with_name("shapes_predictor.safetensors")
READER_PATH = Path(__file__).with_name("shapes_reader.safetensors")

Judge = Callable[[torch.Tensor], dict[str, np.ndarray]]  # images → attributes read off them


@lru_cache(maxsize=8)  # the features predictor, the reader, and the readers an averaged judge combines
def load_shapes_predictor(path: Path = PREDICTOR_PATH) -> ShapesPredictor:
    if not Path(path).exists():
        role = " --role reader" if Path(path).name == READER_PATH.name else ""
        raise FileNotFoundError(f"shapes predictor weights not found at {path}; rebuild them with `ganserve train-shapes-predictor{role}`")
    model = ShapesPredictor()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def load_shapes_reader() -> ShapesPredictor:
    return load_shapes_predictor(READER_PATH)


@torch.no_grad()
def shapes_readings(images: torch.Tensor, batch_size: int = 500, path: Path = PREDICTOR_PATH) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(features [N, 64], attributes) for 32x32 RGB images in [-1, 1], from the predictor at
    `path`. Attributes: `shape` (class index), `shape_probs` [N, 3], `size`, `x`, `y`, `hue` (in [0, 1))."""
    model = load_shapes_predictor(path)
    features, logits, regressed = [], [], []
    for start in range(0, len(images), batch_size):
        phi = model.features(images[start : start + batch_size].float().cpu())
        features.append(phi)
        logits.append(model.head(phi))
        regressed.append(model.regress(phi))
    logits_all, reg = torch.cat(logits), torch.cat(regressed).double().numpy()
    hue = (np.arctan2(reg[:, 4], reg[:, 3]) / (2 * math.pi)) % 1.0
    attributes = {"shape": logits_all.argmax(1).numpy(), "shape_probs": logits_all.softmax(1).double().numpy(),
                  "size": reg[:, 0], "x": reg[:, 1], "y": reg[:, 2], "hue": hue}
    return torch.cat(features).double().numpy(), attributes


def edit_readings(images: torch.Tensor) -> dict[str, np.ndarray]:
    """The attributes the reader reads off images: what edit directions are fitted on and what
    the latent proofs measure."""
    return shapes_readings(images, path=READER_PATH)[1]


def reader_at(path: Path) -> Judge:
    """A judge reading with the predictor weights at `path` (e.g. a reader trained with another seed)."""
    return lambda images: shapes_readings(images, path=path)[1]


def averaged_judge(paths: list[Path]) -> Judge:
    """One judge from several predictors' weights: the mean of their size and position readings,
    the circular mean of their hues, the class of their mean class probabilities. Independent
    readers' noise partly cancels, so it resolves smaller changes than any one of them."""

    def read(images: torch.Tensor) -> dict[str, np.ndarray]:
        readings = [shapes_readings(images, path=path)[1] for path in paths]
        angles = [2 * math.pi * r["hue"] for r in readings]
        hue = (np.arctan2(np.mean(np.sin(angles), 0), np.mean(np.cos(angles), 0)) / (2 * math.pi)) % 1.0
        probs = np.mean([r["shape_probs"] for r in readings], 0)
        return {"shape": probs.argmax(1), "shape_probs": probs, "hue": hue,
                **{name: np.mean([r[name] for r in readings], 0) for name in ("size", "x", "y")}}

    return read


def predictor_readings(images: torch.Tensor) -> dict[str, np.ndarray]:
    """The features predictor's readings: the judge of edits before the reader, kept for comparison."""
    return shapes_readings(images)[1]
