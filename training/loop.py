"""The GAN task (noise → sample): alternating D and G updates with the configured loss, lazy
regularisation as phases of their own, EMA of G, samples from a fixed latent panel, evaluation
by the data's judge, and collapse diagnostics. `training/run.py` runs it (time budget, log,
checkpoints, exact resume); the run directory is described there.

Phases of one step, as in NVlabs' StyleGAN2-ADA training loop: `n_critic` D updates (Dmain), then
R1 on real images every `r1_every` steps (Dreg), one G update with D frozen (Gmain), then path
length every `pl_every` steps (Greg). A lazy regulariser is scaled by its interval, and the
optimizer of the network it regularises runs with lr·r and betas**r, r = k/(k+1), so that its
momentum and step size per image stay what they would be without the extra updates. An interval
of 1 folds the regulariser into the main phase instead (no extra update, no correction).
"""
from __future__ import annotations

import copy
import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.spec import ModelSpec
from models.zoo import build_discriminator, build_generator
from training.augment import diff_augment
from training.config import TrainConfig
from training.data import TensorData, as_floats, load_dataset
from training.data.readers import DataError
from training.diagnostics import CollapseMonitor, mean_pairwise_distance
from training.evaluate import GeneratorEvaluator
from training.images import save_grid, save_scatter
from training.losses import LOGISTIC, gradient_penalty, loss_pair, path_length_penalty, r1_penalty
from training.run import BestRule, Reporter, Schedule, check_run_dir, run_task
from training.sampling import balanced_labels, generate, latents

LOG_COLUMNS = ["step", "loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g", "step_time", "panel_diversity"]
PANEL_SEED = 2024


def spec_for(cfg: TrainConfig, train: TensorData) -> ModelSpec:
    conditional = cfg.model.arch == "cdcgan"
    style = cfg.model.arch == "stylegan"
    return ModelSpec(
        arch=cfg.model.arch,
        kind="style" if style else "conditional" if conditional else "unconditional",
        z_dim=cfg.model.z_dim,
        width=cfg.model.width,
        depth=cfg.model.depth,
        resolution=0 if not train.is_image else train.x.shape[-1],
        channels=train.x.shape[1] if train.is_image else 0,
        out_dim=0 if train.is_image else train.x.shape[1],
        data_scale=1.0 if train.is_image else round(float(train.x.std()), 4),
        class_names=list(train.class_names) if conditional else [],
        w_dim=cfg.model.w_dim if style else 0,
        mapping_layers=cfg.model.mapping_layers if style else 0,
        max_channels=cfg.model.max_channels if style else 0,
        synthesis=cfg.model.synthesis,
    )


def grad_norm(module: nn.Module) -> float:
    squares = [p.grad.detach().float().pow(2).sum() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def ema_beta_at(cfg: TrainConfig, step: int) -> float:
    """EMA decay with warm-up: early on the average would be dominated by the random init, so
    the decay grows as (1 + step) / (10 + step) until it reaches the configured beta."""
    if step < cfg.ema_start:
        return 0.0
    return min(cfg.ema_beta, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


class TrainingState(nn.Module):
    """Running values the loop keeps besides the networks, saved with them for exact resume."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pl_mean", torch.zeros(()))  # path-length regularisation target


@dataclass
class Run:
    """Everything that changes during training and is saved in a checkpoint."""

    cfg: TrainConfig
    spec: ModelSpec
    device: torch.device
    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    rng: torch.Generator
    state: nn.Module = field(default_factory=lambda: TrainingState())
    step: int = 0
    best: dict = field(default_factory=dict)  # {"step", "value", "metrics"}
    history: list[dict] = field(default_factory=list)

    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D, "G_ema": self.G_ema, "state": self.state}

    def sampler(self) -> nn.Module:
        return self.G_ema if self.cfg.ema_beta > 0 else self.G


def lazy_r1(cfg: TrainConfig) -> bool:
    return cfg.loss.r1_gamma > 0 and cfg.loss.r1_every > 1


def lazy_pl(cfg: TrainConfig) -> bool:
    return cfg.model.arch == "stylegan" and cfg.loss.pl_weight > 0 and cfg.loss.pl_every > 1


def minibatch_ratio(interval: int, lazy: bool) -> float:
    """NVlabs' mb_ratio k/(k+1): the share of a lazily regularised network's updates that are
    main-phase updates; its lr is scaled by it and its betas raised to it."""
    return interval / (interval + 1) if lazy else 1.0


def adam_for(params, lr: float, cfg: TrainConfig, ratio: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr * ratio, betas=(cfg.optim.beta1**ratio, cfg.optim.beta2**ratio))


def build_run(cfg: TrainConfig, train: TensorData, device: torch.device) -> Run:
    torch.manual_seed(cfg.seed)  # weight initialisation
    spec = spec_for(cfg, train)
    G = build_generator(spec).to(device)
    D = build_discriminator(spec, cfg.model.discriminator, cfg.model.pack).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = adam_for(G.parameters(), cfg.optim.lr_g, cfg, minibatch_ratio(cfg.loss.pl_every, lazy_pl(cfg)))
    opt_d = adam_for(D.parameters(), cfg.optim.lr_d, cfg, minibatch_ratio(cfg.loss.r1_every, lazy_r1(cfg)))
    return Run(cfg, spec, device, G, D, G_ema, opt_g, opt_d, torch.Generator().manual_seed(cfg.seed))


def discriminate(run: Run, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if run.cfg.augment:
        x = diff_augment(x, run.cfg.augment, run.rng)
    return run.D(x, y) if run.spec.kind == "conditional" else run.D(x)


def style_ws(run: Run, n: int) -> torch.Tensor:
    """ws [n, num_ws, w_dim] for a training batch; with style-mixing probability, two latents
    split at a random layer so the network cannot assume adjacent styles are correlated."""
    G = run.G
    w = G.mapping(torch.randn(n, run.spec.z_dim, generator=run.rng).to(run.device))
    ws = w[:, None, :].repeat(1, G.num_ws, 1)
    if run.cfg.style_mixing_prob > 0 and torch.rand((), generator=run.rng) < run.cfg.style_mixing_prob:
        w2 = G.mapping(torch.randn(n, run.spec.z_dim, generator=run.rng).to(run.device))
        cut = int(torch.randint(1, G.num_ws, (), generator=run.rng))
        ws = torch.cat([ws[:, :cut], w2[:, None, :].expand(-1, G.num_ws - cut, -1)], dim=1)
    return ws


def synthesize(run: Run, ws: torch.Tensor) -> torch.Tensor:
    noise = run.G.synthesis.random_noise(len(ws), run.rng, run.device)
    return run.G.synthesis(ws, noise)


def generate_batch(run: Run, n: int, y_real: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if run.spec.kind == "style":
        return synthesize(run, style_ws(run, n)), None
    z = torch.randn(n, run.spec.z_dim, generator=run.rng).to(run.device)
    if run.spec.kind != "conditional":
        return run.G(z), None
    y = torch.randint(run.spec.num_classes, (n,), generator=run.rng).to(run.device)
    return run.G(z, y), y


def set_learning_rates(run: Run) -> None:
    """Linear decay to zero: late small steps let G settle onto the modes instead of orbiting them."""
    cfg = run.cfg
    remaining = max(0.0, 1.0 - run.step / cfg.max_steps)
    bases = ((run.opt_g, cfg.optim.lr_g * minibatch_ratio(cfg.loss.pl_every, lazy_pl(cfg))),
             (run.opt_d, cfg.optim.lr_d * minibatch_ratio(cfg.loss.r1_every, lazy_r1(cfg))))
    for optimizer, base in bases:
        for group in optimizer.param_groups:
            group["lr"] = base * remaining


def real_minibatch(run: Run, train: TensorData) -> tuple[torch.Tensor, torch.Tensor | None]:
    x_real, y_real = train.minibatch(run.cfg.batch_size, run.rng)
    return x_real.to(run.device), None if y_real is None else y_real.to(run.device)


def d_main(run: Run, train: TensorData, autocast, r1_here: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor | None]:
    """One D update on a real and a generated minibatch (with R1 folded in when `r1_here`).
    Returns (loss, real scores, fake scores, gradient norm, the real minibatch and its labels)."""
    cfg = run.cfg
    d_loss_fn, _ = loss_pair(cfg.loss.name)
    x_real, y_real = real_minibatch(run, train)
    with autocast:
        with torch.no_grad():
            x_fake, y_fake = generate_batch(run, len(x_real), y_real)
        if r1_here:
            x_real.requires_grad_(True)
        real_scores = discriminate(run, x_real, y_real).float()
        fake_scores = discriminate(run, x_fake, y_fake).float()
        loss_d = d_loss_fn(real_scores, fake_scores)
        if cfg.loss.name == "wgan-gp":
            # interpolates share the real labels; for unconditional critics labels are unused
            critic = lambda x: discriminate(run, x, y_real).float()  # noqa: E731
            loss_d = loss_d + cfg.loss.gp_weight * gradient_penalty(critic, x_real, x_fake, run.rng)
        if r1_here:
            loss_d = loss_d + cfg.loss.r1_gamma / 2 * r1_penalty(real_scores, x_real)
    run.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    norm_d = grad_norm(run.D)
    run.opt_d.step()
    if cfg.loss.name == "wgan":
        clip_weights(run)
    return loss_d, real_scores, fake_scores, norm_d, x_real.detach(), y_real


@torch.no_grad()
def clip_weights(run: Run) -> None:
    """WGAN's Lipschitz constraint by weight clipping, after every D update."""
    for p in run.D.parameters():
        p.clamp_(-run.cfg.loss.clip, run.cfg.loss.clip)


def d_reg(run: Run, x_real: torch.Tensor, y_real: torch.Tensor | None, autocast) -> None:
    """Lazy R1: its own D update, γ/2·E‖∇D(x)‖² scaled by the interval (NVlabs' Dreg phase)."""
    cfg = run.cfg
    x_real = x_real.detach().requires_grad_(True)
    with autocast:
        real_scores = discriminate(run, x_real, y_real).float()
        loss = cfg.loss.r1_gamma / 2 * cfg.loss.r1_every * r1_penalty(real_scores, x_real)
    run.opt_d.zero_grad(set_to_none=True)
    loss.backward()
    run.opt_d.step()
    if cfg.loss.name == "wgan":
        clip_weights(run)


def g_reg(run: Run, autocast) -> None:
    """Lazy path length: its own G update on half a batch, scaled by the interval (Greg)."""
    cfg = run.cfg
    with autocast:
        ws = style_ws(run, max(1, cfg.batch_size // 2))
        penalty, run.state.pl_mean = path_length_penalty(synthesize(run, ws), ws, run.state.pl_mean, run.rng)
        loss = cfg.loss.pl_weight * cfg.loss.pl_every * penalty
    run.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    run.opt_g.step()


def train_step(run: Run, train: TensorData) -> dict[str, float]:
    """One step's phases (module docstring). Returns the log row (without step and time)."""
    cfg = run.cfg
    _, g_loss_fn = loss_pair(cfg.loss.name)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and run.device.type == "cuda")
    r1_due = cfg.loss.r1_gamma > 0 and run.step % cfg.loss.r1_every == 0
    for critic_step in range(cfg.loss.n_critic):
        loss_d, real_scores, fake_scores, norm_d, x_real, y_real = d_main(run, train, autocast, r1_due and critic_step == 0 and not lazy_r1(cfg))
    if r1_due and lazy_r1(cfg):
        d_reg(run, x_real, y_real, autocast)
    pl_due = run.spec.kind == "style" and cfg.loss.pl_weight > 0 and run.step % cfg.loss.pl_every == 0
    run.D.requires_grad_(False)  # G's update needs gradients through D, not into D's weights
    with autocast:
        x_fake, y_fake = generate_batch(run, cfg.batch_size, None)
        loss_g = g_loss_fn(discriminate(run, x_fake, y_fake).float())
        if pl_due and not lazy_pl(cfg):
            ws = style_ws(run, max(1, cfg.batch_size // 2))
            penalty, run.state.pl_mean = path_length_penalty(synthesize(run, ws), ws, run.state.pl_mean, run.rng)
            loss_g = loss_g + cfg.loss.pl_weight * penalty
    if cfg.optim.lr_decay == "linear":
        set_learning_rates(run)
    run.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    norm_g = grad_norm(run.G)
    run.opt_g.step()
    run.D.requires_grad_(True)
    if pl_due and lazy_pl(cfg):
        g_reg(run, autocast)
    if run.spec.kind == "style":
        with torch.no_grad():  # the running mean of w, used for truncation
            w = run.G.mapping(torch.randn(cfg.batch_size, run.spec.z_dim, generator=run.rng).to(run.device))
            run.G.w_avg.lerp_(w.mean(dim=0), 0.005)
    if cfg.ema_beta > 0:
        update_ema(run.G_ema, run.G, ema_beta_at(cfg, run.step))
    as_prob = torch.sigmoid if cfg.loss.name in LOGISTIC else (lambda t: t)
    return {
        "loss_d": loss_d.item(), "loss_g": loss_g.item(),
        "d_real": float(as_prob(real_scores.detach()).mean()), "d_fake": float(as_prob(fake_scores.detach()).mean()),
        "grad_norm_d": norm_d, "grad_norm_g": norm_g,
    }


class GanTask:
    """The GAN as a task of the run skeleton: its step, its evaluation (the data's judge), its
    fixed-panel samples and collapse warnings."""

    log_columns = LOG_COLUMNS

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.name, self.config = cfg.name, cfg
        self.train_set, held_out = load_dataset(cfg.data)
        if cfg.model.arch == "cdcgan" and self.train_set.num_classes < 2:  # (the model's own check was a traceback)
            raise DataError(f"a conditional model needs at least two classes, and this {cfg.data.name} data has {self.train_set.num_classes}: "
                            "give an image folder a sub-folder per class, MNIST its labels file")
        if cfg.batch_size > len(self.train_set):
            logging.getLogger(__name__).warning("batch_size %d is larger than the %d training samples: every batch is the whole set",
                                                cfg.batch_size, len(self.train_set))
        self.run = build_run(cfg, self.train_set, device)
        self.rng = self.run.rng
        self.checkpoint_spec = self.run.spec.to_dict()
        spec = self.run.spec
        self.panel_z = latents(spec, cfg.panel_size, PANEL_SEED)
        self.panel_y = balanced_labels(spec, cfg.panel_size)
        index = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(PANEL_SEED))[: cfg.panel_size]
        self.reference = as_floats(self.train_set.x[index])
        reference_labels = self.train_set.y[index] if self.panel_y is not None else None
        self.evaluator = GeneratorEvaluator(spec, cfg.data, self.train_set, held_out, cfg.eval.num_samples)
        self.monitor = CollapseMonitor(logistic_loss=cfg.loss.name in LOGISTIC | {"lsgan", "hinge"},
                                       real_diversity=mean_pairwise_distance(self.reference, reference_labels))

    def modules(self) -> dict[str, nn.Module]:
        return self.run.modules()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g": self.run.opt_g, "d": self.run.opt_d}

    def train_step(self, step: int) -> dict[str, float]:
        self.run.step = step
        row = train_step(self.run, self.train_set)
        self.run.step = step + 1
        return row | {"panel_diversity": ""}

    def observe(self, step: int, row: dict, report: Reporter) -> None:
        for warning in self.monitor.observe_step(step, row["loss_d"], row["grad_norm_g"]):
            report.warn(warning)

    def evaluate(self) -> dict[str, float]:
        return self.evaluator(self.run.sampler())

    def best_rule(self, step: int, metrics: dict) -> BestRule | None:
        """The configured metric where the data's judge reports it, else the generic judge's."""
        judge = self.evaluator.judge
        if self.config.eval.best_metric in metrics:
            return BestRule(self.config.eval.best_metric, self.config.eval.best_mode, judge)
        fallback = self.evaluator.fallback_metric
        return BestRule(*fallback, judge) if fallback and fallback[0] in metrics else None

    def milestone(self, step: int) -> str | None:
        return None

    def sample(self, step: int, path: Path, report: Reporter) -> dict:
        run = self.run
        panel = generate(run.sampler(), run.spec, self.panel_z, self.panel_y)
        diversity, warnings = self.monitor.observe_panel(step, panel, self.panel_y)
        for warning in warnings:
            report.warn(warning)
        if run.spec.is_image:
            save_grid(panel, path, nrow=int(math.sqrt(len(panel))) if run.spec.kind != "conditional" else run.spec.num_classes)
        else:
            save_scatter(panel, self.reference, path, title=f"{run.cfg.name} step {step}")
        return {"panel_diversity": round(diversity, 4)}

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass  # the GAN's state is all in its modules (pl_mean too), optimizers and RNG

    def run_spec(self) -> dict:
        return {**self.run.spec.to_dict(), "config": self.config.model_dump(), "metrics_file": "metrics.json"}

    def result_extras(self, out_dir: Path, history: list[dict]) -> dict:
        return {"judge": self.evaluator.judge}

    def plot_curves(self, log_csv: Path, out_path: Path) -> None:
        plot_curves(log_csv, out_path)


def schedule_for(cfg: TrainConfig) -> Schedule:
    return Schedule(cfg.max_steps, cfg.eval.every, cfg.sample_every, cfg.checkpoint_every, cfg.max_minutes)


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, device: str | None = None, show_progress: bool = True) -> dict:
    """Trains to `cfg.max_steps` generator steps; returns the content of metrics.json."""
    check_run_dir(out_dir, resume)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = GanTask(cfg, torch_device)
    return run_task(task, schedule_for(cfg), out_dir, torch_device, resume=resume, show_progress=show_progress)


def plot_curves(log_csv: Path, out_path: Path) -> None:
    """Loss and gradient-norm curves: the first thing to look at when a run misbehaves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), dpi=90)
    for ax, keys, title in zip(axes, (("loss_d", "loss_g"), ("d_real", "d_fake"), ("grad_norm_d", "grad_norm_g")), ("losses", "D outputs", "gradient norms")):
        for key in keys:
            ax.plot(steps, [float(r[key]) for r in rows], lw=0.6, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
