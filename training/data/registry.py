"""Turns a `DataConfig` into a train set and (where one exists) a fixed held-out set."""
from __future__ import annotations

from pathlib import Path

import torch

from training.config import DataConfig
from training.data.base import TensorData
from training.data.digits import load_digits
from training.data.gaussians import load_gaussians
from training.data.readers import DataError, cifar_batches, read_cifar10, read_image_folder, read_mnist
from training.data.shapes import load_shapes

DATASETS = ("digits", "gaussians", "shapes", "image_folder", "mnist", "cifar10")
MIN_SAMPLES = 10  # a user's set smaller than this trains on nothing: a tenth is held out, KID needs two of each
COMPACT_BYTES = 64 * 2**20  # moved at a time by `split_off`


def split_off(data: TensorData, source: object, fraction: float = 0.1, seed: int = 0) -> tuple[TensorData, TensorData]:
    """(train, held_out) of a user's set: a fixed random `fraction` held out (copied), the rest
    moved up in place, in order, and kept as a view, so that a large folder's tensor is never held
    twice (a copy of the train rows took 10 GB for 20k images at 128 px). Consumes `data`."""
    if len(data) < MIN_SAMPLES:
        raise DataError(f"{source} holds {len(data)} samples: too few to train on (at least {MIN_SAMPLES}: "
                        f"a tenth is held out to judge the generator)")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(len(data) * fraction))
    held_out = data.subset(order[:cut])
    keep = order[cut:].sort().values
    columns = [data.x, *([data.y] if data.y is not None else []), *data.factors.values()]
    step = max(1, COMPACT_BYTES // max(1, data.x[:1].nbytes))
    for start in range(0, len(keep), step):  # rows only move up (keep[i] ≥ i): each read precedes its overwrite
        rows = keep[start:start + step]
        for column in columns:
            column[start:start + len(rows)] = column[rows]
    size = len(keep)
    train = TensorData(x=data.x[:size], y=None if data.y is None else data.y[:size], class_names=list(data.class_names),
                       factors={name: values[:size] for name, values in data.factors.items()})
    return train, held_out


def require_path(cfg: DataConfig) -> Path:
    if cfg.path is None:
        raise DataError(f"data.path is required for the {cfg.name} dataset")
    return Path(cfg.path)


def load_dataset(cfg: DataConfig) -> tuple[TensorData, TensorData | None]:
    """(train, held_out). Held-out sets are disjoint from train and fixed across runs."""
    if cfg.name == "digits":
        return load_digits("train", cfg.resolution), load_digits("held_out", cfg.resolution)
    if cfg.name == "gaussians":
        return load_gaussians(cfg.mixture, cfg.size, seed=0), load_gaussians(cfg.mixture, 10_000, seed=1)
    if cfg.name == "shapes":
        return load_shapes(cfg.size, cfg.resolution, seed=0), load_shapes(max(500, cfg.size // 10), cfg.resolution, seed=1)
    if cfg.name == "image_folder":
        root = require_path(cfg)
        return split_off(read_image_folder(root, cfg.resolution, cfg.channels), root)
    if cfg.name == "mnist":
        images = require_path(cfg)
        return split_off(read_mnist(images, cfg.labels_path, cfg.resolution), images)
    if cfg.name == "cifar10":
        root = require_path(cfg)
        if not root.is_dir():
            raise DataError(f"CIFAR-10 folder {root} does not exist")
        batches = cifar_batches(root)
        if not batches:
            raise DataError(f"no data_batch_N files in {root}")
        meta = root / "batches.meta"
        train = read_cifar10(batches, meta if meta.exists() else None, cfg.resolution)
        test = root / "test_batch"
        return (train, read_cifar10([test], meta if meta.exists() else None, cfg.resolution)) if test.exists() else split_off(train, root)
    raise ValueError(f"unknown dataset {cfg.name!r}")
