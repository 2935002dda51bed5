"""Sample grids and scatter plots: what people look at instead of reading numbers."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """[N, C, H, W] floats → uint8 [N, H, W, C]."""
    low, high = value_range
    scaled = ((images.detach().float().cpu() - low) / (high - low)).clamp(0, 1) * 255
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1) -> Image.Image:
    """Tiles [N, C, H, W] images in [-1, 1] into one RGB picture, `nrow` images per row."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    if c == 1:
        pixels = np.repeat(pixels, 3, axis=3)
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), 40, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        canvas[y : y + h, x : x + w] = pixels[i]
    picture = Image.fromarray(canvas)
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST) if scale > 1 else picture


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 256 // images.shape[-1]) if images.shape[-1] < 64 else 1
    image_grid(images, nrow, scale=min(scale, 4)).save(path)


def save_scatter(points: torch.Tensor, reference: torch.Tensor, path: Path, title: str = "") -> None:
    """Generated 2-D points over the real ones, for mixture runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(reference[:, 0], reference[:, 1], s=2, c="#bbbbbb", label="real")
    ax.scatter(points[:, 0].cpu(), points[:, 1].cpu(), s=2, c="#d62728", label="generated")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
