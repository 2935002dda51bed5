"""Builds the networks a `ModelSpec` names."""
from __future__ import annotations

from torch import nn

from models.biggan import BigGANDeepGenerator
from models.dcgan import ConditionalDCGANGenerator, DCGANDiscriminator, DCGANGenerator, SNDiscriminator
from models.mlp import MLPDiscriminator, MLPGenerator
from models.spec import ModelSpec
from models.stylegan import ResidualDiscriminator, StyleGenerator
from models.stylegan2_ada import StyleGAN2Generator
from models.stylegan3 import StyleGAN3Generator
from models.superres import RRDBNet
from models.translation import ResnetGenerator, UnetGenerator

DISCRIMINATORS = ("dcgan", "dcgan-projection", "sngan", "projection", "mlp", "mlp-sn", "residual")


def build_generator(spec: ModelSpec) -> nn.Module:
    if spec.arch == "mlp":
        return MLPGenerator(spec.z_dim, spec.out_dim, spec.width, spec.depth, spec.data_scale)
    if spec.arch == "dcgan":
        return DCGANGenerator(spec.z_dim, spec.channels, spec.resolution, spec.width)
    if spec.arch == "cdcgan":
        if spec.num_classes < 2:
            raise ValueError("a conditional generator needs at least two classes (an image folder's class sub-folders, MNIST's labels file)")
        return ConditionalDCGANGenerator(spec.z_dim, spec.channels, spec.resolution, spec.width, spec.num_classes)
    if spec.arch == "stylegan":
        return StyleGenerator(spec.z_dim, spec.w_dim, spec.resolution, spec.channels, spec.width, spec.max_channels, spec.mapping_layers, spec.num_classes,
                              spec.synthesis)
    if spec.arch == "stylegan3":
        return StyleGAN3Generator(spec.z_dim, spec.w_dim, spec.resolution, spec.channels, spec.mapping_layers, **spec.options)
    if spec.arch == "stylegan2-ada":
        return StyleGAN2Generator(spec.z_dim, spec.w_dim, spec.resolution, spec.channels, spec.mapping_layers, **spec.options)
    if spec.arch == "biggan-deep":
        return BigGANDeepGenerator(spec.z_dim, spec.num_classes, channels=spec.channels, **spec.options)
    raise ValueError(f"unknown generator arch {spec.arch!r}")


def build_discriminator(spec: ModelSpec, name: str, pack: int = 1) -> nn.Module:
    """`pack` (PacGAN) applies to the MLP discriminators only."""
    if pack != 1 and name not in ("mlp", "mlp-sn"):
        raise ValueError(f"packing (pack={pack}) is implemented for the mlp discriminators, not {name!r}")
    if name == "mlp":
        return MLPDiscriminator(spec.out_dim, spec.width, spec.depth, spectral=False, scale=spec.data_scale, pack=pack)
    if name == "mlp-sn":
        return MLPDiscriminator(spec.out_dim, spec.width, spec.depth, spectral=True, scale=spec.data_scale, pack=pack)
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


def build_translator(params: dict, weights: dict | None = None) -> nn.Module:
    """A translation or super-resolution generator from the parameters its run and its repository
    entry record (`spec["model"]`): training, export and the eager runtime all rebuild it here.
    An imported SR network (`spandrel`) is rebuilt from its `weights` (spandrel reads the
    architecture off them)."""
    kind = params["generator"]
    if kind == "spandrel":
        if weights is None:
            raise ValueError("a spandrel network is rebuilt from its weights")
        from models.restoration import build_spandrel

        return build_spandrel(weights)
    if kind == "unet":
        return UnetGenerator(params["in_channels"], params["out_channels"], params["num_downs"], params["ngf"], params["norm"], params["dropout"])
    if kind == "resnet":
        return ResnetGenerator(params["in_channels"], params["out_channels"], params["ngf"], params["n_blocks"], params["norm"])
    if kind == "rrdb":
        return RRDBNet(params["scale"], params["in_channels"], params["features"], params["blocks"], params["growth"])
    raise ValueError(f"unknown generator {kind!r}")
