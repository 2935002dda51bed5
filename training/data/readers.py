"""Readers for the formats users bring: an image folder, MNIST IDX files, CIFAR-10 python batches.

Each returns a `TensorData` in [-1, 1] so a user's data trains exactly like the built-in sets.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from training.data.base import TensorData

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] → float [N, C, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float() / 127.5 - 1


def read_image_folder(root: str | Path, resolution: int, channels: int = 3) -> TensorData:
    """Every image under `root`; a sub-folder per class gives labels (like torchvision's ImageFolder).

    Each image is resized so its short side is `resolution`, then centre-cropped to a square.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    class_names = sorted({p.parent.relative_to(root).as_posix() for p in files} - {"."})
    mode = "L" if channels == 1 else "RGB"
    images = []
    for path in files:
        with Image.open(path) as image:
            fitted = ImageOps.fit(image.convert(mode), (resolution, resolution), Image.Resampling.BICUBIC)
            images.append(np.asarray(fitted).reshape(resolution, resolution, channels))
    labels = None
    if class_names:
        labels = torch.tensor([class_names.index(p.parent.relative_to(root).as_posix()) if p.parent != root else -1 for p in files])
        if (labels < 0).any():
            raise ValueError(f"{root} mixes images at its top level with class sub-folders")
    return TensorData(x=to_tensor(np.stack(images)), y=labels, class_names=class_names)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX array (MNIST's format), gzip-compressed or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{dtype_code:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values")
    return data.reshape(shape)


def read_mnist(images_path: str | Path, labels_path: str | Path | None = None) -> TensorData:
    """MNIST-style IDX images [N, H, W] (and labels [N]) as [N, 1, H, W] in [-1, 1]."""
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    labels = None
    if labels_path is not None:
        labels = torch.from_numpy(read_idx(labels_path).astype(np.int64))
    return TensorData(x=to_tensor(images[..., None]), y=labels, class_names=[str(d) for d in range(10)] if labels is not None else [])


def read_cifar10(batch_paths: list[str | Path], meta_path: str | Path | None = None) -> TensorData:
    """CIFAR-10 python batches (`data_batch_1` …): [N, 3, 32, 32] in [-1, 1] with labels.

    The batches are Python pickles by format; only open files you trust.
    """
    images, labels = [], []
    for path in batch_paths:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: expected data [N, 3072], got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch.get(b"labels", batch.get(b"fine_labels", [])))
    class_names = [f"class_{i}" for i in range(10)]
    if meta_path is not None:
        with open(meta_path, "rb") as handle:
            class_names = [name.decode() for name in pickle.load(handle, encoding="bytes")[b"label_names"]]
    return TensorData(x=to_tensor(np.concatenate(images)), y=torch.tensor(labels, dtype=torch.long), class_names=class_names)
