"""Offline datasets: every set the project trains on ships with a package or is generated here."""
from training.data.base import TensorData
from training.data.registry import DATASETS, load_dataset

__all__ = ["TensorData", "DATASETS", "load_dataset"]
