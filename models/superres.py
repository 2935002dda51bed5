"""ESRGAN-style super-resolution generator (RRDB) at x2 or x4.

Residual-in-residual dense blocks with residual scaling and no batch norm (ESRGAN's finding: BN
brings artefacts and costs generalisation); upsampling is nearest-neighbour + 3x3 conv per factor
2, which exports cleanly to ONNX/TorchScript at any input size (no pixel-shuffle reshapes with
dynamic axes). Any input size works: `size_multiple` is 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing all earlier feature maps; output scaled by 0.2 and added."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels + i * growth, growth if i < 4 else channels, 3, 1, 1) for i in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i, conv in enumerate(self.convs):
            out = conv(torch.cat(features, dim=1))
            if i < 4:
                features.append(F.leaky_relu(out, 0.2))
        return x + 0.2 * out


class RRDB(nn.Module):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(DenseBlock(channels, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBNet(nn.Module):
    """Image in [-1, 1] at low resolution → image at `scale`x. ESRGAN proper uses 23 blocks,
    64 features, growth 32; the CPU configs here use a lite version (a few blocks, 32 features)."""

    size_multiple = 1

    def __init__(self, scale: int = 4, channels: int = 3, features: int = 32, blocks: int = 4, growth: int = 16) -> None:
        super().__init__()
        if scale not in (2, 4):
            raise ValueError(f"scale must be 2 or 4, not {scale}")
        self.scale = scale
        self.head = nn.Conv2d(channels, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.body_out = nn.Conv2d(features, features, 3, 1, 1)
        self.ups = nn.ModuleList(nn.Conv2d(features, features, 3, 1, 1) for _ in range(int(math.log2(scale))))
        self.hr = nn.Conv2d(features, features, 3, 1, 1)
        self.tail = nn.Conv2d(features, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.head(x)
        feat = feat + self.body_out(self.body(feat))
        for up in self.ups:
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2.0, mode="nearest")), 0.2)
        # predict the residual over a bicubic upscale: the network spends its capacity on detail
        base = F.interpolate(x, scale_factor=float(self.scale), mode="bicubic", align_corners=False)
        return base + self.tail(F.leaky_relu(self.hr(feat), 0.2))
