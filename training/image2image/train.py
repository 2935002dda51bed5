"""Runs an image-to-image task to its step count or time budget.

Run directory (same names as the GAN runs):
    config.json, spec.json      the config, and what export needs to rebuild the generator
    checkpoints/last.*          safetensors + JSON (SR also keeps `l1`, the pre-trained model)
    samples/step_N.png          held-out panel: rows input | output | target (SR: nearest |
                                bicubic | SR | original; CycleGAN: A | A→B | A→B→A)
    log.csv, curves.png         per-step losses
    train.log, metrics.json     evaluations, the last and the best by the task's metric
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from training.checkpoint import load_checkpoint, save_checkpoint
from training.image2image.config import KIND_FOR_TASK, I2IConfig
from training.image2image.tasks import TASKS, translator_params
from training.images import save_grid
from training.loop import make_logger, make_progress


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


def better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def train_image_to_image(cfg: I2IConfig, out_dir: str | Path, resume: bool = False, device: str | None = None, show_progress: bool = True) -> dict:
    """Trains the task; returns the content of metrics.json."""
    out_dir = Path(out_dir)
    last = out_dir / "checkpoints" / "last.safetensors"
    if not resume and last.exists():
        raise FileExistsError(f"{out_dir} already holds a run: pass --resume to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rng = torch.Generator().manual_seed(cfg.seed)
    task = TASKS[cfg.task](cfg, torch_device, rng)
    logger = make_logger(out_dir / "train.log")
    step, history, best = 0, [], {}
    if resume:
        meta = load_checkpoint(last, task.modules(), task.optimizers(), rng)
        step, history, best = meta["step"], meta.get("history", []), meta.get("best", {})
        logger.info("resumed at step %d", step)
    spec = spec_for(cfg, task)
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))

    def checkpoint(name: str) -> str:
        meta = {"step": step, "history": history, "best": best, "spec": spec, "config": cfg.model_dump()}
        return save_checkpoint(out_dir / "checkpoints" / f"{name}.safetensors", task.modules(), task.optimizers(), rng, meta)

    def evaluate() -> dict:
        metrics = {"step": step, **task.evaluate()}
        history.append(metrics)
        logger.info("step %d eval %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"))
        if better(metrics[task.best_metric], best.get("value"), task.best_mode):
            best.update(step=step, value=metrics[task.best_metric], metric=task.best_metric, metrics=metrics)
        return metrics

    log_path = out_dir / "log.csv"
    columns = ["step", "loss_d", "loss_g", *({"pix2pix": ["l1"], "cyclegan": ["cycle"], "superres": ["l1"]}[cfg.task]), "step_time"]
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else None
    pretrain_metrics, sha = None, None
    with open(log_path, "a", newline="") as handle, make_progress(show_progress) as progress:
        writer = csv.DictWriter(handle, columns)
        if handle.tell() == 0:
            writer.writeheader()
        bar = progress.add_task(cfg.name, total=cfg.max_steps, completed=step, status="")
        while step < cfg.max_steps:
            started = time.perf_counter()
            set_learning_rates(task, cfg, step)
            row = task.step(step)
            step += 1
            writer.writerow({"step": step, **row, "step_time": time.perf_counter() - started})
            out_of_time = deadline is not None and time.monotonic() > deadline
            final = step == cfg.max_steps or out_of_time
            if cfg.task == "superres" and step == cfg.loss.pretrain_steps:
                pretrain_metrics = evaluate()
                checkpoint("l1")
                logger.info("L1 pre-training done at step %d: PSNR %.2f dB (bicubic %.2f)", step, pretrain_metrics["psnr"], pretrain_metrics["bicubic_psnr"])
            elif step % cfg.eval_every == 0 or final:
                evaluate()
            if step % cfg.sample_every == 0 or final:
                rows = task.panel()
                save_grid(torch.cat(rows), out_dir / "samples" / f"step_{step:06d}.png", nrow=len(rows[0]))
            if step % cfg.eval_every == 0 or final:
                sha = checkpoint("last")
            progress.update(bar, advance=1, status=f"D {row['loss_d']:.3f} G {row['loss_g']:.3f}")
            if out_of_time:
                logger.info("stopped at step %d: the %.1f-minute budget is spent", step, cfg.max_minutes)
                break
    spec |= {"step": step, "checkpoint_sha256": sha}
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    result = {"name": cfg.name, "task": cfg.task, "step": step, "last": history[-1], "best": best, "history": history,
              "wall_seconds": sum(float(r["step_time"]) for r in csv.DictReader(open(log_path)))}
    if cfg.task == "superres":
        l1_meta = out_dir / "checkpoints" / "l1.json"
        result["l1_model"] = pretrain_metrics or (json.loads(l1_meta.read_text())["history"][-1] if l1_meta.exists() else None)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    plot_losses(log_path, out_dir / "curves.png")
    return result


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
