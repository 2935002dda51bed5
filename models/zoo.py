"""Builds the networks a `ModelSpec` names."""
from __future__ import annotations

from torch import nn

from models.dcgan import ConditionalDCGANGenerator, DCGANDiscriminator, DCGANGenerator, SNDiscriminator
from models.mlp import MLPDiscriminator, MLPGenerator
from models.spec import ModelSpec
from models.stylegan import ResidualDiscriminator, StyleGenerator

DISCRIMINATORS = ("dcgan", "dcgan-projection", "sngan", "projection", "mlp", "mlp-sn", "residual")


def build_generator(spec: ModelSpec) -> nn.Module:
    if spec.arch == "mlp":
        return MLPGenerator(spec.z_dim, spec.out_dim, spec.width, spec.depth, spec.data_scale)
    if spec.arch == "dcgan":
        return DCGANGenerator(spec.z_dim, spec.channels, spec.resolution, spec.width)
    if spec.arch == "cdcgan":
        if spec.num_classes < 2:
            raise ValueError("a conditional generator needs at least two class names")
        return ConditionalDCGANGenerator(spec.z_dim, spec.channels, spec.resolution, spec.width, spec.num_classes)
    if spec.arch == "stylegan":
        return StyleGenerator(spec.z_dim, spec.w_dim, spec.resolution, spec.channels, spec.width, spec.max_channels, spec.mapping_layers, spec.num_classes)
    raise ValueError(f"unknown generator arch {spec.arch!r}")


def build_discriminator(spec: ModelSpec, name: str) -> nn.Module:
    if name == "mlp":
        return MLPDiscriminator(spec.out_dim, spec.width, spec.depth, spectral=False, scale=spec.data_scale)
    if name == "mlp-sn":
        return MLPDiscriminator(spec.out_dim, spec.width, spec.depth, spectral=True, scale=spec.data_scale)
    if name == "dcgan":
        return DCGANDiscriminator(spec.channels, spec.resolution, spec.width)
    if name == "dcgan-projection":
        return DCGANDiscriminator(spec.channels, spec.resolution, spec.width, num_classes=spec.num_classes)
    if name == "sngan":
        return SNDiscriminator(spec.channels, spec.resolution, spec.width)
    if name == "projection":
        return SNDiscriminator(spec.channels, spec.resolution, spec.width, num_classes=spec.num_classes)
    if name == "residual":
        return ResidualDiscriminator(spec.resolution, spec.channels, spec.width, spec.max_channels, spec.num_classes)
    raise ValueError(f"unknown discriminator {name!r}: choose from {DISCRIMINATORS}")
