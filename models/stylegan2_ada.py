"""StyleGAN2 as NVlabs' stylegan2-ada-pytorch computes it (config-f generators, `skip`, `orig` or
`resnet` architecture), written for serving imported checkpoints.

Numerics follow the reference; the form follows the project's export rules (models/stylegan.py):
- modulation acts on activations (x·s → conv with the static weight → ·demod), never on
  per-sample grouped-conv weights, so the ONNX graph keeps a dynamic batch axis;
- upsampling is NVlabs' `upfirdn2d` with the checkpoint's own FIR filter ([1,3,3,1] in every
  published config), built from conv_transpose2d (zero insertion) and a depthwise conv2d, plain
  ops in every runtime; a modulated conv that upsamples is a stride-2 transposed conv followed by
  that filter, with the padding NVlabs' `conv2d_resample` computes;
- noise is each layer's constant buffer times its strength (`noise_mode="const"`, so a seed
  fixes an image) or nothing (`"none"`);
- equalized-learning-rate gains and lr multipliers are folded into the stored weights at import,
  so a `FullyConnected` here is a plain linear layer; `bias_act`'s gain (√2 for leaky ReLU) and
  `conv_clamp` are applied as the reference applies them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.resampling import SQRT2, bias_act, upfirdn2d

LRELU_SLOPE = 0.2
SQRT_HALF = math.sqrt(0.5)


def fir_filter(taps: list[float] | None = None) -> torch.Tensor:
    """NVlabs' `setup_filter`: the outer product of the taps, normalised to sum 1 → [fh, fw]."""
    f = torch.tensor(taps or [1.0, 3.0, 3.0, 1.0], dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


class FullyConnected(nn.Module):
    """A linear layer whose stored weight and bias already carry their equalized-lr gains."""

    def __init__(self, in_features: int, out_features: int, activation: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(F.linear(x, self.weight), self.bias, LRELU_SLOPE if self.activation else None, SQRT2 if self.activation else 1.0)


def normalize_2nd_moment(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class MappingNetwork(nn.Module):
    """z [B, z_dim] (and a class label [B] when `c_dim` > 0) → w [B, w_dim]: 2nd-moment
    normalisation, the class's embedding (normalised too) beside it, then `num_layers` leaky-ReLU
    layers. A label stands for NVlabs' one-hot `c`: its embedding is the weight column it selects.
    `w_avg` is the running mean of W the checkpoint tracked (truncation pulls toward it)."""

    def __init__(self, z_dim: int, w_dim: int, num_layers: int = 8, layer_features: int | None = None, c_dim: int = 0,
                 embed_features: int | None = None) -> None:
        super().__init__()
        embed = (embed_features or w_dim) if c_dim else 0
        if c_dim:
            self.embed = FullyConnected(c_dim, embed)
        features = [z_dim + embed] + [layer_features or w_dim] * (num_layers - 1) + [w_dim]
        for index in range(num_layers):
            setattr(self, f"fc{index}", FullyConnected(features[index], features[index + 1], activation=True))
        self.num_layers, self.c_dim = num_layers, c_dim
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        x = normalize_2nd_moment(z)
        if self.c_dim:
            if label is None:
                raise ValueError("this mapping network is conditional: it needs class labels")
            y = self.embed.weight.t()[label] + self.embed.bias  # = embed(one_hot(label))
            x = torch.cat([x, normalize_2nd_moment(y)], dim=1)
        for index in range(self.num_layers):
            x = getattr(self, f"fc{index}")(x)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally upsampling 2x), demodulation, constant noise, bias, leaky ReLU · √2, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: int = 1,
                 conv_clamp: float | None = None, use_noise: bool = True, kernel_size: int = 3, filter_size: int = 4) -> None:
        super().__init__()
        self.affine = FullyConnected(w_dim, in_channels)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.up, self.conv_clamp, self.use_noise, self.resolution = up, conv_clamp, use_noise, resolution
        self.padding = kernel_size // 2
        if use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros(()))
        if up > 1:
            self.register_buffer("resample_filter", fir_filter())
        self.noise_mode = "const"
        if up > 1:  # conv2d_resample's padding for a transposed conv followed by the filter
            p0 = self.padding + (filter_size + up - 1) // 2 - (kernel_size - 1)
            p1 = self.padding + (filter_size - up) // 2 - (kernel_size - up)
            self.transpose_padding = max(min(-p0, -p1), 0)
            self.filter_padding = (p0 + self.transpose_padding, p1 + self.transpose_padding)

    def forward(self, x: torch.Tensor, w: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        styles = self.affine(w)  # [B, in]
        energy = self.weight.square().sum(dim=(2, 3))  # [out, in]
        demod = torch.rsqrt(styles.square() @ energy.t() + 1e-8)  # [B, out]
        x = x * styles[:, :, None, None]
        if self.up == 1:
            x = F.conv2d(x, self.weight, padding=self.padding)
        else:
            x = F.conv_transpose2d(x, self.weight.transpose(0, 1), stride=self.up, padding=self.transpose_padding)
            x = upfirdn2d(x, self.resample_filter, padding=self.filter_padding * 2, gain=self.up**2)
        x = x * demod[:, :, None, None]
        if self.use_noise and self.noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        return bias_act(x, self.bias, LRELU_SLOPE, SQRT2 * gain, self.conv_clamp * gain if self.conv_clamp is not None else None)


class ResampledSkip(nn.Module):
    """The `resnet` architecture's shortcut: a 1x1 conv without bias (its 1/√fan_in gain folded into
    the weight), then NVlabs' FIR 2x upsampling — conv2d_resample's fast path for a 1x1 kernel."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1) / math.sqrt(in_channels))

    def forward(self, x: torch.Tensor, resample_filter: torch.Tensor, gain: float) -> torch.Tensor:
        fw = resample_filter.shape[-1]
        x = upfirdn2d(F.conv2d(x, self.weight), resample_filter, up=2, padding=((fw + 1) // 2, (fw - 2) // 2) * 2, gain=4.0)
        return x * gain


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation (the reference's 1/√fan_in style gain folded into the weight)."""

    def __init__(self, in_channels: int, img_channels: int, w_dim: int, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.affine = FullyConnected(w_dim, in_channels)
        self.weight = nn.Parameter(torch.randn(img_channels, in_channels, 1, 1) / math.sqrt(in_channels))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.conv_clamp = conv_clamp

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x * self.affine(w)[:, :, None, None], self.weight)
        return bias_act(x, self.bias, None, 1.0, self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: the learned constant (4x4) or an upsampling conv, a conv, and a ToRGB whose
    output is added to the upsampled image of the resolution below (`skip`); or, in `resnet`, the
    two convs beside an upsampling 1x1 shortcut, each scaled by √0.5 (ToRGB at the end only, as `orig`)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int, is_last: bool,
                 architecture: str = "skip", conv_clamp: float | None = None, use_noise: bool = True) -> None:
        super().__init__()
        self.in_channels, self.resolution, self.architecture, self.is_last = in_channels, resolution, architecture, is_last
        self.register_buffer("resample_filter", fir_filter())
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp, use_noise=use_noise)
            if architecture == "resnet":
                self.skip = ResampledSkip(in_channels, out_channels)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp, use_noise=use_noise)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1 if is_last or architecture == "skip" else 0
        if self.num_torgb:
            self.torgb = ToRGB(out_channels, img_channels, w_dim, conv_clamp)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.in_channels == 0:
            x = self.conv1(self.const[None].expand(ws.shape[0], -1, -1, -1), ws[:, 0])
        elif self.architecture == "resnet":
            shortcut = self.skip(x, self.resample_filter, SQRT_HALF)
            x = shortcut + self.conv1(self.conv0(x, ws[:, 0]), ws[:, 1], gain=SQRT_HALF)
        else:
            x = self.conv1(self.conv0(x, ws[:, 0]), ws[:, 1])
        index = self.num_conv
        if img is not None:  # upfirdn2d.upsample2d
            fw = self.resample_filter.shape[-1]
            img = upfirdn2d(img, self.resample_filter, up=2, padding=((fw + 1) // 2, (fw - 2) // 2) * 2, gain=4.0)
        if self.num_torgb:
            y = self.torgb(x, ws[:, index])
            img = y if img is None else img + y
        return x, img


def channels_for(resolution: int, channel_base: int, channel_max: int, channels: dict | None = None) -> int:
    """NVlabs' rule (`channel_base // resolution`, at most `channel_max`), unless `channels`
    names the resolution (rosinality's table, or a fork's)."""
    if channels and str(resolution) in {str(k) for k in channels}:
        return int({str(k): v for k, v in channels.items()}[str(resolution)])
    return min(channel_base // resolution, channel_max)


class SynthesisNetwork(nn.Module):
    """ws [B, num_ws, w_dim] → image [B, img_channels, resolution, resolution] (about [-1, 1]).

    Block b{res} reads ws[i : i + num_conv + num_torgb] and the next block starts at
    i + num_conv, so a ToRGB shares its w with the next block's first conv (as in NVlabs)."""

    def __init__(self, w_dim: int, resolution: int, img_channels: int, channel_base: int = 32768, channel_max: int = 512,
                 architecture: str = "skip", conv_clamp: float | None = None, use_noise: bool = True, channels: dict | None = None) -> None:
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two ≥ 4, not {resolution}")
        if architecture not in ("skip", "orig", "resnet"):
            raise ValueError(f"architecture {architecture!r} is not served: skip, orig or resnet")
        self.resolutions = [2**i for i in range(2, int(math.log2(resolution)) + 1)]
        self.num_ws = 0
        for res in self.resolutions:
            in_channels = channels_for(res // 2, channel_base, channel_max, channels) if res > 4 else 0
            block = SynthesisBlock(in_channels, channels_for(res, channel_base, channel_max, channels), w_dim, res, img_channels, res == resolution,
                                   architecture, conv_clamp, use_noise)
            self.num_ws += block.num_conv + (block.num_torgb if res == resolution else 0)
            setattr(self, f"b{res}", block)

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        x = img = None
        start = 0
        for res in self.resolutions:
            block = getattr(self, f"b{res}")
            x, img = block(x, img, ws[:, start : start + block.num_conv + block.num_torgb])
            start += block.num_conv
        return img

    def set_noise_mode(self, mode: str) -> None:
        if mode not in ("const", "none"):
            raise ValueError(f"noise_mode {mode!r}: const or none (random noise would make a seed's image change)")
        for module in self.modules():
            if isinstance(module, SynthesisLayer):
                module.noise_mode = mode


class MappedSynthesis(nn.Module):
    """What the service and projection ask of a style generator: `mapping`, `synthesis`,
    `num_ws`, `w_avg`, and `forward(z[, label])` sampling at ψ = 1."""

    mapping: MappingNetwork
    synthesis: nn.Module
    num_ws: int

    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping.w_avg

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        w = self.mapping(z, label)
        return self.synthesis(w[:, None, :].expand(-1, self.num_ws, -1))


class StyleGAN2Generator(MappedSynthesis):
    """Mapping + synthesis with NVlabs' hyperparameters."""

    def __init__(self, z_dim: int, w_dim: int, resolution: int, img_channels: int = 3, mapping_layers: int = 8,
                 layer_features: int | None = None, channel_base: int = 32768, channel_max: int = 512, architecture: str = "skip",
                 conv_clamp: float | None = None, use_noise: bool = True, noise_mode: str = "const", channels: dict | None = None,
                 c_dim: int = 0, embed_features: int | None = None) -> None:
        super().__init__()
        self.synthesis = SynthesisNetwork(w_dim, resolution, img_channels, channel_base, channel_max, architecture, conv_clamp, use_noise, channels)
        self.synthesis.set_noise_mode(noise_mode)
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, layer_features, c_dim, embed_features)
        self.num_ws = self.synthesis.num_ws
