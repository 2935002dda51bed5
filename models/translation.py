"""Image-to-image networks: pix2pix's U-Net generator, CycleGAN's ResNet generator and the
PatchGAN discriminator both use.

All three are fully convolutional, so one trained network runs at any input size that is a
multiple of `size_multiple` (the U-Net halves the size `num_downs` times, the ResNet generator
twice). Upsampling is a transposed convolution, as in the papers; nothing in `forward` draws random
numbers except dropout, which `eval()` switches off (see `UnetGenerator`).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

NormName = Literal["batch", "instance", "none"]


def norm_layer(name: NormName, channels: int) -> nn.Module:
    """Instance norm without running statistics: train and eval behave the same, which is what a
    served translator wants (batch statistics would make one request's output depend on the rest
    of its batch)."""
    if name == "batch":
        return nn.BatchNorm2d(channels)
    if name == "instance":
        return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)
    return nn.Identity()


class UnetBlock(nn.Module):
    """One level of the U-Net: down, the inner levels, up, then concatenation with the input."""

    def __init__(self, outer: int, inner: int, submodule: nn.Module | None, norm: NormName, dropout: bool,
                 in_channels: int | None = None, outermost: bool = False) -> None:
        super().__init__()
        in_channels = in_channels or outer
        self.outermost = outermost
        down = [nn.Conv2d(in_channels, inner, 4, 2, 1, bias=norm != "batch")]
        if not outermost:
            down = [nn.LeakyReLU(0.2)] + down
        innermost = submodule is None
        if not outermost and not innermost:
            down.append(norm_layer(norm, inner))
        up_in = inner if innermost else inner * 2
        up: list[nn.Module] = [nn.ReLU(), nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=outermost or norm != "batch")]
        if outermost:
            up.append(nn.Tanh())
        else:
            up.append(norm_layer(norm, outer))
            if dropout:
                up.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*down, *([submodule] if submodule is not None else []), *up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y if self.outermost else torch.cat([x, y], dim=1)


class UnetGenerator(nn.Module):
    """pix2pix generator: `num_downs` halvings (5 for 32 px, 6 for 64, 7 for 128, 8 for 256) with
    skip connections at every level, width `ngf` doubling up to 8·ngf.

    Dropout in the three innermost decoder levels is pix2pix's only source of noise. We serve in
    eval mode, so dropout is off and a translation is deterministic (the same image in gives the
    same image out) — a documented choice: the pix2pix paper kept dropout on at test time and
    still saw little output diversity."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, num_downs: int = 5, ngf: int = 32,
                 norm: NormName = "batch", dropout: bool = True) -> None:
        super().__init__()
        if num_downs < 2:
            raise ValueError("a U-Net needs at least 2 levels")
        self.num_downs = num_downs
        width = [ngf * min(2**level, 8) for level in range(num_downs)]  # each level's inner width
        block: UnetBlock | None = None
        for level in reversed(range(1, num_downs)):
            innermost = level == num_downs - 1
            # pix2pix puts dropout in the repeated 8·ngf levels just outside the innermost one
            drop = dropout and not innermost and level >= 4 and level >= num_downs - 4
            block = UnetBlock(width[level - 1], width[level], block, norm, drop)
        self.model = UnetBlock(out_channels, width[0], block, norm, False, in_channels=in_channels, outermost=True)

    @property
    def size_multiple(self) -> int:
        return 2**self.num_downs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int, norm: NormName) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), norm_layer(norm, channels), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), norm_layer(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN generator: 7x7 stem, two stride-2 downsamplings, `n_blocks` residual blocks (6 for
    ≤128 px, 9 for 256), two transposed-conv upsamplings, 7x7 head with tanh."""

    size_multiple = 4

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 32, n_blocks: int = 6, norm: NormName = "instance") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7), norm_layer(norm, ngf), nn.ReLU()]
        for i in range(2):
            c = ngf * 2**i
            layers += [nn.Conv2d(c, c * 2, 3, 2, 1), norm_layer(norm, c * 2), nn.ReLU()]
        layers += [ResnetBlock(ngf * 4, norm) for _ in range(n_blocks)]
        for i in range(2):
            c = ngf * 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1), norm_layer(norm, c // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: a grid of real/fake logits, each seeing one patch. With `n_layers` = 3 each logit's
    receptive field is 70x70 px (the pix2pix default); fewer layers see smaller patches, which
    suits 32-64 px images."""

    def __init__(self, in_channels: int = 6, ndf: int = 64, n_layers: int = 3, norm: NormName = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride, 1, bias=norm != "batch"), norm_layer(norm, out), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def receptive_field(n_layers: int) -> int:
    """Receptive field in px of one PatchGAN logit (70 for n_layers = 3)."""
    field = 1
    for kernel, stride in reversed([(4, 2)] * n_layers + [(4, 1), (4, 1)]):
        field = (field - 1) * stride + kernel
    return field
