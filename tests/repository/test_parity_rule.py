"""The export parity rule: a format within the tolerance of eager float32 passes; one that is not
passes only when float64 shows it is no further from the exact result than eager float32 itself."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from repository import graphs
from repository.graphs import Graph, TensorSpec, parity_errors


class CancellingSum(nn.Module):
    """(x + 1e7) - 1e7: float32 rounds x to whole numbers (error up to 0.5); float64 keeps x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1e7) - 1e7


def check(monkeypatch, exported_offset: float) -> dict:
    x = torch.rand(16, 8, generator=torch.Generator().manual_seed(0))
    graph = Graph("model", CancellingSum(), (x,), [TensorSpec("x", "float32", [-1, 8])], [TensorSpec("y", "float32", [-1, 8])])
    # a runtime that computes the sum exactly (as a fused kernel may), shifted by `exported_offset`
    monkeypatch.setattr(graphs, "exported_outputs", lambda graph, entry, formats, parts: {
        "onnx": [part[0].numpy() + np.float32(exported_offset) for part in parts]})
    return parity_errors(graph, None, ["onnx"], tolerance=1e-4)["onnx"]


def test_an_export_closer_to_float64_than_eager_passes_despite_disagreeing_with_eager(monkeypatch):
    result = check(monkeypatch, 0.0)
    assert result["parity_max_abs_error"] > 0.1 and result["float64_max_abs_error"] < 1e-6 and result["passed"]


def test_an_export_further_from_float64_than_eager_fails(monkeypatch):
    result = check(monkeypatch, 0.6)
    assert result["float64_max_abs_error"] > result["eager_float64_max_abs_error"] and not result["passed"]
