"""Differentiable augmentation (DiffAugment, Zhao et al., 2020) for training on small data.

The same random transform family is applied to real and fake images before D sees them, and
gradients flow through it to G, so D cannot memorise the few real images while G is not
taught to reproduce the augmentations. Randomness comes from the training generator, so a
resumed run draws the same augmentations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def color(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    brightness = (torch.rand(b, 1, 1, 1, generator=rng) - 0.5).to(x)
    x = x + brightness
    mean = x.mean(dim=1, keepdim=True)
    saturation = (torch.rand(b, 1, 1, 1, generator=rng) * 2).to(x)
    x = (x - mean) * saturation + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (torch.rand(b, 1, 1, 1, generator=rng) + 0.5).to(x)
    return (x - mean) * contrast + mean


def translation(x: torch.Tensor, rng: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to `ratio` of its size, filling with zeros (integer pixel shifts)."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (b,), generator=rng).to(x.device)
    dx = torch.randint(-sw, sw + 1, (b,), generator=rng).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] - dy[:, None]).clamp(-1, h)  # [B, H]
    cols = (torch.arange(w, device=x.device)[None, :] - dx[:, None]).clamp(-1, w)
    padded = F.pad(x, [1, 1, 1, 1])
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None] + 1, cols[:, None, :] + 1].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, rng: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero a random square of `ratio` of the image size in each image."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b,), generator=rng).to(x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b,), generator=rng).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - (cy[:, None, None] - ch // 2)).abs() <= ch // 2) & ((xs - (cx[:, None, None] - cw // 2)).abs() <= cw // 2)
    return x * (~inside)[:, None].to(x)


def diff_augment(x: torch.Tensor, policy: str, rng: torch.Generator) -> torch.Tensor:
    for name in [p for p in policy.split(",") if p]:
        if name not in POLICIES:
            raise ValueError(f"unknown augmentation {name!r}: choose from {POLICIES}")
        x = {"color": color, "translation": translation, "cutout": cutout}[name](x, rng)
    return x.contiguous()
