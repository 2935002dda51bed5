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
    """Outputs one logit (or critic score) per sample; spectral norm makes it the SNGAN-style D.

    `pack` > 1 is PacGAN (Lin et al., 2018): D judges `pack` samples at once, concatenated, and
    outputs one score per pack. A collapsed G puts out packs of near-identical points, which real
    data almost never does, so D can punish missing modes that a one-sample D cannot see. The
    reshape happens here, so the loop, the losses and the penalties are unchanged: a batch of N
    samples gives N / pack scores (N must be a multiple of `pack`).
    """

    def __init__(self, in_dim: int = 2, width: int = 256, depth: int = 3, spectral: bool = False, scale: float = 1.0, pack: int = 1) -> None:
        super().__init__()
        if pack < 1:
            raise ValueError(f"pack must be at least 1, not {pack}")
        self.scale = scale
        self.pack = pack
        layers: list[nn.Module] = []
        features = in_dim * pack
        for _ in range(depth):
            layers += [maybe_spectral(nn.Linear(features, width), spectral), nn.LeakyReLU(0.2)]
            features = width
        layers.append(maybe_spectral(nn.Linear(features, 1), spectral))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1) / self.scale
        if x.shape[0] % self.pack:
            raise ValueError(f"a batch of {x.shape[0]} cannot be split into packs of {self.pack}")
        return self.net(x.reshape(x.shape[0] // self.pack, -1)).squeeze(1)  # [B / pack]
