"""Data for image-to-image training, all built offline.

- `edges_to_shapes`: paired (outline, filled shape) from the procedural shapes; the outline is
  drawn in the shape's colour, so the task (fill the shape) is well posed and pixel metrics mean
  something.
- photo crops from scikit-image's sample photos: grayscale → colour pairs, and bicubic-downscaled
  → original pairs for super-resolution. Whole photos are held out (chelsea and coffee), so the
  held-out crops show scenes the network never saw.
- `shape_domains`: two unpaired domains (e.g. circles and squares) for CycleGAN; `stroke_domains`:
  thin and thick handwritten digits (eroded / dilated), the change CycleGAN is good at.

Every image tensor is [N, C, H, W] in [-1, 1]. Training sets expose `minibatch(batch, generator)`
→ (a, b); held-out sets are fixed `Pairs`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from training.data.base import TensorData
from training.data.shapes import SHAPE_NAMES, load_shapes

TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
HELD_OUT_PHOTOS = ("chelsea", "coffee")


@dataclass
class Pairs:
    """Aligned inputs `a` and targets `b` (b may be larger: super-resolution)."""

    a: torch.Tensor
    b: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.a) != len(self.b):
            raise ValueError(f"{len(self.a)} inputs but {len(self.b)} targets")

    def __len__(self) -> int:
        return len(self.a)

    def minibatch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randperm(len(self.a), generator=generator)[:batch_size]
        return self.a[index], self.b[index]


def outline(images: torch.Tensor, width: int = 1) -> torch.Tensor:
    """The shape's boundary in its own colour: pixels of the shape whose neighbourhood reaches the
    background (mask minus its erosion)."""
    mask = (images.max(dim=1, keepdim=True).values > -0.5).float()
    eroded = -F.max_pool2d(-mask, 2 * width + 1, stride=1, padding=width)
    edge = (mask - eroded).clamp(0, 1)
    return images * edge + (-1.0) * (1 - edge)


def edges_to_shapes(n: int, resolution: int, seed: int) -> Pairs:
    shapes = load_shapes(n, resolution, seed=seed).x
    return Pairs(outline(shapes), shapes)


def shape_domains(domain_a: str, domain_b: str, n: int, resolution: int, seed: int) -> tuple[TensorData, TensorData]:
    """Two unpaired sets, one per shape class, drawn from disjoint halves of the generated shapes
    so no image in A has its twin in B."""
    for name in (domain_a, domain_b):
        if name not in SHAPE_NAMES:
            raise ValueError(f"unknown shape domain {name!r}: use one of {SHAPE_NAMES}")
    shapes = load_shapes(n * 10, resolution, seed=seed)  # each half holds ~1.7n of each class
    first, second = torch.arange(len(shapes)) < len(shapes) // 2, torch.arange(len(shapes)) >= len(shapes) // 2
    a = shapes.subset(torch.nonzero((shapes.y == SHAPE_NAMES.index(domain_a)) & first).squeeze(1)[:n])
    b = shapes.subset(torch.nonzero((shapes.y == SHAPE_NAMES.index(domain_b)) & second).squeeze(1)[:n])
    if min(len(a), len(b)) < n:
        raise ValueError(f"only {min(len(a), len(b))} of the {n} images asked for per domain were drawn")
    return a, b


def stroke_domains(split: str, resolution: int = 32, width: int = 1) -> tuple[TensorData, TensorData]:
    """Thin and thick handwritten digits: scikit-learn's digits eroded (thin, domain A) and
    dilated (thick, domain B) by `width` px, from disjoint halves of the split (unpaired)."""
    from training.data.digits import load_digits

    digits = load_digits(split, resolution)
    kernel = 2 * width + 1
    thin = -F.max_pool2d(-digits.x, kernel, stride=1, padding=width)
    thick = F.max_pool2d(digits.x, kernel, stride=1, padding=width)
    half = len(digits) // 2
    return TensorData(thin[:half], digits.y[:half]), TensorData(thick[half:], digits.y[half:])


def load_photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    return image[..., :3] if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] → float [N, C, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def luminance(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of [N, 3, H, W] in [-1, 1] → [N, 1, H, W]."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype)[None, :, None, None]
    return (images * weights).sum(dim=1, keepdim=True)


def bicubic_downscale(crops: np.ndarray, scale: int) -> np.ndarray:
    """uint8 [N, H, W, 3] → [N, H/scale, W/scale, 3] by Pillow's bicubic (antialiased) resize, the
    degradation the SR models learn to invert."""
    h, w = crops.shape[1] // scale, crops.shape[2] // scale
    return np.stack([np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BICUBIC)) for c in crops])


def bicubic_upscale(images: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline SR: Pillow bicubic upscaling of [N, 3, h, w] in [-1, 1]."""
    uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    h, w = uint8.shape[1] * scale, uint8.shape[2] * scale
    return to_tensor(np.stack([np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BICUBIC)) for c in uint8]))


class PhotoCrops:
    """Random crops (with flips) of a few photos, made into pairs per minibatch.

    `task`: "colorize" (a = luma, b = colour) or "superres" (a = bicubic-downscaled by `scale`,
    b = the crop). `rotate` adds the quarter turns (the 8 symmetries of the square instead of 2):
    five training photos are little data, and SR's L1 fit keeps improving with more of it."""

    def __init__(self, names: tuple[str, ...], crop: int, task: str, scale: int = 4, rotate: bool = False) -> None:
        if task not in ("colorize", "superres"):
            raise ValueError(f"unknown photo task {task!r}")
        if task == "superres" and crop % scale:
            raise ValueError(f"crop {crop} is not a multiple of the scale {scale}")
        self.photos = [load_photo(name) for name in names]
        self.crop, self.task, self.scale, self.rotate = crop, task, scale, rotate

    def crops(self, n: int, generator: torch.Generator) -> np.ndarray:
        out = np.empty((n, self.crop, self.crop, 3), dtype=np.uint8)
        for i in range(n):
            photo = self.photos[int(torch.randint(len(self.photos), (), generator=generator))]
            top = int(torch.randint(photo.shape[0] - self.crop + 1, (), generator=generator))
            left = int(torch.randint(photo.shape[1] - self.crop + 1, (), generator=generator))
            patch = photo[top : top + self.crop, left : left + self.crop]
            patch = patch[:, ::-1] if torch.rand((), generator=generator) < 0.5 else patch
            out[i] = np.rot90(patch, int(torch.randint(4, (), generator=generator))) if self.rotate else patch
        return out

    def pairs(self, crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        target = to_tensor(crops)
        if self.task == "colorize":
            return luminance(target), target
        return to_tensor(bicubic_downscale(crops, self.scale)), target

    def minibatch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs(self.crops(batch_size, generator))

    def fixed(self, n: int, seed: int) -> Pairs:
        """A fixed set of crops (the held-out evaluation set when built on held-out photos)."""
        return Pairs(*self.pairs(self.crops(n, torch.Generator().manual_seed(seed))))
