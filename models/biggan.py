"""BigGAN-deep's generator as the `pytorch-pretrained-biggan` port computes it (the TF-Hub
`biggan-deep-128/256/512` weights), written for serving imported checkpoints.

Numerics follow that port; the form follows the project's export rules:
- spectral normalisation is folded at import (each weight divided by the σ its stored u, v give,
  exactly what the port's eval-mode forward does), so every layer here is a plain conv or linear;
- the class enters as an index (`label`, int64) and picks a row of the class embedding, which is
  what the port's linear layer does with a one-hot vector;
- the batch-norm statistics depend on the truncation: the port stores them for `n_stats`
  truncations in [0, 1] and interpolates. The interpolation is computed on the host in double
  precision (`truncation_stats_weights`) and enters the graph as one weight vector per item
  (`truncation_stats`, [B, n_stats]); in float32 inside a graph, 0.3 / 0.02 is 15.000001 instead
  of 15 and picks statistics 16 instead of 15. Items with different truncations share a batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def truncation_stats_weights(truncation: float, n_stats: int) -> list[float]:
    """The port's interpolation of its stored statistics at `truncation` ∈ (0, 1], as weights over
    the `n_stats` entries. It reproduces the port's arithmetic, quirk included: between entries
    i and i+1 it gives entry i the weight frac (not 1 − frac), so the statistics jump at each
    grid point (0.4 uses nearly all of entry 21, i.e. truncation 0.42's statistics)."""
    if not 0.0 < truncation <= 1.0:
        raise ValueError(f"BigGAN's truncation lies in (0, 1], got {truncation}")
    coef, start = math.modf(truncation / (1.0 / (n_stats - 1)))
    weights = [0.0] * n_stats
    start = min(int(start), n_stats - 1)
    if coef != 0.0 and start + 1 < n_stats:
        weights[start], weights[start + 1] = coef, 1.0 - coef
    else:
        weights[start] = 1.0
    return weights


Z_BOUND = 2.0  # BigGAN draws z from a normal truncated to [-2, 2], then scales it by the truncation


def truncated_latent(seed: int, z_dim: int, truncation: float) -> torch.Tensor:
    """z for one seed: a standard normal truncated to ±Z_BOUND (values outside are redrawn from
    the seed's own generator, so a seed fixes its z) times the truncation → [z_dim]."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(z_dim, generator=generator)
    while (outside := z.abs() > Z_BOUND).any():
        z[outside] = torch.randn(int(outside.sum()), generator=generator)
    return z * truncation


class TruncationStats(nn.Module):
    """Batch-norm statistics stored per truncation: [n_stats, C] means and variances."""

    def __init__(self, channels: int, n_stats: int) -> None:
        super().__init__()
        self.register_buffer("running_means", torch.zeros(n_stats, channels))
        self.register_buffer("running_vars", torch.ones(n_stats, channels))

    def normalize(self, x: torch.Tensor, stats: torch.Tensor, eps: float) -> torch.Tensor:
        """x [B, C, H, W] standardised with each item's interpolated statistics (stats [B, n_stats])."""
        mean = (stats @ self.running_means)[:, :, None, None]
        var = (stats @ self.running_vars)[:, :, None, None]
        return (x - mean) / torch.sqrt(var + eps)


class ConditionalBatchNorm(TruncationStats):
    """Batch norm whose gain (1 + scale(c)) and bias (offset(c)) come from the condition vector."""

    def __init__(self, channels: int, condition_dim: int, n_stats: int, eps: float) -> None:
        super().__init__(channels, n_stats)
        self.eps = eps
        self.scale = nn.Linear(condition_dim, channels, bias=False)
        self.offset = nn.Linear(condition_dim, channels, bias=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        gain = 1 + self.scale(condition)[:, :, None, None]
        return self.normalize(x, stats, self.eps) * gain + self.offset(condition)[:, :, None, None]


class OutputBatchNorm(TruncationStats):
    """The last, unconditional batch norm: a learnt gain and bias."""

    def __init__(self, channels: int, n_stats: int, eps: float) -> None:
        super().__init__(channels, n_stats)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, stats, self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class GBlock(nn.Module):
    """BigGAN-deep's residual block: a 1x1 bottleneck (channels / 4), two 3x3 convs (the first
    after a nearest-neighbour 2x upsample when the block upsamples), a 1x1 back out; the skip path
    keeps the first `out` channels and upsamples the same way."""

    def __init__(self, in_channels: int, out_channels: int, condition_dim: int, upsample: bool, n_stats: int, eps: float) -> None:
        super().__init__()
        middle = in_channels // 4
        self.upsample, self.out_channels = upsample, out_channels
        widths = [(in_channels, middle, 1), (middle, middle, 3), (middle, middle, 3), (middle, out_channels, 1)]
        self.norms = nn.ModuleList(ConditionalBatchNorm(i, condition_dim, n_stats, eps) for i, _, _ in widths)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, padding=k // 2) for i, o, k in widths)

    def forward(self, x: torch.Tensor, condition: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        h = x
        for index, (norm, conv) in enumerate(zip(self.norms, self.convs)):
            h = F.relu(norm(h, condition, stats))
            if index == 1 and self.upsample:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = conv(h)
        skip = x[:, : self.out_channels]
        if self.upsample:
            skip = F.interpolate(skip, scale_factor=2, mode="nearest")
        return h + skip


class SelfAttention(nn.Module):
    """SAGAN's attention: queries at every position, keys and values 2x2 max-pooled; the result
    added back with a learnt weight `gamma`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.key = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.value = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.out = nn.Conv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, channels, height, width = x.shape
        query = self.query(x).flatten(2)  # [B, C/8, HW]
        key = F.max_pool2d(self.key(x), 2).flatten(2)  # [B, C/8, HW/4]
        value = F.max_pool2d(self.value(x), 2).flatten(2)  # [B, C/2, HW/4]
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # [B, HW, HW/4]
        attended = (value @ attention.transpose(1, 2)).reshape(-1, channels // 2, height, width)
        return x + self.gamma * self.out(attended)


class BigGANDeepGenerator(nn.Module):
    """(z [B, z_dim], label [B], truncation_stats [B, n_stats]) → image [B, 3, H, W] in [-1, 1].

    `layers` is the port's configuration: (upsample, in, out) channel multiples of `channel_width`
    per block; the attention block sits before block `attention_layer_position`."""

    def __init__(self, z_dim: int, num_classes: int, channel_width: int, layers: list, attention_layer_position: int,
                 eps: float = 1e-4, n_stats: int = 51, channels: int = 3) -> None:
        super().__init__()
        self.z_dim, self.channel_width, self.n_stats = z_dim, channel_width, n_stats
        condition_dim = 2 * z_dim
        self.class_embedding = nn.Embedding(num_classes, z_dim)
        self.project = nn.Linear(condition_dim, 4 * 4 * 16 * channel_width)
        blocks: list[nn.Module] = []
        for index, (upsample, in_mult, out_mult) in enumerate(layers):
            if index == attention_layer_position:
                blocks.append(SelfAttention(channel_width * in_mult))
            blocks.append(GBlock(channel_width * in_mult, channel_width * out_mult, condition_dim, bool(upsample), n_stats, eps))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = OutputBatchNorm(channel_width, n_stats, eps)
        self.to_rgb = nn.Conv2d(channel_width, channels, 3, padding=1)  # the port's conv has `channel_width` outputs and keeps 3

    def forward(self, z: torch.Tensor, label: torch.Tensor, truncation_stats: torch.Tensor) -> torch.Tensor:
        condition = torch.cat([z, self.class_embedding(label)], dim=1)  # [B, 2 z_dim]
        # the TF weights lay the 4x4 projection out channels-last
        x = self.project(condition).reshape(-1, 4, 4, 16 * self.channel_width).permute(0, 3, 1, 2)
        for block in self.blocks:
            x = block(x, condition, truncation_stats) if isinstance(block, GBlock) else block(x)
        x = F.relu(self.norm_out(x, truncation_stats))
        return torch.tanh(self.to_rgb(x))
