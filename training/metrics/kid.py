"""Kernel Inception Distance (Bińkowski et al., 2018): the unbiased MMD² estimate with the cubic
polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over random subsets.

Unlike FID it is unbiased, so it is comparable across sample sizes and can be slightly negative.
"""
from __future__ import annotations

import numpy as np


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD² over `subsets` random subsets of each set."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError("KID needs at least two samples in each set")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))
