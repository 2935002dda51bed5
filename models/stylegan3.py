"""StyleGAN3 (alias-free; `stylegan3-t` and `stylegan3-r`) as NVlabs' stylegan3 computes it, for
serving imported checkpoints.

The synthesis network is a Fourier-feature input (frequencies rotated and translated by an
affine of the first w), then `num_layers` + 1 layers, each a modulated conv followed by a
*filtered* leaky ReLU: bias, upsample with a low-pass filter, leaky ReLU · √2 and clamp at the
higher sampling rate, low-pass and downsample. Geometry (sampling rates, cutoffs, sizes, channels,
filter lengths, paddings) follows from the constructor arguments as in the reference; the filters
themselves are checkpoint buffers. Export rules as in models/stylegan2_ada.py: activation-form
modulation (dynamic batch), plain ops, gains folded into stored weights at import. Two details
of the reference are dropped because they cancel: the per-layer weight standardisation and the
batch-wide style normalisation before demodulation (demodulation divides both out again, up to
its 1e-8 epsilon) — keeping the latter would make an image depend on the rest of its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.resampling import SQRT2, bias_act, upfirdn2d
from models.stylegan2_ada import FullyConnected, MappedSynthesis, MappingNetwork

LRELU_SLOPE = 0.2


@dataclass(frozen=True)
class LayerGeometry:
    in_channels: int
    out_channels: int
    in_size: int
    out_size: int
    in_sampling_rate: int
    out_sampling_rate: int
    in_cutoff: float
    out_cutoff: float
    is_torgb: bool
    is_critically_sampled: bool
    conv_kernel: int
    up_factor: int
    down_factor: int
    up_taps: int
    down_taps: int
    down_radial: bool
    padding: tuple[int, int, int, int]  # (x_lo, x_hi, y_lo, y_hi)


@dataclass(frozen=True)
class SynthesisGeometry:
    input_channels: int
    input_size: int
    input_sampling_rate: float
    input_bandwidth: float
    layers: list[LayerGeometry]


def synthesis_geometry(img_resolution: int, img_channels: int, channel_base: int = 32768, channel_max: int = 512, num_layers: int = 14,
                       num_critical: int = 2, first_cutoff: float = 2, first_stopband: float = 2**2.1, last_stopband_rel: float = 2**0.3,
                       margin_size: int = 10, conv_kernel: int = 3, filter_size: int = 6, lrelu_upsampling: int = 2,
                       use_radial_filters: bool = False) -> SynthesisGeometry:
    """Every layer's sampling rate, cutoff, size, channels, factors, filter lengths and padding,
    by the rules of the paper (section 3 and appendix C) as the reference implements them."""
    last_cutoff = img_resolution / 2
    last_stopband = last_cutoff * last_stopband_rel
    exponents = np.minimum(np.arange(num_layers + 1) / (num_layers - num_critical), 1)
    cutoffs = first_cutoff * (last_cutoff / first_cutoff) ** exponents
    stopbands = first_stopband * (last_stopband / first_stopband) ** exponents
    rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, img_resolution))))
    sizes = rates + margin_size * 2
    sizes[-2:] = img_resolution
    channels = np.rint(np.minimum((channel_base / 2) / cutoffs, channel_max))
    channels[-1] = img_channels
    layers = []
    for index in range(num_layers + 1):
        prev = max(index - 1, 0)
        is_torgb = index == num_layers
        kernel = 1 if is_torgb else conv_kernel
        in_rate, out_rate = int(rates[prev]), int(rates[index])
        tmp_rate = max(in_rate, out_rate) * (1 if is_torgb else lrelu_upsampling)
        up, down = int(np.rint(tmp_rate / in_rate)), int(np.rint(tmp_rate / out_rate))
        up_taps = filter_size * up if up > 1 and not is_torgb else 1
        down_taps = filter_size * down if down > 1 and not is_torgb else 1
        in_size, out_size = int(sizes[prev]), int(sizes[index])
        pad_total = (out_size - 1) * down + 1 - (in_size + kernel - 1) * up + up_taps + down_taps - 2
        pad_lo = (pad_total + up) // 2  # the symmetric interpretation of sample positions (appendix C.3)
        pad_hi = pad_total - pad_lo
        is_critical = index >= num_layers - num_critical
        layers.append(LayerGeometry(int(channels[prev]), int(channels[index]), in_size, out_size, in_rate, out_rate,
                                    float(cutoffs[prev]), float(cutoffs[index]), is_torgb, is_critical, kernel, up, down, up_taps,
                                    down_taps, use_radial_filters and not is_critical, (pad_lo, pad_hi, pad_lo, pad_hi)))
    return SynthesisGeometry(int(channels[0]), int(sizes[0]), float(rates[0]), float(cutoffs[0]), layers)


class SynthesisInput(nn.Module):
    """Fourier features [B, C, size, size]: fixed frequencies and phases, rotated and translated by
    an affine of w, band-limited by amplitudes that fade frequencies near the Nyquist rate."""

    def __init__(self, w_dim: int, channels: int, size: int, sampling_rate: float, bandwidth: float) -> None:
        super().__init__()
        self.sampling_rate, self.bandwidth = sampling_rate, bandwidth
        self.affine = FullyConnected(w_dim, 4)
        self.weight = nn.Parameter(torch.randn(channels, channels) / math.sqrt(channels))  # the reference's 1/√C folded in
        self.register_buffer("transform", torch.eye(3))
        self.register_buffer("freqs", torch.zeros(channels, 2))
        self.register_buffer("phases", torch.zeros(channels))
        theta = torch.tensor([[0.5 * size / sampling_rate, 0.0, 0.0], [0.0, 0.5 * size / sampling_rate, 0.0]])
        self.register_buffer("grid", F.affine_grid(theta[None], [1, 1, size, size], align_corners=False), persistent=False)  # [1, H, W, 2]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        t = self.affine(w)  # (r_c, r_s, t_x, t_y)
        t = t / t[:, :2].norm(dim=1, keepdim=True)
        c, s, tx, ty = t.unbind(dim=1)
        zero, one = torch.zeros_like(c), torch.ones_like(c)
        # inverse rotation, then inverse translation, of the resulting image: m_r @ m_t
        motion = torch.stack([torch.stack([c, -s, -c * tx + s * ty], dim=1), torch.stack([s, c, -s * tx - c * ty], dim=1),
                              torch.stack([zero, zero, one], dim=1)], dim=1)  # [B, 3, 3]
        transforms = motion @ self.transform
        phases = self.phases[None] + (self.freqs[None] @ transforms[:, :2, 2:]).squeeze(2)  # [B, C]
        freqs = self.freqs[None] @ transforms[:, :2, :2]  # [B, C, 2]
        amplitudes = (1 - (freqs.norm(dim=2) - self.bandwidth) / (self.sampling_rate / 2 - self.bandwidth)).clamp(0, 1)
        x = (self.grid.unsqueeze(3) @ freqs.permute(0, 2, 1).unsqueeze(1).unsqueeze(2)).squeeze(3)  # [B, H, W, C]
        x = torch.sin((x + phases[:, None, None, :]) * (2 * math.pi)) * amplitudes[:, None, None, :]
        return (x @ self.weight.t()).permute(0, 3, 1, 2)


class SynthesisLayer(nn.Module):
    """Modulated conv (padding k-1), then the filtered leaky ReLU of the reference."""

    def __init__(self, w_dim: int, geometry: LayerGeometry, conv_clamp: float | None = 256) -> None:
        super().__init__()
        g = geometry
        self.geometry, self.conv_clamp = g, conv_clamp
        self.affine = FullyConnected(w_dim, g.in_channels)
        self.weight = nn.Parameter(torch.randn(g.out_channels, g.in_channels, g.conv_kernel, g.conv_kernel))
        self.bias = nn.Parameter(torch.zeros(g.out_channels))
        self.register_buffer("magnitude_ema", torch.ones(()))
        self.register_buffer("up_filter", torch.zeros(g.up_taps) if g.up_taps > 1 else None)
        down_shape = (g.down_taps, g.down_taps) if g.down_radial else (g.down_taps,)
        self.register_buffer("down_filter", torch.zeros(down_shape) if g.down_taps > 1 else None)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        styles = self.affine(w)  # [B, in]
        x = F.conv2d(x * styles[:, :, None, None], self.weight, padding=g.conv_kernel - 1)
        if not g.is_torgb:  # demodulate
            energy = self.weight.square().sum(dim=(2, 3))  # [out, in]
            x = x * torch.rsqrt(styles.square() @ energy.t() + 1e-8)[:, :, None, None]
        x = x * self.magnitude_ema.rsqrt()
        x = bias_act(x, self.bias, None)
        x = upfirdn2d(x, self.up_filter, up=g.up_factor, padding=g.padding, gain=g.up_factor**2)
        x = bias_act(x, None, None if g.is_torgb else LRELU_SLOPE, 1.0 if g.is_torgb else SQRT2, self.conv_clamp)
        return upfirdn2d(x, self.down_filter, down=g.down_factor)


class SynthesisNetwork(nn.Module):
    """ws [B, num_layers + 2, w_dim] → image [B, img_channels, res, res]: ws[0] drives the input,
    ws[i + 1] layer i."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, conv_clamp: float | None = 256, output_scale: float = 0.25,
                 **geometry_options) -> None:
        super().__init__()
        geometry = synthesis_geometry(img_resolution, img_channels, **geometry_options)
        self.input = SynthesisInput(w_dim, geometry.input_channels, geometry.input_size, geometry.input_sampling_rate, geometry.input_bandwidth)
        self.layers = nn.ModuleList(SynthesisLayer(w_dim, layer, conv_clamp) for layer in geometry.layers)
        self.num_ws = len(geometry.layers) + 1
        self.output_scale = output_scale

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        x = self.input(ws[:, 0])
        for index, layer in enumerate(self.layers):
            x = layer(x, ws[:, index + 1])
        return x * self.output_scale


class StyleGAN3Generator(MappedSynthesis):
    def __init__(self, z_dim: int, w_dim: int, resolution: int, img_channels: int = 3, mapping_layers: int = 2, conv_clamp: float | None = 256,
                 output_scale: float = 0.25, c_dim: int = 0, **geometry_options) -> None:
        super().__init__()
        self.synthesis = SynthesisNetwork(w_dim, resolution, img_channels, conv_clamp, output_scale, **geometry_options)
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, c_dim=c_dim)
        self.num_ws = self.synthesis.num_ws
