"""The 2-D Gaussian mixtures used to measure mode collapse (VEEGAN, PacGAN).

`ring8`: 8 modes on a circle of radius 2, std 0.02. `grid25`: a 5x5 grid at {-4,-2,0,2,4}^2,
std 0.05. Centres and std are exposed so the mode metrics use exactly what generated the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from training.data.base import TensorData


@dataclass(frozen=True)
class GaussianMixture:
    name: str
    centres: torch.Tensor  # [M, 2]
    std: float

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        mode = torch.randint(len(self.centres), (n,), generator=generator)
        return self.centres[mode] + self.std * torch.randn(n, 2, generator=generator)


def ring8() -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float32) * (2 * math.pi / 8)
    return GaussianMixture("ring8", torch.stack([2 * angles.cos(), 2 * angles.sin()], dim=1), 0.02)


def grid25() -> GaussianMixture:
    axis = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    return GaussianMixture("grid25", torch.stack([gx.flatten(), gy.flatten()], dim=1), 0.05)


MIXTURES = {"ring8": ring8, "grid25": grid25}


def mixture(name: str) -> GaussianMixture:
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r}: choose from {sorted(MIXTURES)}")
    return MIXTURES[name]()


def load_gaussians(name: str, n: int = 100_000, seed: int = 0) -> TensorData:
    """A fixed draw of `n` points; 100k is far more than a GAN can memorise, so it acts as fresh data."""
    return TensorData(x=mixture(name).sample(n, torch.Generator().manual_seed(seed)))
