"""Inception Score (Salimans et al., 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

It ranges from 1 (every image gets the same class distribution) to the number of classes
(confident, evenly spread predictions). Historical; report it beside FID, not instead.
"""
from __future__ import annotations

import numpy as np


def inception_score(probabilities: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` of class probabilities [N, C] (rows sum to 1)."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("inception_score takes class probabilities [N, C] whose rows sum to 1")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
