"""A StyleGAN2-style generator and a residual discriminator, sized for small images.

Built for export as much as for training (see DESIGN.md, the model-repository entry):
- modulation acts on activations (x·s → conv with the static weight → x·demod), never on
  per-sample grouped-conv weights, so the ONNX graph keeps a dynamic batch axis (and it is the
  faster form on GPUs too);
- noise is an input or a constant buffer (`noise_mode="const"`), never drawn inside an exported
  graph;
- upsampling is bilinear interpolation, a plain op in every runtime;
- truncation and style mixing stay outside the graphs: they are W arithmetic on the server.

Names follow rosinality's stylegan2-pytorch: `EqualLinear`, `ModulatedConv2d`, `StyledConv`, `ToRGB`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate: weights stored N(0, 1/lr_mul), scaled at run
    time by lr_mul/sqrt(fan_in), so Adam's step size is the same for every layer."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0, activation: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * SQRT2 if self.activation else out


class MappingNetwork(nn.Module):
    """z [B, z_dim] (and an optional class) → w [B, w_dim] through `num_layers` EqualLinear layers."""

    def __init__(self, z_dim: int = 128, w_dim: int = 128, num_layers: int = 8, lr_mul: float = 0.01, num_classes: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        in_features = z_dim * (2 if num_classes else 1)
        layers = []
        for i in range(num_layers):
            layers.append(EqualLinear(in_features if i == 0 else w_dim, w_dim, lr_mul=lr_mul, activation=True))
        self.layers = nn.Sequential(*layers)

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        x = self.normalize(z)
        if self.embed is not None:
            if label is None:
                raise ValueError("this mapping network is conditional: it needs class labels")
            x = torch.cat([x, self.normalize(self.embed(label))], dim=1)
        return self.layers(x)


class ModulatedConv2d(nn.Module):
    """Conv whose input channels are scaled per sample by a style s = A(w), then (optionally)
    demodulated so each output channel has unit expected variance. Activation form:
    y = conv(x · s, W) · d, with d = 1/sqrt(Σ_{i,k} (W_{o,i,k} s_i)² + ε)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int, demodulate: bool = True, upsample: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.demodulate = demodulate
        self.upsample = upsample
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.affine(w)  # [B, in]
        weight = self.weight * self.scale  # [out, in, k, k]
        x = x * style[:, :, None, None]
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            weight_energy = weight.pow(2).sum(dim=(2, 3))  # [out, in]
            demod = torch.rsqrt(style.pow(2) @ weight_energy.t() + 1e-8)  # [B, out]
            x = x * demod[:, :, None, None]
        return x


class StyledConv(nn.Module):
    """ModulatedConv2d + per-pixel noise with a learned strength + bias + leaky ReLU (gain √2).
    `noise` is a [B or 1, 1, H, W] tensor given by the caller; the module also keeps a constant
    noise buffer for deterministic, exportable synthesis."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, upsample: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, upsample=upsample)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))
        self.resolution = resolution

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        x = self.conv(x, w)
        x = x + self.noise_strength * (self.noise_const if noise is None else noise)
        return F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * SQRT2


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to image channels; adds the upsampled skip."""

    def __init__(self, in_channels: int, img_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, img_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(img_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        rgb = self.conv(x, w) + self.bias[None, :, None, None]
        if skip is not None:
            rgb = rgb + F.interpolate(skip, scale_factor=2.0, mode="bilinear", align_corners=False)
        return rgb


def channels_at(resolution: int, width: int, max_channels: int) -> int:
    """Feature maps halve as resolution doubles, from `max_channels` at 4x4 down to `width`."""
    return max(width, min(max_channels, width * 32 // resolution))


class SynthesisNetwork(nn.Module):
    """ws [B, num_ws, w_dim] → image [B, img_channels, resolution, resolution] (unbounded, ~[-1, 1]).

    Layer order of ws: for 4x4, conv then rgb share ws[0..1]; each higher resolution uses
    two convs and one rgb: conv_up → ws[2i-1], conv → ws[2i], rgb → ws[2i+1].

    `arch` is StyleGAN2's output architecture: "skip" sums a ToRGB at every resolution (its
    default), "orig" has one ToRGB at the end. On flat-coloured shapes the skip form paints the
    colour in the 4x4/8x8 ToRGBs, so colour follows the coarse styles; with one ToRGB, modulated
    by the last w, colour can only be chosen in the fine layers (the split that style mixing
    promises). Both take the same ws, so every latent tool is unchanged."""

    def __init__(self, w_dim: int = 128, resolution: int = 32, img_channels: int = 3, width: int = 32, max_channels: int = 256,
                 arch: str = "skip") -> None:
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two ≥ 8, not {resolution}")
        if arch not in ("skip", "orig"):
            raise ValueError(f"synthesis arch must be skip or orig, not {arch!r}")
        self.resolution, self.arch = resolution, arch
        self.log_size = int(math.log2(resolution))
        self.num_ws = self.log_size * 2 - 2
        c4 = channels_at(4, width, max_channels)
        self.const = nn.Parameter(torch.randn(1, c4, 4, 4))
        self.conv4 = StyledConv(c4, c4, w_dim, 4)
        self.rgb4 = ToRGB(c4, img_channels, w_dim) if arch == "skip" else None
        self.convs = nn.ModuleList()
        self.rgbs = nn.ModuleList()  # skip: one per resolution from 8x8; orig: the last only
        in_channels = c4
        for level in range(3, self.log_size + 1):
            res = 2**level
            out_channels = channels_at(res, width, max_channels)
            self.convs.append(StyledConv(in_channels, out_channels, w_dim, res, upsample=True))
            self.convs.append(StyledConv(out_channels, out_channels, w_dim, res))
            if arch == "skip" or level == self.log_size:
                self.rgbs.append(ToRGB(out_channels, img_channels, w_dim))
            in_channels = out_channels

    def noise_shapes(self) -> list[int]:
        """Resolution of each noise input, in layer order."""
        return [4] + [conv.resolution for conv in self.convs]

    def forward(self, ws: torch.Tensor, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        noises = noise if noise is not None else [None] * (1 + len(self.convs))
        x = self.const.expand(ws.shape[0], -1, -1, -1)
        x = self.conv4(x, ws[:, 0], noises[0])
        rgb = self.rgb4(x, ws[:, 1], None) if self.rgb4 is not None else None
        levels = len(self.convs) // 2
        for i in range(levels):
            x = self.convs[2 * i](x, ws[:, 2 * i + 1], noises[2 * i + 1])
            x = self.convs[2 * i + 1](x, ws[:, 2 * i + 2], noises[2 * i + 2])
            if self.arch == "skip":
                rgb = self.rgbs[i](x, ws[:, 2 * i + 3], rgb)
        if self.arch == "orig":
            rgb = self.rgbs[0](x, ws[:, -1], None)
        return rgb

    def random_noise(self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return [torch.randn(batch, 1, r, r, generator=generator).to(device) for r in self.noise_shapes()]


class StyleGenerator(nn.Module):
    """Mapping + synthesis, with the running mean of w (`w_avg`) kept for truncation."""

    def __init__(self, z_dim: int = 128, w_dim: int = 128, resolution: int = 32, img_channels: int = 3, width: int = 32,
                 max_channels: int = 256, mapping_layers: int = 8, num_classes: int = 0, synthesis_arch: str = "skip") -> None:
        super().__init__()
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, num_classes=num_classes)
        self.synthesis = SynthesisNetwork(w_dim, resolution, img_channels, width, max_channels, synthesis_arch)
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.num_ws = self.synthesis.num_ws

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None, truncation_psi: float = 1.0, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        w = self.mapping(z, label)
        if truncation_psi != 1.0:
            w = self.w_avg.lerp(w, truncation_psi)
        return self.synthesis(w[:, None, :].expand(-1, self.num_ws, -1), noise)


class MinibatchStdDev(nn.Module):
    """Appends the mean standard deviation across a group of samples as an extra feature map
    (Karras et al., 2018): a batch of near-identical fakes becomes easy to spot, which counters
    mode collapse."""

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        group = min(self.group_size, b)
        while b % group:
            group -= 1
        y = x.reshape(group, -1, c, h, w)  # [G, B/G, C, H, W]
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [B/G]
        y = y.repeat(group)[:, None, None, None].expand(-1, 1, h, w)  # [B, 1, H, W]
        return torch.cat([x, y], dim=1)


class ResidualBlock(nn.Module):
    """Two 3x3 convs and a 2x average-pool, with a 1x1 skip; the sum is scaled by 1/√2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.conv1(x), 0.2)
        y = F.avg_pool2d(F.leaky_relu(self.conv2(y), 0.2), 2)
        return (y + F.avg_pool2d(self.skip(x), 2)) / SQRT2


class ResidualDiscriminator(nn.Module):
    """StyleGAN2's residual D: from-RGB, residual down blocks to 4x4, minibatch stddev, then
    conv + linear. With `num_classes` it becomes a projection discriminator."""

    def __init__(self, resolution: int = 32, img_channels: int = 3, width: int = 32, max_channels: int = 256, num_classes: int = 0) -> None:
        super().__init__()
        self.from_rgb = nn.Conv2d(img_channels, channels_at(resolution, width, max_channels), 1)
        blocks = []
        res = resolution
        while res > 4:
            blocks.append(ResidualBlock(channels_at(res, width, max_channels), channels_at(res // 2, width, max_channels)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        c4 = channels_at(4, width, max_channels)
        self.stddev = MinibatchStdDev()
        self.conv = nn.Conv2d(c4 + 1, c4, 3, padding=1)
        self.fc = nn.Linear(c4 * 16, c4)
        self.out = nn.Linear(c4, 1)
        self.embed = nn.Embedding(num_classes, c4) if num_classes else None

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        x = F.leaky_relu(self.from_rgb(x), 0.2)
        x = self.stddev(self.blocks(x))
        x = F.leaky_relu(self.conv(x), 0.2)
        phi = F.leaky_relu(self.fc(x.flatten(1)), 0.2)  # [B, C]
        logit = self.out(phi).squeeze(1)
        if self.embed is not None:
            if label is None:
                raise ValueError("the projection discriminator needs class labels")
            logit = logit + (self.embed(label) * phi).sum(dim=1) / math.sqrt(phi.shape[1])
        return logit
