"""NVlabs' resampling and activation primitives, in plain PyTorch ops that export to ONNX and
TorchScript with a dynamic batch axis: `upfirdn2d` (upsample by zero insertion, pad or crop,
FIR-filter, downsample) and `bias_act` (bias, leaky ReLU with gain, clamp). Shared by the
StyleGAN2 and StyleGAN3 generators that serve imported checkpoints."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SQRT2 = math.sqrt(2.0)


def upfirdn2d(x: torch.Tensor, f: torch.Tensor | None, up: int = 1, down: int = 1, padding: tuple[int, int, int, int] = (0, 0, 0, 0),
              gain: float = 1.0) -> torch.Tensor:
    """x [B, C, H, W]; `f` a 2-D filter, a 1-D separable one (applied along width, then height),
    or None (no filtering); `padding` = (x_before, x_after, y_before, y_after), negative crops.
    As NVlabs' reference: zeros after each sample when upsampling, the filter flipped (a
    convolution), `gain` spread over the filter's dimensions, every `down`-th sample kept."""
    channels = x.shape[1]
    if up > 1:
        ones = torch.ones(channels, 1, 1, 1, dtype=x.dtype, device=x.device)
        x = F.conv_transpose2d(x, ones, stride=up, output_padding=up - 1, groups=channels)
    px0, px1, py0, py1 = padding
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    if min(padding) < 0:
        x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
    if f is not None:
        kernel = (f * gain ** (f.ndim / 2)).flip(list(range(f.ndim))).to(x.dtype)
        if f.ndim == 2:
            x = F.conv2d(x, kernel[None, None].repeat(channels, 1, 1, 1), groups=channels)
        else:
            x = F.conv2d(x, kernel[None, None, None, :].repeat(channels, 1, 1, 1), groups=channels)
            x = F.conv2d(x, kernel[None, None, :, None].repeat(channels, 1, 1, 1), groups=channels)
    elif gain != 1:
        x = x * gain
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, slope: float | None, gain: float = 1.0, clamp: float | None = None) -> torch.Tensor:
    """Add the bias (per channel), leaky ReLU with `slope` (None: linear), times `gain`, clamp to ±clamp."""
    if bias is not None:
        x = x + bias.reshape(1, -1, *([1] * (x.ndim - 2)))
    if slope is not None and slope != 1:
        x = F.leaky_relu(x, slope)
    if gain != 1:
        x = x * gain
    return x.clamp(-clamp, clamp) if clamp is not None else x
