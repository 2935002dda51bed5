"""scikit-learn's 1,797 real 8x8 handwritten digits, upsampled for convolutional GANs.

The held-out split is fixed (seeded permutation) so that the real-vs-real FID floor and the
feature classifier's accuracy are always measured on the same images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.data.base import TensorData

HELD_OUT = 297  # 1,500 train / 297 held-out
SPLIT_SEED = 0


def load_digits(split: str = "train", resolution: int = 32) -> TensorData:
    """Digits as [N, 1, resolution, resolution] in [-1, 1] with labels 0..9."""
    from sklearn.datasets import load_digits as sk_load_digits

    if split not in ("train", "held_out", "all"):
        raise ValueError(f"unknown digits split {split!r}: use train, held_out or all")
    if resolution not in (8, 16, 32, 64):
        raise ValueError(f"digits resolution must be 8, 16, 32 or 64, not {resolution}")
    bunch = sk_load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bicubic", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).contiguous()
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    index = {"train": order[HELD_OUT:], "held_out": order[:HELD_OUT], "all": order}[split]
    return TensorData(x=images[index], y=labels[index], class_names=[str(d) for d in range(10)])
