"""The digits feature space: the shipped classifier's penultimate activations and its class
probabilities, computed in batches without gradients."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from models.classifier import DigitsClassifier

CLASSIFIER_PATH = Path(__file__).with_name("digits_classifier.safetensors")


@lru_cache(maxsize=1)
def load_digits_classifier(path: Path = CLASSIFIER_PATH) -> DigitsClassifier:
    if not Path(path).exists():
        raise FileNotFoundError(f"digits classifier weights not found at {path}; rebuild them with `ganserve train-classifier`")
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def digits_features(images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 64], class probabilities [N, 10]) of 32x32 digits images in [-1, 1]."""
    if images.shape[1:] != (1, 32, 32):
        images = torch.nn.functional.interpolate(images.mean(1, keepdim=True), size=(32, 32), mode="bilinear", align_corners=False)
    model = load_digits_classifier()
    features, probs = [], []
    for start in range(0, len(images), batch_size):
        feats = model.features(images[start : start + batch_size].float().cpu())
        features.append(feats)
        probs.append(model.head(feats).softmax(dim=1))
    return torch.cat(features).double().numpy(), torch.cat(probs).double().numpy()
