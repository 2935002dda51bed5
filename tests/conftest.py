"""Shared test settings: keep torch to the machine's two cores and deterministic."""
import torch

torch.set_num_threads(2)
