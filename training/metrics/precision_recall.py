"""Improved precision and recall (Kynkäänniemi et al., 2019).

Each set's manifold is the union of balls around its points, with radius the distance to the
k-th nearest neighbour in the same set. Precision: the fraction of generated samples inside the
real manifold (are samples realistic?). Recall: the fraction of real samples inside the generated
manifold (is the data covered?). Mode collapse shows as low recall with good precision.
"""
from __future__ import annotations

import numpy as np
import torch


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    distances = torch.cdist(features, features)  # [N, N]; the 0 on the diagonal is the point itself
    return distances.kthvalue(k + 1, dim=1).values


def manifold_coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    inside = []
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start : start + chunk], support)  # [chunk, M]
        inside.append((distances <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3) -> tuple[float, float]:
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall
