"""Typed configs for the image-to-image tasks (pix2pix, CycleGAN, super-resolution).

A YAML config with a `task` key is one of these; without it, a `TrainConfig` (noise → image GANs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from training.config import Strict

Task = Literal["pix2pix", "cyclegan", "superres"]
KIND_FOR_TASK = {"pix2pix": "translation", "cyclegan": "translation", "superres": "super_resolution"}  # spec.json kinds (DESIGN)


class I2IDataConfig(Strict):
    name: Literal["edges2shapes", "gray2color", "shape_domains", "stroke_domains", "photo_sr"] = "edges2shapes"
    resolution: int = Field(32, ge=8)  # image side (shapes) or crop side of the target (photos)
    size: int = Field(4000, gt=0)  # generated training images (shapes sets)
    held_out: int = Field(200, gt=0)  # held-out pairs / images for evaluation
    rotate: bool = False  # photo_sr: quarter-turn augmentation on top of flips
    domain_a: str = "circle"  # shape_domains
    domain_b: str = "square"


class I2IModelConfig(Strict):
    generator: Literal["unet", "resnet", "rrdb"] = "unet"
    ngf: int = Field(32, gt=0)
    num_downs: int = Field(5, ge=2)  # unet levels: 5 for 32 px, 6 for 64, 8 for 256
    n_blocks: int = Field(6, gt=0)  # resnet residual blocks (6 or 9)
    norm: Literal["batch", "instance", "none"] = "batch"
    dropout: bool = True  # unet decoder dropout (training only: the service runs in eval mode)
    features: int = Field(32, gt=0)  # rrdb
    blocks: int = Field(4, ge=0)  # rrdb (0: no RRDB body, a plain conv net with a small receptive field)
    growth: int = Field(16, gt=0)  # rrdb
    scale: Literal[2, 4] = 4  # rrdb
    ndf: int = Field(32, gt=0)
    d_layers: int = Field(3, ge=1)  # PatchGAN: 3 → 70x70 receptive field
    d_norm: Literal["batch", "instance", "none"] = "batch"


class I2ILossConfig(Strict):
    gan: Literal["vanilla", "lsgan", "relativistic"] = "vanilla"
    l1_weight: float = 100.0  # pix2pix λ_L1; SR pixel loss weight
    cycle_weight: float = 10.0  # cyclegan λ (junyanz's lambda_A: the A → B → A cycle, and B → A → B unless cycle_weight_b is set)
    cycle_weight_b: float | None = Field(None, ge=0)  # junyanz's lambda_B: the B → A → B cycle (None: cycle_weight)
    identity_weight: float = 0.5  # cyclegan, as a fraction of λ
    cycle_noise: float = Field(0.0, ge=0)  # cyclegan: std of noise on a translation before it is translated back (0 = off)
    adv_weight: float = 1.0  # weight of the adversarial term for G (SR fine-tune: 5e-3)
    feature_weight: float = 0.0  # SR: perceptual loss with the project's feature network
    pretrain_steps: int = Field(0, ge=0)  # SR: L1-only steps before the GAN fine-tune


class I2IOptimConfig(Strict):
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    decay_start: float = Field(0.5, ge=0, le=1)  # linear decay to 0 from this fraction of each phase


class I2IConfig(Strict):
    task: Task
    name: str = "run"
    data: I2IDataConfig = I2IDataConfig()
    model: I2IModelConfig = I2IModelConfig()
    loss: I2ILossConfig = I2ILossConfig()
    optim: I2IOptimConfig = I2IOptimConfig()
    batch_size: int = Field(16, gt=0)
    max_steps: int = Field(2000, gt=0)
    max_minutes: float | None = Field(None, gt=0)
    pool_size: int = Field(50, ge=0)  # cyclegan image history for D
    eval_every: int = Field(500, gt=0)
    sample_every: int = Field(500, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def check_combinations(self) -> "I2IConfig":
        allowed = {"pix2pix": ({"edges2shapes", "gray2color"}, {"unet", "resnet"}),
                   "cyclegan": ({"shape_domains", "stroke_domains"}, {"resnet", "unet"}),
                   "superres": ({"photo_sr"}, {"rrdb"})}[self.task]
        if self.data.name not in allowed[0]:
            raise ValueError(f"task {self.task} trains on {sorted(allowed[0])}, not {self.data.name}")
        if self.model.generator not in allowed[1]:
            raise ValueError(f"task {self.task} uses a {sorted(allowed[1])} generator, not {self.model.generator}")
        if self.task == "superres" and self.data.resolution % self.model.scale:
            raise ValueError(f"the crop ({self.data.resolution}) must be a multiple of the scale ({self.model.scale})")
        if self.model.generator == "unet" and self.data.name != "photo_sr" and self.data.resolution % 2**self.model.num_downs:
            raise ValueError(f"a {self.model.num_downs}-level U-Net needs a resolution that is a multiple of {2**self.model.num_downs}")
        return self


def is_image_to_image(raw: dict) -> bool:
    return isinstance(raw, dict) and "task" in raw


def load_i2i_config(path: str | Path) -> I2IConfig:
    with open(path) as handle:
        return I2IConfig.model_validate(yaml.safe_load(handle) or {})
