"""The fully connected GAN of Goodfellow et al. (2014), used for 2-D mixtures and flat data."""
from __future__ import annotations

import torch
from torch import nn

from models.layers import maybe_spectral


class MLPGenerator(nn.Module):
    """`scale` is the data's spread: the net works in unit-scale coordinates and its output is
    multiplied back, so samples live in data space while the optimisation stays well conditioned."""

    def __init__(self, z_dim: int = 2, out_dim: int = 2, width: int = 256, depth: int = 3, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = []
        features = z_dim
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        layers.append(nn.Linear(features, out_dim))  # unbounded output: points are not images
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z) * self.scale


class MLPDiscriminator(nn.Module):
    """Outputs one logit (or critic score) per sample; spectral norm makes it the SNGAN-style D."""

    def __init__(self, in_dim: int = 2, width: int = 256, depth: int = 3, spectral: bool = False, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = []
        features = in_dim
        for _ in range(depth):
            layers += [maybe_spectral(nn.Linear(features, width), spectral), nn.LeakyReLU(0.2)]
            features = width
        layers.append(maybe_spectral(nn.Linear(features, 1), spectral))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1) / self.scale).squeeze(1)  # [B]
