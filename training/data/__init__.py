"""Offline datasets: every set the project trains on ships with a package or is generated here."""
from training.data.base import TensorData, as_floats
from training.data.registry import DATASETS, load_dataset

__all__ = ["TensorData", "as_floats", "DATASETS", "load_dataset"]
