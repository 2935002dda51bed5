"""The shapes feature space and attribute readings, from the shipped shapes predictor."""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from models.classifier import ShapesPredictor

PREDICTOR_PATH = Path(__file__).with_name("shapes_predictor.safetensors")


@lru_cache(maxsize=1)
def load_shapes_predictor(path: Path = PREDICTOR_PATH) -> ShapesPredictor:
    if not Path(path).exists():
        raise FileNotFoundError(f"shapes predictor weights not found at {path}; rebuild them with `ganserve train-shapes-predictor`")
    model = ShapesPredictor()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def shapes_readings(images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(features [N, 64], attributes) for 32x32 RGB images in [-1, 1]. Attributes: `shape`
    (class index), `shape_probs` [N, 3], `size`, `x`, `y`, `hue` (in [0, 1))."""
    model = load_shapes_predictor()
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
