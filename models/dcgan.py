"""DCGAN (Radford et al., 2015) at 32 or 64 px, its class-conditional variant, and the
discriminators that go with them: the DCGAN D, the SNGAN D (spectral norm, no BN) and the
projection D (Miyato & Koyama, 2018).

Guidelines followed: strided (transposed) convolutions instead of pooling, BatchNorm in G and
in D except D's input layer, ReLU in G with Tanh at the output, LeakyReLU(0.2) in D.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import ConditionalBatchNorm2d, dcgan_init, maybe_spectral


def stage_count(resolution: int) -> int:
    """Number of 2x up/down-sampling stages between 4x4 and `resolution`."""
    if resolution not in (32, 64):
        raise ValueError(f"DCGAN supports 32 or 64 px, not {resolution}")
    return {32: 3, 64: 4}[resolution]


class DCGANGenerator(nn.Module):
    """z [B, z_dim] → image [B, channels, resolution, resolution] in [-1, 1]."""

    def __init__(self, z_dim: int = 100, channels: int = 3, resolution: int = 32, width: int = 64) -> None:
        super().__init__()
        stages = stage_count(resolution)
        features = width * 2 ** (stages - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim, features, 4, 1, 0, bias=False), nn.BatchNorm2d(features), nn.ReLU(True)]
        for _ in range(stages - 1):
            layers += [nn.ConvTranspose2d(features, features // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(features // 2), nn.ReLU(True)]
            features //= 2
        layers += [nn.ConvTranspose2d(features, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class ConditionalDCGANGenerator(nn.Module):
    """(z, class) → image. The class enters twice: an embedding joined to z, and the scale and
    shift of every BatchNorm (conditional BN), which is what lets one generator draw each class."""

    def __init__(self, z_dim: int = 100, channels: int = 3, resolution: int = 32, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        stages = stage_count(resolution)
        features = width * 2 ** (stages - 1)
        self.embed = nn.Embedding(num_classes, z_dim)
        self.convs = nn.ModuleList([nn.ConvTranspose2d(2 * z_dim, features, 4, 1, 0, bias=False)])
        self.norms = nn.ModuleList([ConditionalBatchNorm2d(features, num_classes)])
        for _ in range(stages - 1):
            self.convs.append(nn.ConvTranspose2d(features, features // 2, 4, 2, 1, bias=False))
            self.norms.append(ConditionalBatchNorm2d(features // 2, num_classes))
            features //= 2
        self.to_image = nn.ConvTranspose2d(features, channels, 4, 2, 1)
        self.apply(dcgan_init)
        for norm in self.norms:  # dcgan_init would shrink the per-class BN scales to ~0
            nn.init.ones_(norm.gamma.weight)
            nn.init.zeros_(norm.beta.weight)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, self.embed(y)], dim=1)[:, :, None, None]  # [B, 2*z_dim, 1, 1]
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x), y))
        return torch.tanh(self.to_image(x))


class DCGANDiscriminator(nn.Module):
    """image → one logit per sample. BatchNorm inside: train it with per-batch losses, not WGAN-GP.
    With `num_classes` it adds a projection head (Miyato & Koyama): logit += <embed(y), φ(x)>."""

    def __init__(self, channels: int = 3, resolution: int = 32, width: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        stages = stage_count(resolution)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        features = width
        for _ in range(stages - 1):
            layers += [nn.Conv2d(features, features * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(features * 2), nn.LeakyReLU(0.2, True)]
            features *= 2
        self.features = nn.Sequential(*layers)  # [B, F, 4, 4]
        self.head = nn.Conv2d(features, 1, 4, 1, 0)
        self.embed = nn.Embedding(num_classes, features) if num_classes else None
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        phi = self.features(x)
        logit = self.head(phi).flatten()  # [B]
        if self.embed is not None:
            if y is None:
                raise ValueError("the projection discriminator needs class labels")
            logit = logit + (self.embed(y) * phi.sum(dim=(2, 3))).sum(dim=1)
        return logit


class SNDiscriminator(nn.Module):
    """The DCGAN discriminator with spectral norm on every layer instead of BatchNorm (the SNGAN
    recipe), so it also suits per-sample penalties (WGAN-GP, R1). SNGAN's extra 3x3 convolution
    per stage is left out: on a 2-core CPU it cost 8x the compute for no gain on 32 px digits.
    With `num_classes` it becomes the projection D: logit = linear(φ(x)) + <embed(y), φ(x)>."""

    def __init__(self, channels: int = 3, resolution: int = 32, width: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        stages = stage_count(resolution)
        layers: list[nn.Module] = []
        in_features, features = channels, width
        for _ in range(stages):
            layers += [maybe_spectral(nn.Conv2d(in_features, features, 4, 2, 1), True), nn.LeakyReLU(0.1, True)]
            in_features, features = features, features * 2
        layers += [maybe_spectral(nn.Conv2d(in_features, in_features, 3, 1, 1), True), nn.LeakyReLU(0.1, True)]
        self.features = nn.Sequential(*layers)
        self.linear = maybe_spectral(nn.Linear(in_features, 1), True)
        self.embed = maybe_spectral(nn.Embedding(num_classes, in_features), True) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        phi = self.features(x).sum(dim=(2, 3))  # [B, F], global sum pooling as in SNGAN
        logit = self.linear(phi).squeeze(1)
        if self.embed is not None:
            if y is None:
                raise ValueError("the projection discriminator needs class labels")
            logit = logit + (self.embed(y) * phi).sum(dim=1)
        return logit
