"""The three image-to-image training tasks. Each owns its networks, optimisers, one training step,
its evaluation on held-out data, and a sample panel; `training/image2image/train.py` runs any of
them with the same run directory, logging, time budget and checkpoints.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from models.translation import PatchDiscriminator
from models.zoo import build_translator
from training.data.pairs import HELD_OUT_PHOTOS, TRAIN_PHOTOS, PhotoCrops, bicubic_upscale, edges_to_shapes, shape_domains, stroke_domains
from training.data.shapes import SHAPE_NAMES
from training.image2image.config import I2IConfig, I2IModelConfig
from training.image2image.domain_classifier import train_domain_classifier
from training.metrics.image_quality import full_reference, sharpness

EVAL_BATCH = 50


def translator_params(cfg: I2IConfig) -> dict:
    """What `build_translator` needs to rebuild the served generator (written to spec.json)."""
    in_channels = 1 if cfg.data.name in ("gray2color", "stroke_domains") else 3
    out_channels = 1 if cfg.data.name == "stroke_domains" else 3
    m = cfg.model
    params = {"generator": m.generator, "in_channels": in_channels, "out_channels": out_channels}
    if m.generator == "unet":
        params |= {"ngf": m.ngf, "num_downs": m.num_downs, "norm": m.norm, "dropout": m.dropout}
    elif m.generator == "resnet":
        params |= {"ngf": m.ngf, "n_blocks": m.n_blocks, "norm": m.norm}
    else:
        params |= {"features": m.features, "blocks": m.blocks, "growth": m.growth, "scale": m.scale}
    return params


def patch_discriminator(m: I2IModelConfig, in_channels: int) -> PatchDiscriminator:
    return PatchDiscriminator(in_channels, m.ndf, m.d_layers, m.d_norm)


def adam(params, lr: float, cfg: I2IConfig) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2))


def gan_loss(logits: torch.Tensor, real: bool, kind: str) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


class frozen:
    """Context: `modules` take no weight gradients (G's update back-propagates through D to G,
    not into D's weights, which G's step would only throw away)."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules

    def __enter__(self) -> None:
        for module in self.modules:
            module.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            module.requires_grad_(True)


@torch.no_grad()
def run_batched(module: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    was_training = module.training
    module.eval()
    out = torch.cat([module(x[i : i + EVAL_BATCH].to(device)).float().cpu() for i in range(0, len(x), EVAL_BATCH)])
    module.train(was_training)
    return out


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class ImagePool:
    """CycleGAN's history of generated images: D sees a mix of current and older fakes (pool of
    50, half the time an older one), which damps G/D oscillation. Its images (and the random
    state that picks them, shared by both pools) are saved with the checkpoint: resume is exact."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.images, self.rng = size, [], rng

    def tensor(self) -> torch.Tensor | None:
        return torch.stack(self.images).cpu() if self.images else None  # [n ≤ size, C, H, W]

    def restore(self, images: torch.Tensor | None, device: torch.device) -> None:
        self.images = [] if images is None else list(images.to(device).unbind(0))

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif self.rng.random() < 0.5:
                index = self.rng.randrange(self.size)
                out.append(self.images[index])
                self.images[index] = image
            else:
                out.append(image)
        return torch.stack(out)


class GeneratorDiscriminatorTask:
    """Bookkeeping shared by the tasks with one generator (the served network) and one D."""

    G: nn.Module
    D: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer

    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g": self.opt_g, "d": self.opt_d}

    def served(self) -> nn.Module:
        return self.G


class Pix2Pix(GeneratorDiscriminatorTask):
    """Conditional GAN: D sees (input, output) pairs patch by patch; G adds λ·L1 to the target."""

    best_metric, best_mode = "psnr", "max"

    def __init__(self, cfg: I2IConfig, device: torch.device, rng: torch.Generator) -> None:
        self.cfg, self.device, self.rng = cfg, device, rng
        d = cfg.data
        if d.name == "edges2shapes":
            self.train_data = edges_to_shapes(d.size, d.resolution, seed=0)
            self.held_out = edges_to_shapes(d.held_out, d.resolution, seed=1)
        else:
            self.train_data = PhotoCrops(TRAIN_PHOTOS, d.resolution, "colorize")
            self.held_out = PhotoCrops(HELD_OUT_PHOTOS, d.resolution, "colorize").fixed(d.held_out, seed=1)
        params = translator_params(cfg)
        self.G = build_translator(params).to(device)
        self.D = patch_discriminator(cfg.model, params["in_channels"] + 3).to(device)
        self.opt_g, self.opt_d = adam(self.G.parameters(), cfg.optim.lr_g, cfg), adam(self.D.parameters(), cfg.optim.lr_d, cfg)
        self.baselines: dict[str, float] | None = None

    def step(self, step: int) -> dict[str, float]:
        a, b = (t.to(self.device) for t in self.train_data.minibatch(self.cfg.batch_size, self.rng))
        fake = self.G(a)
        real_logits, fake_logits = self.D(torch.cat([a, b], 1)), self.D(torch.cat([a, fake.detach()], 1))
        loss_d = 0.5 * (gan_loss(real_logits, True, self.cfg.loss.gan) + gan_loss(fake_logits, False, self.cfg.loss.gan))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        with frozen(self.D):
            adv = gan_loss(self.D(torch.cat([a, fake], 1)), True, self.cfg.loss.gan)
        l1 = F.l1_loss(fake, b)
        loss_g = self.cfg.loss.adv_weight * adv + self.cfg.loss.l1_weight * l1
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "l1": l1.item()}

    def evaluate(self) -> dict[str, float]:
        """L1/PSNR/SSIM on held-out pairs, beside two trivial baselines: the input as the output,
        and every pixel the mean colour of the training targets."""
        a, b = self.held_out.a, self.held_out.b
        if self.baselines is None:  # fixed inputs: computed once per run
            mean_colour = self.train_data.minibatch(500, torch.Generator().manual_seed(0))[1].mean(dim=(0, 2, 3), keepdim=True).expand_as(b)
            self.baselines = {f"input_{k}": v for k, v in full_reference(as_rgb(a), b).items()}
            self.baselines |= {f"mean_colour_{k}": v for k, v in full_reference(mean_colour, b).items()}
        return full_reference(run_batched(self.G, a, self.device), b) | self.baselines

    def panel(self) -> list[torch.Tensor]:
        a, b = self.held_out.a[:8], self.held_out.b[:8]
        return [as_rgb(a), run_batched(self.G, a, self.device), b]


class CycleGAN:
    """Two generators (A→B, B→A), two PatchGAN discriminators, LSGAN, cycle and identity losses,
    image pools. The served direction is A→B."""

    best_metric, best_mode = "domain_accuracy", "max"

    def __init__(self, cfg: I2IConfig, device: torch.device, rng: torch.Generator) -> None:
        self.cfg, self.device, self.rng = cfg, device, rng
        d = cfg.data
        if d.name == "stroke_domains":
            self.train_a, self.train_b = stroke_domains("train", d.resolution)
            self.held_a, self.held_b = stroke_domains("held_out", d.resolution)
        else:
            self.train_a, self.train_b = shape_domains(d.domain_a, d.domain_b, d.size, d.resolution, seed=0)
            self.held_a, self.held_b = shape_domains(d.domain_a, d.domain_b, d.held_out, d.resolution, seed=1)
        self.judge: nn.Module | None = None  # the domain classifier, built at the first evaluation
        params = translator_params(cfg)
        self.G_ab, self.G_ba = build_translator(params).to(device), build_translator(params).to(device)
        channels = params["out_channels"]
        self.D_a, self.D_b = patch_discriminator(cfg.model, channels).to(device), patch_discriminator(cfg.model, channels).to(device)
        self.opt_g = adam(list(self.G_ab.parameters()) + list(self.G_ba.parameters()), cfg.optim.lr_g, cfg)
        self.opt_d = adam(list(self.D_a.parameters()) + list(self.D_b.parameters()), cfg.optim.lr_d, cfg)
        pool_rng = random.Random(cfg.seed)
        self.pool_a, self.pool_b = ImagePool(cfg.pool_size, pool_rng), ImagePool(cfg.pool_size, pool_rng)

    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.G_ab, "G_ba": self.G_ba, "D_a": self.D_a, "D_b": self.D_b}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g": self.opt_g, "d": self.opt_d}

    def served(self) -> nn.Module:
        return self.G_ab

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"pool.{name}": images for name, pool in (("a", self.pool_a), ("b", self.pool_b)) if (images := pool.tensor()) is not None}
        version, internal, gauss = self.pool_a.rng.getstate()
        return tensors, {"pool_random": [version, list(internal), gauss]}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.pool_a.restore(tensors.get("pool.a"), self.device)
        self.pool_b.restore(tensors.get("pool.b"), self.device)
        if "pool_random" in meta:
            version, internal, gauss = meta["pool_random"]
            self.pool_a.rng.setstate((version, tuple(internal), gauss))

    def step(self, step: int) -> dict[str, float]:
        loss = self.cfg.loss
        a = self.train_a.minibatch(self.cfg.batch_size, self.rng)[0].to(self.device)
        b = self.train_b.minibatch(self.cfg.batch_size, self.rng)[0].to(self.device)
        fake_b, fake_a = self.G_ab(a), self.G_ba(b)
        with frozen(self.D_a, self.D_b):
            adv = gan_loss(self.D_b(fake_b), True, "lsgan") + gan_loss(self.D_a(fake_a), True, "lsgan")
        cycle_a = F.l1_loss(self.G_ba(self.cycle_input(fake_b)), a)
        cycle_b = F.l1_loss(self.G_ab(self.cycle_input(fake_a)), b)
        cycle = cycle_a + cycle_b
        weight_b = loss.cycle_weight if loss.cycle_weight_b is None else loss.cycle_weight_b
        identity = F.l1_loss(self.G_ab(b), b) + F.l1_loss(self.G_ba(a), a) if loss.identity_weight > 0 else torch.zeros((), device=self.device)
        loss_g = adv + loss.cycle_weight * cycle_a + weight_b * cycle_b + loss.cycle_weight * loss.identity_weight * identity
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        old_b, old_a = self.pool_b.query(fake_b), self.pool_a.query(fake_a)
        loss_d = 0.5 * (gan_loss(self.D_b(b), True, "lsgan") + gan_loss(self.D_b(old_b), False, "lsgan")
                        + gan_loss(self.D_a(a), True, "lsgan") + gan_loss(self.D_a(old_a), False, "lsgan"))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "cycle": cycle.item()}

    def cycle_input(self, fake: torch.Tensor) -> torch.Tensor:
        """A translation on its way back through the cycle, with Gaussian noise of `cycle_noise` std
        added. When one domain carries less information than the other (a circle has no rotation,
        a square does), the cycle loss rewards hiding the missing part in faint pixel patterns that
        only the other generator reads (Chu et al., 2017, "CycleGAN, a master of steganography");
        the other generator then learns to decode those patterns rather than to translate, and on
        a real image, which carries none, it falls short. Noise drowns such a hidden code."""
        if self.cfg.loss.cycle_noise == 0:
            return fake
        return fake + self.cfg.loss.cycle_noise * torch.randn(fake.shape, generator=self.rng).to(fake)

    def domain_of(self, images: torch.Tensor) -> torch.Tensor:
        """0 for domain A, 1 for domain B, as the domain classifier reads `images`."""
        with torch.no_grad():
            if self.cfg.data.name == "stroke_domains":
                return self.judge(images).argmax(1)
            classes = self.judge(images.to(self.device))[0].argmax(1).cpu()
        domain = torch.full_like(classes, -1)  # a third shape class is neither domain
        domain[classes == SHAPE_NAMES.index(self.cfg.data.domain_a)] = 0
        domain[classes == SHAPE_NAMES.index(self.cfg.data.domain_b)] = 1
        return domain

    def build_judge(self) -> float:
        """The domain classifier and its accuracy on held-out real images of both domains."""
        if self.cfg.data.name == "stroke_domains":
            self.judge, accuracy = train_domain_classifier(self.train_a.x, self.train_b.x, self.held_a.x, self.held_b.x, seed=self.cfg.seed)
            return accuracy
        from training.metrics.shapes_features import load_shapes_predictor

        self.judge = load_shapes_predictor().to(self.device)
        return float(torch.cat([self.domain_of(self.held_a.x) == 0, self.domain_of(self.held_b.x) == 1]).float().mean())

    def evaluate(self) -> dict[str, float]:
        """Domain accuracy: the domain classifier (the shapes predictor for shape domains, a small
        CNN trained on the real domains for strokes) reads translated held-out images as the target
        domain. Cycle error: L1 of A → B → A on [0, 1] pixels."""
        if self.judge is None:
            self.judge_accuracy = self.build_judge()
        a, b = self.held_a.x, self.held_b.x
        fake_b, fake_a = run_batched(self.G_ab, a, self.device), run_batched(self.G_ba, b, self.device)
        back_a = run_batched(self.G_ba, fake_b, self.device)
        return {
            "domain_accuracy": float((self.domain_of(fake_b) == 1).float().mean()),  # A→B read as B
            "domain_accuracy_ba": float((self.domain_of(fake_a) == 0).float().mean()),
            "input_accuracy": float((self.domain_of(a) == 1).float().mean()),  # baseline: untranslated A read as B
            "classifier_accuracy": self.judge_accuracy,  # on held-out real images of both domains
            "cycle_l1": float(((back_a.clamp(-1, 1) - a) / 2).abs().mean()),
            "cycle_psnr": full_reference(back_a, a)["psnr"],
        } | (self.digits_kept(fake_b) if self.cfg.data.name == "stroke_domains" else {})

    def digits_kept(self, fake_b: torch.Tensor) -> dict[str, float]:
        """Content check for strokes (a blank or blotted image could pass for "thick"): the shipped
        digits classifier still reads the same digit after translation, beside its reading of the
        real thick digits (the baseline a faithful translation can reach)."""
        from training.metrics.digits_features import load_digits_classifier

        classifier = load_digits_classifier()
        with torch.no_grad():
            kept = (classifier(fake_b).argmax(1) == self.held_a.y).float().mean()
            real = (classifier(self.held_b.x).argmax(1) == self.held_b.y).float().mean()
        return {"digit_kept": float(kept), "digit_read_on_real_thick": float(real)}

    def panel(self) -> list[torch.Tensor]:
        a = self.held_a.x[:8]
        fake_b = run_batched(self.G_ab, a, self.device)
        return [a, fake_b, run_batched(self.G_ba, fake_b, self.device)]


class SuperResolution(GeneratorDiscriminatorTask):
    """RRDB generator: L1 pre-training for `pretrain_steps`, then a relativistic-average GAN
    fine-tune with a feature loss from the shapes predictor's first conv blocks (the project's own
    feature network; an ImageNet VGG is not available offline). The L1 model is checkpointed as
    `l1` when pre-training ends: it is the PSNR model, the last checkpoint the GAN one."""

    best_metric, best_mode = "psnr", "max"

    def __init__(self, cfg: I2IConfig, device: torch.device, rng: torch.Generator) -> None:
        self.cfg, self.device, self.rng = cfg, device, rng
        scale = cfg.model.scale
        self.train_data = PhotoCrops(TRAIN_PHOTOS, cfg.data.resolution, "superres", scale, rotate=cfg.data.rotate)
        self.held_out = PhotoCrops(HELD_OUT_PHOTOS, cfg.data.resolution, "superres", scale).fixed(cfg.data.held_out, seed=1)
        self.G = build_translator(translator_params(cfg)).to(device)
        self.D = patch_discriminator(cfg.model, 3).to(device)
        self.opt_g, self.opt_d = adam(self.G.parameters(), cfg.optim.lr_g, cfg), adam(self.D.parameters(), cfg.optim.lr_d, cfg)
        self.baselines: dict[str, float] | None = None
        self.features: nn.Module | None = None
        if cfg.loss.feature_weight > 0:
            from training.metrics.shapes_features import load_shapes_predictor

            self.features = load_shapes_predictor().body[:2].to(device).eval().requires_grad_(False)

    def step(self, step: int) -> dict[str, float]:
        loss = self.cfg.loss
        lr, hr = (t.to(self.device) for t in self.train_data.minibatch(self.cfg.batch_size, self.rng))
        sr = self.G(lr)
        pixel = F.l1_loss(sr, hr)
        if step < loss.pretrain_steps:
            self.opt_g.zero_grad(set_to_none=True)
            pixel.backward()
            self.opt_g.step()
            return {"loss_d": 0.0, "loss_g": pixel.item(), "l1": pixel.item()}
        real_logits, fake_logits = self.D(hr), self.D(sr.detach())
        loss_d = 0.5 * (gan_loss(real_logits - fake_logits.mean(), True, "vanilla") + gan_loss(fake_logits - real_logits.mean(), False, "vanilla"))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        with frozen(self.D):
            real_logits, fake_logits = self.D(hr).detach(), self.D(sr)
        adv = 0.5 * (gan_loss(real_logits - fake_logits.mean(), False, "vanilla") + gan_loss(fake_logits - real_logits.mean(), True, "vanilla"))
        loss_g = loss.l1_weight * pixel + loss.adv_weight * adv
        if self.features is not None:
            loss_g = loss_g + loss.feature_weight * F.l1_loss(self.features(sr), self.features(hr))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "l1": pixel.item()}

    def evaluate(self) -> dict[str, float]:
        """PSNR/SSIM on held-out crops (borders of `scale` px shaved) against bicubic upscaling of
        the same inputs, and the sharpness (mean luma gradient) of each beside the original's."""
        scale = self.cfg.model.scale
        lr, hr = self.held_out.a, self.held_out.b
        if self.baselines is None:  # fixed inputs: computed once per run
            bicubic = bicubic_upscale(lr, scale)
            self.baselines = {f"bicubic_{k}": v for k, v in full_reference(bicubic, hr, border=scale).items()}
            self.baselines |= {"bicubic_sharpness": sharpness(bicubic), "target_sharpness": sharpness(hr)}
        sr = run_batched(self.G, lr, self.device)
        metrics = full_reference(sr, hr, border=scale) | {"sharpness": sharpness(sr)} | self.baselines
        metrics["psnr_gain_db"] = metrics["psnr"] - metrics["bicubic_psnr"]
        return metrics

    def panel(self) -> list[torch.Tensor]:
        lr, hr = self.held_out.a[:6], self.held_out.b[:6]
        nearest = F.interpolate(lr, scale_factor=float(self.cfg.model.scale), mode="nearest")
        return [nearest, bicubic_upscale(lr, self.cfg.model.scale), run_batched(self.G, lr, self.device), hr]


TASKS = {"pix2pix": Pix2Pix, "cyclegan": CycleGAN, "superres": SuperResolution}
