"""Image-to-image tasks (pix2pix, CycleGAN, super-resolution) as tasks of the run skeleton
(`training/run.py`: time budget, log, evaluation cadence, best + last checkpoints, exact resume).

Run directory (same names as the GAN runs):
    config.json, spec.json      the config, and what export needs to rebuild the generator
    checkpoints/{last,best}.*   safetensors + JSON (SR also keeps `l1`, the pre-trained model);
                                `best` by the task's metric (SR: among GAN-phase evaluations)
    samples/step_N.png          held-out panel: rows input | output | target (SR: nearest |
                                bicubic | SR | original; CycleGAN: A | A→B | A→B→A)
    log.csv, curves.png         per-step losses
    train.log, metrics.json     evaluations, the last and the best by the task's metric
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch import nn

from training.image2image.config import KIND_FOR_TASK, I2IConfig
from training.image2image.tasks import TASKS, translator_params
from training.images import save_grid
from training.run import BestRule, Reporter, Schedule, check_run_dir, run_task


def phases(cfg: I2IConfig) -> list[tuple[int, int]]:
    """The run's phases as [begin, end) step ranges: one for pix2pix/CycleGAN, two for SR with
    pre-training (L1, then GAN), so that each phase ends its own learning-rate decay."""
    pretrain = cfg.loss.pretrain_steps if cfg.task == "superres" else 0
    if 0 < pretrain < cfg.max_steps:
        return [(0, pretrain), (pretrain, cfg.max_steps)]
    return [(0, cfg.max_steps)]


def linear_decay(cfg: I2IConfig, step: int) -> float:
    """1 until `decay_start` of the step's phase, then linearly to 0 at the phase's end
    (pix2pix/CycleGAN's schedule; SR's L1 phase ends on it before the GAN phase starts afresh)."""
    spans = phases(cfg)
    begin, end = next(((b, e) for b, e in spans if step < e), spans[-1])
    start = begin + cfg.optim.decay_start * (end - begin)
    return 1.0 if step < start else max(0.0, 1 - (step - start) / max(1.0, end - start))


def set_learning_rates(task, cfg: I2IConfig, step: int) -> None:
    factor = linear_decay(cfg, step)
    for optimizer, base in ((task.opt_g, cfg.optim.lr_g), (task.opt_d, cfg.optim.lr_d)):
        for group in optimizer.param_groups:
            group["lr"] = base * factor


def spec_for(cfg: I2IConfig, task) -> dict:
    params = translator_params(cfg)
    served = task.served()
    return {
        "task": cfg.task,
        "kind": KIND_FOR_TASK[cfg.task],
        "generator": params,
        "size_multiple": int(getattr(served, "size_multiple", 1)),
        "scale": int(getattr(served, "scale", 1)),
        "in_channels": params["in_channels"],
        "out_channels": params["out_channels"],
        "train_resolution": cfg.data.resolution,
        "value_range": [-1.0, 1.0],
        "domains": [cfg.data.domain_a, cfg.data.domain_b] if cfg.task == "cyclegan" else None,
    }


TASK_JUDGES = {"pix2pix": "PSNR against held-out targets", "superres": "PSNR against held-out originals",
               "cyclegan": "domain classifier on translated held-out images"}


class ImageToImageTask:
    """Adapts a task of `tasks.py` (networks, step, evaluation, panel) to the run skeleton."""

    def __init__(self, cfg: I2IConfig, device: torch.device) -> None:
        torch.manual_seed(cfg.seed)
        self.name, self.config = cfg.name, cfg
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.inner = TASKS[cfg.task](cfg, device, self.rng)
        self.log_columns = ["step", "loss_d", "loss_g", *({"pix2pix": ["l1"], "cyclegan": ["cycle"], "superres": ["l1"]}[cfg.task]), "step_time"]
        self.checkpoint_spec = spec_for(cfg, self.inner)

    def modules(self) -> dict[str, nn.Module]:
        return self.inner.modules()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.inner.optimizers()

    def train_step(self, step: int) -> dict[str, float]:
        set_learning_rates(self.inner, self.config, step)
        return self.inner.step(step)

    def observe(self, step: int, row: dict, report: Reporter) -> None:
        pass

    def evaluate(self) -> dict[str, float]:
        return self.inner.evaluate()

    def best_rule(self, step: int, metrics: dict) -> BestRule | None:
        """The task's metric; an SR run with a GAN phase picks among that phase's evaluations (the
        L1 model has its own checkpoint, `l1`, and would otherwise win on PSNR)."""
        spans = phases(self.config)
        if self.config.task == "superres" and len(spans) > 1 and step <= spans[1][0]:
            return None
        return BestRule(self.inner.best_metric, self.inner.best_mode, TASK_JUDGES[self.config.task])

    def milestone(self, step: int) -> str | None:
        """SR: the L1 model, checkpointed (and evaluated) where pre-training ends."""
        return "l1" if self.config.task == "superres" and step == self.config.loss.pretrain_steps else None

    def sample(self, step: int, path: Path, report: Reporter) -> dict:
        rows = self.inner.panel()
        save_grid(torch.cat(rows), path, nrow=len(rows[0]))
        return {}

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.inner.extra_state() if hasattr(self.inner, "extra_state") else ({}, {})

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if hasattr(self.inner, "load_extra_state"):
            self.inner.load_extra_state(tensors, meta)

    def run_spec(self) -> dict:
        return dict(self.checkpoint_spec)

    def result_extras(self, out_dir: Path, history: list[dict]) -> dict:
        extras = {"task": self.config.task, "judge": TASK_JUDGES[self.config.task]}
        if self.config.task == "superres":
            l1 = out_dir / "checkpoints" / "l1.json"
            pretrain = self.config.loss.pretrain_steps
            extras["l1_model"] = next((h for h in history if h["step"] == pretrain), None) if pretrain > 0 else None
            if extras["l1_model"] is None and l1.exists():
                extras["l1_model"] = json.loads(l1.read_text())["history"][-1]
        return extras

    def plot_curves(self, log_csv: Path, out_path: Path) -> None:
        plot_losses(log_csv, out_path)


def train_image_to_image(cfg: I2IConfig, out_dir: str | Path, resume: bool = False, device: str | None = None, show_progress: bool = True) -> dict:
    """Trains the task; returns the content of metrics.json."""
    check_run_dir(out_dir, resume)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = ImageToImageTask(cfg, torch_device)
    schedule = Schedule(cfg.max_steps, cfg.eval_every, cfg.sample_every, cfg.eval_every, cfg.max_minutes)
    return run_task(task, schedule, out_dir, torch_device, resume=resume, show_progress=show_progress)


def plot_losses(log_csv: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(log_csv)))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in rows[0]:
        if key not in ("step", "step_time"):
            ax.plot(steps, [float(r[key]) for r in rows], label=key, linewidth=0.6)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
