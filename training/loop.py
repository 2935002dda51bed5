"""The training loop: alternating D and G updates with the configured loss, EMA of G, periodic
samples from a fixed latent panel, metric evaluation that keeps the best checkpoint beside the
last, collapse diagnostics, and exact resumption.

A run directory holds:
    spec.json                 how to rebuild and call the generator, plus config and step
    checkpoints/{last,best}.safetensors (+ .json)
    samples/step_<N>.png      grids (or scatter plots for 2-D data) from the fixed panel
    log.csv                   per-step losses, D outputs, gradient norms, step time
    train.log                 collapse warnings and evaluation lines
    metrics.json              final and best metrics, and their history
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from models.spec import ModelSpec
from models.zoo import build_discriminator, build_generator
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import TensorData, load_dataset
from training.diagnostics import CollapseMonitor, mean_pairwise_distance
from training.evaluate import GeneratorEvaluator
from training.images import save_grid, save_scatter
from training.augment import diff_augment
from training.losses import LOGISTIC, gradient_penalty, loss_pair, path_length_penalty, r1_penalty
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


def build_run(cfg: TrainConfig, train: TensorData, device: torch.device) -> Run:
    torch.manual_seed(cfg.seed)  # weight initialisation
    spec = spec_for(cfg, train)
    G = build_generator(spec).to(device)
    D = build_discriminator(spec, cfg.model.discriminator, cfg.model.pack).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d, betas=betas)
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
    remaining = max(0.0, 1.0 - run.step / run.cfg.max_steps)
    for optimizer, base in ((run.opt_g, run.cfg.optim.lr_g), (run.opt_d, run.cfg.optim.lr_d)):
        for group in optimizer.param_groups:
            group["lr"] = base * remaining


def train_step(run: Run, train: TensorData) -> dict[str, float]:
    """n_critic D updates, then one G update. Returns the log row (without step and time)."""
    cfg = run.cfg
    d_loss_fn, g_loss_fn = loss_pair(cfg.loss.name)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and run.device.type == "cuda")
    lazy_r1 = cfg.loss.r1_gamma > 0 and run.step % cfg.loss.r1_every == 0
    for critic_step in range(cfg.loss.n_critic):
        apply_r1 = lazy_r1 and critic_step == 0
        x_real, y_real = train.minibatch(cfg.batch_size, run.rng)
        x_real = x_real.to(run.device)
        y_real = None if y_real is None else y_real.to(run.device)
        with autocast:
            with torch.no_grad():
                x_fake, y_fake = generate_batch(run, len(x_real), y_real)
            if apply_r1:
                x_real.requires_grad_(True)
            real_scores = discriminate(run, x_real, y_real).float()
            fake_scores = discriminate(run, x_fake, y_fake).float()
            loss_d = d_loss_fn(real_scores, fake_scores)
            if cfg.loss.name == "wgan-gp":
                # interpolates share the real labels; for unconditional critics labels are unused
                critic = lambda x: discriminate(run, x, y_real).float()  # noqa: E731
                loss_d = loss_d + cfg.loss.gp_weight * gradient_penalty(critic, x_real, x_fake, run.rng)
            if apply_r1:  # lazy: every r1_every steps, scaled up to keep the same average strength
                loss_d = loss_d + cfg.loss.r1_gamma / 2 * cfg.loss.r1_every * r1_penalty(real_scores, x_real)
        run.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        norm_d = grad_norm(run.D)
        run.opt_d.step()
        if cfg.loss.name == "wgan":
            with torch.no_grad():
                for p in run.D.parameters():
                    p.clamp_(-cfg.loss.clip, cfg.loss.clip)
    with autocast:
        x_fake, y_fake = generate_batch(run, cfg.batch_size, None)
        loss_g = g_loss_fn(discriminate(run, x_fake, y_fake).float())
        if run.spec.kind == "style" and cfg.loss.pl_weight > 0 and run.step % cfg.loss.pl_every == 0:
            ws = style_ws(run, max(1, cfg.batch_size // 2))
            penalty, run.state.pl_mean = path_length_penalty(synthesize(run, ws), ws, run.state.pl_mean, run.rng)
            loss_g = loss_g + cfg.loss.pl_weight * cfg.loss.pl_every * penalty
    if cfg.optim.lr_decay == "linear":
        set_learning_rates(run)
    run.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    norm_g = grad_norm(run.G)
    run.opt_g.step()
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


class RunFiles:
    """Paths inside a run directory and the small writers for them."""

    def __init__(self, out_dir: Path) -> None:
        self.root = out_dir
        self.last = out_dir / "checkpoints" / "last.safetensors"
        self.best = out_dir / "checkpoints" / "best.safetensors"
        self.log_csv = out_dir / "log.csv"
        self.metrics = out_dir / "metrics.json"
        self.spec = out_dir / "spec.json"

    def trim_log(self, up_to_step: int) -> None:
        """On resume, drop log rows written after the checkpoint we restart from."""
        if not self.log_csv.exists():
            return
        with open(self.log_csv) as handle:
            rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to_step]
        with open(self.log_csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def make_logger(path: Path) -> logging.Logger:
    logger = logging.getLogger(f"ganserve.train.{path}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, device: str | None = None, show_progress: bool = True) -> dict:
    """Trains to `cfg.max_steps` generator steps; returns the content of metrics.json."""
    out_dir = Path(out_dir)
    files = RunFiles(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume and files.last.exists():
        raise FileExistsError(f"{out_dir} already holds a run: pass --resume to continue it or choose another --out")
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_set, held_out = load_dataset(cfg.data)
    run = build_run(cfg, train_set, torch_device)
    logger = make_logger(out_dir / "train.log")
    if resume:
        meta = load_checkpoint(files.last, run.modules(), {"g": run.opt_g, "d": run.opt_d}, run.rng)
        run.step, run.best, run.history = meta["step"], meta.get("best", {}), meta.get("history", [])
        files.trim_log(run.step)
        logger.info("resumed at step %d", run.step)
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))

    panel_z = latents(run.spec, cfg.panel_size, PANEL_SEED)
    panel_y = balanced_labels(run.spec, cfg.panel_size)
    reference_index = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(PANEL_SEED))[: cfg.panel_size]
    reference = train_set.x[reference_index]
    reference_labels = train_set.y[reference_index] if panel_y is not None else None
    evaluator = GeneratorEvaluator(run.spec, cfg.data, train_set, held_out, cfg.eval.num_samples)
    monitor = CollapseMonitor(logistic_loss=cfg.loss.name in LOGISTIC | {"lsgan", "hinge"}, real_diversity=mean_pairwise_distance(reference, reference_labels))

    new_log = not files.log_csv.exists()
    with open(files.log_csv, "a", newline="") as log_handle, make_progress(show_progress) as progress:
        writer = csv.DictWriter(log_handle, LOG_COLUMNS)
        if new_log:
            writer.writeheader()
        task = progress.add_task(cfg.name, total=cfg.max_steps, completed=run.step, status="")
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else None
        while run.step < cfg.max_steps:
            started = time.perf_counter()
            row = train_step(run, train_set)
            run.step += 1
            row.update(step=run.step, step_time=time.perf_counter() - started, panel_diversity="")
            for warning in monitor.observe_step(run.step, row["loss_d"], row["grad_norm_g"]):
                logger.warning(warning)
                progress.console.print(f"[yellow]warning[/] {warning}")
            out_of_time = deadline is not None and time.monotonic() > deadline
            final = run.step == cfg.max_steps or out_of_time
            if run.step % cfg.sample_every == 0 or final:
                row["panel_diversity"] = sample_panel(run, files, panel_z, panel_y, reference, monitor, logger, progress)
            if run.step % cfg.eval.every == 0 or final:
                evaluate_and_keep_best(run, files, evaluator, logger, progress)
            if run.step % cfg.checkpoint_every == 0 or final:
                save_run(run, files)
            writer.writerow(row)
            progress.update(task, advance=1, status=f"D {row['loss_d']:.3f} G {row['loss_g']:.3f}")
            if out_of_time:
                logger.info("stopped at step %d: the %.1f-minute budget is spent", run.step, cfg.max_minutes)
                break
    result = write_metrics(run, files)
    plot_curves(files.log_csv, out_dir / "curves.png")
    return result


def make_progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def sample_panel(run: Run, files: RunFiles, panel_z, panel_y, reference, monitor: CollapseMonitor, logger, progress) -> float:
    panel = generate(run.sampler(), run.spec, panel_z, panel_y)
    diversity, warnings = monitor.observe_panel(run.step, panel, panel_y)
    for warning in warnings:
        logger.warning(warning)
        progress.console.print(f"[yellow]warning[/] {warning}")
    path = files.root / "samples" / f"step_{run.step:06d}.png"
    if run.spec.is_image:
        save_grid(panel, path, nrow=int(math.sqrt(len(panel))) if run.spec.kind != "conditional" else run.spec.num_classes)
    else:
        save_scatter(panel, reference, path, title=f"{run.cfg.name} step {run.step}")
    return round(diversity, 4)


def evaluate_and_keep_best(run: Run, files: RunFiles, evaluator: GeneratorEvaluator, logger, progress) -> None:
    cfg = run.cfg
    metrics = evaluator(run.sampler())
    run.history.append({"step": run.step, **metrics})
    summary = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    logger.info("step %d eval %s", run.step, summary)
    progress.console.print(f"step {run.step}: {summary}")
    value = metrics.get(cfg.eval.best_metric)
    if value is None or not math.isfinite(value):
        return
    better = not run.best or (value < run.best["value"] if cfg.eval.best_mode == "min" else value > run.best["value"])
    if better:
        run.best = {"step": run.step, "value": value, "metric": cfg.eval.best_metric, "metrics": metrics}
        save_run(run, files, path=files.best)


def save_run(run: Run, files: RunFiles, path: Path | None = None) -> None:
    meta = {"step": run.step, "best": run.best, "history": run.history, "spec": run.spec.to_dict(), "config": run.cfg.model_dump()}
    digest = save_checkpoint(path or files.last, run.modules(), {"g": run.opt_g, "d": run.opt_d}, run.rng, meta)
    if path is None:
        spec = {**run.spec.to_dict(), "config": run.cfg.model_dump(), "step": run.step, "checkpoint_sha256": digest, "metrics_file": "metrics.json"}
        files.spec.write_text(json.dumps(spec, indent=2))


def write_metrics(run: Run, files: RunFiles) -> dict:
    last = run.history[-1] if run.history else {}
    result = {"name": run.cfg.name, "step": run.step, "last": last, "best": run.best, "history": run.history}
    files.metrics.write_text(json.dumps(result, indent=2))
    return result


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
