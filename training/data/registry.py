"""Turns a `DataConfig` into a train set and (where one exists) a fixed held-out set."""
from __future__ import annotations

from pathlib import Path

import torch

from training.config import DataConfig
from training.data.base import TensorData
from training.data.digits import load_digits
from training.data.gaussians import load_gaussians
from training.data.readers import read_cifar10, read_image_folder, read_mnist
from training.data.shapes import load_shapes

DATASETS = ("digits", "gaussians", "shapes", "image_folder", "mnist", "cifar10")


def split_off(data: TensorData, fraction: float = 0.1, seed: int = 0) -> tuple[TensorData, TensorData]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(len(data) * fraction))
    return data.subset(order[cut:]), data.subset(order[:cut])


def require_path(cfg: DataConfig) -> Path:
    if cfg.path is None:
        raise ValueError(f"data.path is required for the {cfg.name} dataset")
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
        return split_off(read_image_folder(require_path(cfg), cfg.resolution, cfg.channels))
    if cfg.name == "mnist":
        return split_off(read_mnist(require_path(cfg), cfg.labels_path))
    if cfg.name == "cifar10":
        root = require_path(cfg)
        batches = sorted(root.glob("data_batch_*"))
        if not batches:
            raise ValueError(f"no data_batch_* files in {root}")
        meta = root / "batches.meta"
        train = read_cifar10(batches, meta if meta.exists() else None)
        test = root / "test_batch"
        return (train, read_cifar10([test], meta if meta.exists() else None)) if test.exists() else split_off(train)
    raise ValueError(f"unknown dataset {cfg.name!r}")
