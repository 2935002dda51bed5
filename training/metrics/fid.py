"""Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., 2017).

d² = ||μ₁ - μ₂||² + Tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^½)
Computed in float64 with SciPy's matrix square root; a tiny diagonal offset is added only when
the product is singular, as the reference implementation does.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of features [N, D] (unbiased, N-1)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N>=2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two feature sets have different dimensions")
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)  # imaginary parts are round-off for PSD inputs
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean), 0.0))


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))
