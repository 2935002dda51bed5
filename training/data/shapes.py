"""Procedural shapes: a circle, square or triangle of random colour, size, position and rotation
on a plain black background. The generating factors are kept as labels so later work (edit
directions, attribute predictors, translation pairs) can measure what changed.

Shapes are drawn at 4x and downsampled with a box filter, which gives anti-aliased edges.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from training.data.base import TensorData

SHAPE_NAMES = ["circle", "square", "triangle"]
SUPERSAMPLE = 4
MIN_SIZE, MAX_SIZE = 0.3, 0.6  # side / diameter as a fraction of the image


def shape_polygon(shape: int, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of the shape inscribed in a circle of `radius` around (cx, cy)."""
    if shape == 0:
        corners = 64
    else:
        corners = 4 if shape == 1 else 3
    return [
        (cx + radius * math.cos(angle + 2 * math.pi * k / corners), cy + radius * math.sin(angle + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def render_shape(resolution: int, shape: int, hue: float, size: float, x: float, y: float, rotation: float) -> np.ndarray:
    """One RGB uint8 image [H, W, 3]; x, y are the centre in [0, 1], size the diameter fraction."""
    big = resolution * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (0, 0, 0))
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))
    radius = size * big / 2
    ImageDraw.Draw(canvas).polygon(shape_polygon(shape, x * big, y * big, radius, rotation), fill=colour)
    return np.asarray(canvas.resize((resolution, resolution), Image.Resampling.BOX))


def load_shapes(n: int = 10_000, resolution: int = 32, seed: int = 0, size_range: tuple[float, float] = (MIN_SIZE, MAX_SIZE)) -> TensorData:
    """`n` shapes as [n, 3, resolution, resolution] in [-1, 1], labels = shape class, factors kept.
    `size_range` widens or narrows the sizes drawn (the data is 0.3–0.6; the shapes reader that
    judges edits trains on a wider range so that it can read shapes an edit grows or shrinks past it)."""
    if resolution < 8:
        raise ValueError(f"shapes resolution must be at least 8, not {resolution}")
    min_size, max_size = size_range
    if not 0 < min_size <= max_size < 1:
        raise ValueError(f"shapes size range must satisfy 0 < min ≤ max < 1, not {size_range}")
    rng = np.random.default_rng(seed)
    # one row of 6 uniforms per image, so the first k images of a set are the same for any n
    u = rng.random((n, 6))
    shape = (u[:, 0] * 3).astype(np.int64)
    hue = u[:, 1]
    size = min_size + u[:, 2] * (max_size - min_size)
    # keep the whole shape inside the frame: the centre is at least a radius from each edge
    x = size / 2 + u[:, 3] * (1 - size)
    y = size / 2 + u[:, 4] * (1 - size)
    rotation = u[:, 5] * 2 * math.pi
    images = np.stack([render_shape(resolution, *params) for params in zip(shape, hue, size, x, y, rotation)])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    factors = {
        name: torch.tensor(values, dtype=torch.float32)
        for name, values in {"hue": hue, "size": size, "x": x, "y": y, "rotation": rotation}.items()
    }
    return TensorData(x=tensor.contiguous(), y=torch.tensor(shape, dtype=torch.long), class_names=list(SHAPE_NAMES), factors=factors)
