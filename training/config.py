"""Typed training configuration, read from YAML and validated at the edge.

Unknown keys are errors (a typo must not silently train the wrong model); every field has a
default that works, so a config file only says what differs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LossName = Literal["minimax", "nonsaturating", "hinge", "wgan", "wgan-gp", "lsgan"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    name: Literal["digits", "gaussians", "shapes", "image_folder", "mnist", "cifar10"] = "digits"
    resolution: int = 32
    mixture: Literal["ring8", "grid25"] = "grid25"  # gaussians only
    size: int = Field(10_000, gt=0)  # shapes / gaussians: how many samples to generate
    path: str | None = None  # image_folder root, MNIST images file, or CIFAR batch folder
    labels_path: str | None = None  # MNIST labels file
    channels: Literal[1, 3] = 3  # image_folder only

    @field_validator("path", "labels_path")
    @classmethod
    def absolute(cls, path: str | None) -> str | None:
        """From where `ganserve train` ran: the run's config.json keeps it absolute, so that
        `ganserve evaluate` reads the same data from any folder (a relative path was not found)."""
        if path is not None and not path.strip():  # (an empty path trained on whatever folder the command ran in)
            raise ValueError("an empty path: name the data's folder or file")
        return os.path.abspath(os.path.expanduser(path)) if path else path


class ModelConfig(Strict):
    arch: Literal["mlp", "dcgan", "cdcgan", "stylegan"] = "dcgan"
    z_dim: int = Field(100, gt=0)
    width: int = Field(64, gt=0)  # base feature width (channels) or hidden units for mlp
    depth: int = Field(3, gt=0)  # mlp hidden layers
    discriminator: Literal["dcgan", "dcgan-projection", "sngan", "projection", "mlp", "mlp-sn", "residual"] = "dcgan"
    pack: int = Field(1, gt=0)  # PacGAN: D scores `pack` samples at once (mlp discriminators only)
    # stylegan only
    w_dim: int = Field(128, gt=0)
    mapping_layers: int = Field(8, gt=0)
    max_channels: int = Field(256, gt=0)
    synthesis: Literal["skip", "orig"] = "skip"  # a ToRGB per resolution (StyleGAN2) or one at the end


class LossConfig(Strict):
    name: LossName = "nonsaturating"
    n_critic: int = Field(1, gt=0)  # D steps per G step
    gp_weight: float = 10.0  # wgan-gp
    clip: float = 0.01  # wgan weight clipping
    r1_gamma: float = 0.0  # R1 penalty on real data, 0 = off
    r1_every: int = Field(1, gt=0)  # lazy regularisation: apply R1 every N D steps, scaled by N
    pl_weight: float = 0.0  # stylegan path-length regularisation, 0 = off
    pl_every: int = Field(4, gt=0)


class OptimConfig(Strict):
    lr_g: float = 2e-4
    lr_d: float = 2e-4  # TTUR: set lr_d above lr_g
    beta1: float = 0.5
    beta2: float = 0.999
    lr_decay: Literal["none", "linear"] = "none"  # linear: both rates fall to 0 at max_steps


class EvalConfig(Strict):
    every: int = Field(500, gt=0)  # steps between metric evaluations
    num_samples: int = Field(2000, gt=0)
    best_metric: str = "fid"  # which metric picks the best checkpoint
    best_mode: Literal["min", "max"] = "min"


class TrainConfig(Strict):
    name: str = "run"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    batch_size: int = Field(64, gt=0)
    max_steps: int = Field(5000, gt=0)  # generator steps
    max_minutes: float | None = Field(None, gt=0)  # wall-clock budget: stop early, cleanly (eval, checkpoint, metrics)
    ema_beta: float = Field(0.999, ge=0, lt=1)  # 0 disables the EMA of G
    ema_start: int = 0  # step at which EMA starts tracking (before it, EMA copies G)
    amp: bool = True  # mixed precision, used only on CUDA
    seed: int = 0
    sample_every: int = Field(500, gt=0)
    checkpoint_every: int = Field(500, gt=0)
    panel_size: int = Field(64, gt=0)  # fixed latent panel for sample grids and diversity checks
    style_mixing_prob: float = Field(0.0, ge=0, le=1)  # stylegan: share of batches with two latents
    augment: str = ""  # DiffAugment policy for D's inputs, e.g. "color,translation,cutout"

    @model_validator(mode="after")
    def check_combinations(self) -> "TrainConfig":
        is_2d = self.data.name == "gaussians"
        if is_2d != (self.model.arch == "mlp"):
            raise ValueError("2-D gaussians train the mlp arch, image sets a convolutional one")
        if (self.model.arch == "cdcgan") != (self.model.discriminator in ("projection", "dcgan-projection")):
            raise ValueError("the conditional dcgan (cdcgan) goes with a projection discriminator (projection or dcgan-projection), and only it")
        if (self.model.arch == "stylegan") != (self.model.discriminator == "residual"):
            raise ValueError("stylegan trains with the residual discriminator, and only it")
        resolution = self.data.resolution
        if self.model.arch in ("dcgan", "cdcgan") and resolution not in (32, 64):
            raise ValueError(f"{self.model.arch} supports 32 or 64 px, not {resolution}")
        if self.model.arch == "stylegan" and (resolution < 8 or resolution & (resolution - 1)):
            raise ValueError(f"stylegan trains at a power of two ≥ 8 px, not {resolution}")
        if self.model.arch == "cdcgan" and self.data.name == "mnist" and not self.data.labels_path:
            raise ValueError("a conditional model on MNIST needs its labels file (data.labels_path)")
        return self


def load_config(path: str | Path) -> TrainConfig:
    with open(path) as handle:
        return TrainConfig.model_validate(yaml.safe_load(handle) or {})
