"""Restoration networks we do not write ourselves: the super-resolution family (ESRGAN, Real-ESRGAN,
SRVGGNetCompact, SPAN, …) as spandrel builds them from a state dict alone.

spandrel's networks take and give images in [0, 1]; the project's image-to-image graphs take and
give [-1, 1] (the service's `to_model_input` and `to_uint8` assume it). `UnitRangeNetwork` adapts
one to the other inside the graph, and clamps the output to [0, 1] first, as spandrel's own
`ImageModelDescriptor.__call__` does, so a served image equals spandrel's.
"""
from __future__ import annotations

import torch
from torch import nn


class FusedConv3XC(nn.Module):
    """SPAN's `Conv3XC` at inference: its 1x1 → 3x3 → 1x1 convs and 1x1 shortcut fused into one 3x3
    conv (`eval_conv`), then leaky ReLU (0.05) if the block has one. spandrel's block re-fuses on
    every eval forward by assigning its own weights' `.data`, which export tracing cannot follow
    (torch 2.14's exporter crashes on it); fused once here, the block is a plain conv. The
    submodules keep their names, so the saved weights are still SPAN's and spandrel re-detects them."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        with torch.no_grad():
            block.update_params()
        self.sk, self.conv, self.eval_conv = block.sk, block.conv, block.eval_conv
        self.has_relu = bool(block.has_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.eval_conv(x)
        return torch.nn.functional.leaky_relu(out, negative_slope=0.05) if self.has_relu else out


def fuse_reparameterized(net: nn.Module) -> nn.Module:
    """Replaces every re-parameterising block spandrel builds (SPAN's Conv3XC) by its fused form."""
    for name, child in list(net.named_children()):
        if type(child).__name__ == "Conv3XC" and hasattr(child, "update_params") and hasattr(child, "eval_conv"):
            setattr(net, name, FusedConv3XC(child))
        else:
            fuse_reparameterized(child)
    return net


class UnitRangeNetwork(nn.Module):
    """[-1, 1] in and out around a [0, 1] network (its re-parameterising blocks fused)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = fuse_reparameterized(net.eval())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x + 1) * 0.5).clamp(0, 1) * 2 - 1


def load_spandrel(state: dict[str, torch.Tensor]):
    """spandrel's descriptor for a state dict (its architecture detection); raises
    spandrel.UnsupportedModelError when no architecture it knows matches."""
    import spandrel

    return spandrel.ModelLoader().load_from_state_dict(state)


def build_spandrel(weights: dict[str, torch.Tensor]) -> UnitRangeNetwork:
    """Rebuilds a served entry's network from its own saved weights (`net.`-prefixed, as
    `UnitRangeNetwork` saves them): spandrel detects the architecture again from them."""
    inner = {key.removeprefix("net."): value for key, value in weights.items()}
    return UnitRangeNetwork(load_spandrel(inner).model)
