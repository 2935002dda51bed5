"""Half precision (bf16, fp16) on the torch runtimes, served only where it stays close to fp32.

A model asks for it in its serving configuration (`precision`, spec.json `serving` or the
operator's `serving.json`); at load the server runs the fp32 and the half-precision graph on
the same fixed, seeded inputs and serves the half one only when the difference stays within the
bound of its kind, in fractions of the output's value range (1/255 is one 8-bit level of the
served image): mean ≤ 1/255 and max ≤ 8/255 — a difference a viewer cannot tell on average, with
room for the few pixels rounding flips. Otherwise the entry fails with the measured figures. What
was measured is listed by `GET /v1/models/{name}` (`precision`), beside what export measured on
its CPU (`half_precision` in spec.json: repository/graphs.py `half_precision_parity`); this check on
the serving device is the one that decides, since kernels and their rounding differ by device. On a GPU half precision halves
the memory traffic of every layer; on a CPU without bf16 units it is slower, and is there to be
tested.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from models.entry_schema import HALF_PRECISION_MAX_BOUND, HALF_PRECISION_MEAN_BOUND
from service.repository import ModelEntry

HALF_PRECISIONS = ("bf16", "fp16")
# `precision: auto` (the default) on a CUDA device with a torch runtime tries these in order and
# serves the first whose parity holds, else fp32: bf16 first for fp32's exponent range (nothing
# overflows), fp16 next (more mantissa bits: closer where no activation leaves its range). On a CPU
# and with ONNX Runtime (whose export is fp32) `auto` is fp32.
AUTO_ORDER = ("bf16", "fp16")
MEAN_BOUND = HALF_PRECISION_MEAN_BOUND  # fractions of the output's value range (the entry schema states them)
MAX_BOUND = HALF_PRECISION_MAX_BOUND
PARITY_BATCH = 8
PARITY_SEED = 20261201


@dataclass(frozen=True)
class PrecisionParity:
    precision: str
    mean_abs_error: float  # fraction of the output's value range
    max_abs_error: float
    mean_bound: float = MEAN_BOUND
    max_bound: float = MAX_BOUND

    @property
    def within_bound(self) -> bool:
        return self.mean_abs_error <= self.mean_bound and self.max_abs_error <= self.max_bound

    def describe(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()} | {"within_bound": self.within_bound}


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def parity_inputs(entry: ModelEntry, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`inputs` (zeros of the graph's shapes) with their float tensors filled from a fixed seed:
    normal latents, images uniform in [-1, 1]; integer inputs (classes) and BigGAN's truncation
    statistics are kept."""
    rng = np.random.default_rng(PARITY_SEED)
    filled = dict(inputs)
    for name, array in inputs.items():
        if array.dtype != np.float32 or name == "truncation_stats":
            continue
        values = rng.uniform(-1, 1, array.shape) if name == "image" else rng.standard_normal(array.shape)
        filled[name] = values.astype(np.float32)
    return filled


def measure_parity(entry: ModelEntry, precision: str, reference_run, half_run, inputs: dict[str, np.ndarray]) -> PrecisionParity:
    """Both graphs on the same inputs; the differences in fractions of the value range."""
    low, high = entry.spec["value_range"]
    expected, got = reference_run(inputs), half_run(inputs)
    difference = np.abs(got.astype(np.float64) - expected.astype(np.float64)) / (high - low)
    if not np.isfinite(difference).all():
        return PrecisionParity(precision, float("inf"), float("inf"))
    return PrecisionParity(precision, float(difference.mean()), float(difference.max()))


def half_candidates(requested: str, runtime: str, device: str) -> list[str]:
    """The half precisions to try at load, in order (empty: serve fp32): the one asked for, or
    for `auto` AUTO_ORDER where half precision pays — a CUDA device and a torch runtime."""
    if requested in HALF_PRECISIONS:
        return [requested]
    if requested == "auto" and device == "cuda" and runtime in ("torchscript", "eager"):
        return list(AUTO_ORDER)
    return []
