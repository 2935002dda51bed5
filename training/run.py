"""The run skeleton every training task shares (GAN, pix2pix, CycleGAN, super-resolution): time
budget, progress bar, CSV log (trimmed on resume), evaluation cadence, the best and the last
checkpoint, exact resume, metrics.json and curves. A task supplies its networks and optimizers,
one training step, its evaluation, its sample panel and whatever extra state it carries.

A run directory holds:
    config.json, spec.json      the config; what export needs (with the step and checkpoint hash)
    checkpoints/{last,best}.*   safetensors + JSON (a task may add its own, e.g. SR's `l1`)
    samples/step_<N>.png        the task's panel
    log.csv, curves.png         per-step log and its plot
    train.log, metrics.json     evaluations and warnings; the last and best metrics and history

Exact resume: a checkpoint holds every module, both optimizers, the task's RNG, torch's global
RNG (dropout draws from it) and the task's extra state (e.g. CycleGAN's image pools and their
random state), so a halted run resumed from `last` ends with the weights of an uninterrupted one.
Evaluation runs under a forked global RNG, so a judge trained at the first evaluation (with its own
seed) cannot shift the training's random stream.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from pydantic import BaseModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from training.checkpoint import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class Schedule:
    """When things happen, in training steps (a step is one G update, or one task step)."""

    max_steps: int
    eval_every: int
    sample_every: int
    checkpoint_every: int
    max_minutes: float | None = None  # wall-clock budget of this invocation


@dataclass(frozen=True)
class BestRule:
    """Which metric keeps the best checkpoint, in which direction, and which judge produced it."""

    metric: str
    mode: str  # "min" or "max"
    judge: str

    def better(self, value: float, best: dict) -> bool:
        return not best or (value < best["value"] if self.mode == "min" else value > best["value"])


class Reporter:
    """Where a task's warnings and notes go: train.log and the console above the progress bar."""

    def __init__(self, logger: logging.Logger, progress: Progress) -> None:
        self.logger, self.progress = logger, progress

    def warn(self, message: str) -> None:
        self.logger.warning(message)
        self.progress.console.print(f"[yellow]warning[/] {message}")

    def info(self, message: str, console: bool = True) -> None:
        self.logger.info(message)
        if console:
            self.progress.console.print(message)


class Task(Protocol):
    """What a task gives the skeleton."""

    name: str
    config: BaseModel
    log_columns: list[str]
    rng: torch.Generator  # the task's training randomness (minibatches, latents, augmentation)
    checkpoint_spec: dict  # stored in every checkpoint's JSON: how to rebuild the served network

    def modules(self) -> dict[str, nn.Module]: ...
    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...
    def train_step(self, step: int) -> dict[str, float]: ...  # step: how many steps are done before it
    def observe(self, step: int, row: dict, report: Reporter) -> None: ...  # after each step
    def evaluate(self) -> dict[str, float]: ...
    def best_rule(self, step: int, metrics: dict) -> BestRule | None: ...  # None: this evaluation cannot be "best"
    def milestone(self, step: int) -> str | None: ...  # a named checkpoint (with an evaluation) at this step
    def sample(self, step: int, path: Path, report: Reporter) -> dict: ...  # writes the panel; extra log fields
    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]: ...  # (tensors, JSON) beyond modules/optimizers
    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...
    def run_spec(self) -> dict: ...  # spec.json, before the step and checkpoint hash
    def result_extras(self, out_dir: Path, history: list[dict]) -> dict: ...  # task-specific keys of metrics.json
    def plot_curves(self, log_csv: Path, out_path: Path) -> None: ...


@dataclass
class RunState:
    step: int = 0
    best: dict = field(default_factory=dict)  # {"step", "value", "metric", "judge", "metrics"}
    history: list[dict] = field(default_factory=list)
    sha256: str | None = None


class RunFiles:
    """Paths inside a run directory."""

    def __init__(self, out_dir: Path) -> None:
        self.root = out_dir
        self.checkpoints = out_dir / "checkpoints"
        self.last = self.checkpoints / "last.safetensors"
        self.best = self.checkpoints / "best.safetensors"
        self.log_csv = out_dir / "log.csv"
        self.metrics = out_dir / "metrics.json"
        self.spec = out_dir / "spec.json"
        self.config = out_dir / "config.json"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / f"{name}.safetensors"


def trim_log(log_csv: Path, columns: list[str], up_to_step: int) -> None:
    """On resume, drop log rows written after the checkpoint we restart from."""
    if not log_csv.exists():
        return
    with open(log_csv) as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to_step]
    with open(log_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
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


def make_progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def global_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng.cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_global_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


class Runner:
    """Drives one task through its schedule in `out_dir`."""

    def __init__(self, task: Task, schedule: Schedule, out_dir: Path, device: torch.device) -> None:
        self.task, self.schedule, self.files, self.device = task, schedule, RunFiles(out_dir), device
        self.state = RunState()
        self.logger = make_logger(out_dir / "train.log")

    def save(self, path: Path) -> str:
        tensors, extra_meta = self.task.extra_state()
        tensors = tensors | global_rng_state(self.device)
        meta = {"step": self.state.step, "best": self.state.best, "history": self.state.history,
                "spec": self.task.checkpoint_spec, "config": self.task.config.model_dump(), "task_state": extra_meta}
        return save_checkpoint(path, self.task.modules(), self.task.optimizers(), self.task.rng, meta, extra_tensors=tensors)

    def resume(self) -> None:
        meta = load_checkpoint(self.files.last, self.task.modules(), self.task.optimizers(), self.task.rng)
        tensors = meta.pop("extra_tensors")
        restore_global_rng(tensors, self.device)
        self.task.load_extra_state(tensors, meta.get("task_state", {}))
        self.state = RunState(meta["step"], meta.get("best", {}), meta.get("history", []))
        trim_log(self.files.log_csv, self.task.log_columns, self.state.step)
        self.logger.info("resumed at step %d", self.state.step)

    def save_last(self) -> None:
        self.state.sha256 = self.save(self.files.last)
        spec = self.task.run_spec() | {"step": self.state.step, "checkpoint_sha256": self.state.sha256}
        self.files.spec.write_text(json.dumps(spec, indent=2))

    def evaluate(self, report: Reporter) -> None:
        forked = [] if self.device.type != "cuda" else [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=forked):
            metrics = self.task.evaluate()
        state = self.state
        state.history.append({"step": state.step, **metrics})
        report.info(f"step {state.step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
        rule = self.task.best_rule(state.step, metrics)
        value = metrics.get(rule.metric) if rule else None
        if rule is None or value is None or not math.isfinite(value):
            return
        if rule.better(value, state.best):
            state.best = {"step": state.step, "value": value, "metric": rule.metric, "judge": rule.judge, "metrics": metrics}
            self.save(self.files.best)

    def run(self, resume: bool, show_progress: bool) -> dict:
        task, schedule, files, state = self.task, self.schedule, self.files, self.state
        if resume:
            self.resume()
            state = self.state
        files.config.write_text(task.config.model_dump_json(indent=2))
        new_log = not files.log_csv.exists()
        with open(files.log_csv, "a", newline="") as log_handle, make_progress(show_progress) as progress:
            report = Reporter(self.logger, progress)
            writer = csv.DictWriter(log_handle, task.log_columns)
            if new_log:
                writer.writeheader()
            bar = progress.add_task(task.name, total=schedule.max_steps, completed=state.step, status="")
            deadline = time.monotonic() + 60 * schedule.max_minutes if schedule.max_minutes else None
            while state.step < schedule.max_steps:
                started = time.perf_counter()
                row = task.train_step(state.step)
                state.step += 1
                row.update(step=state.step, step_time=time.perf_counter() - started)
                task.observe(state.step, row, report)
                out_of_time = deadline is not None and time.monotonic() > deadline
                final = state.step == schedule.max_steps or out_of_time
                if state.step % schedule.sample_every == 0 or final:
                    row.update(task.sample(state.step, files.root / "samples" / f"step_{state.step:06d}.png", report))
                milestone = task.milestone(state.step)
                if milestone or state.step % schedule.eval_every == 0 or final:
                    self.evaluate(report)
                if milestone:
                    self.save(files.checkpoint(milestone))
                if state.step % schedule.checkpoint_every == 0 or final:
                    self.save_last()
                writer.writerow(row)
                progress.update(bar, advance=1, status=f"D {row['loss_d']:.3f} G {row['loss_g']:.3f}")
                if out_of_time:
                    self.logger.info("stopped at step %d: the %.1f-minute budget is spent", state.step, schedule.max_minutes)
                    break
        with open(files.log_csv) as handle:
            wall = sum(float(r["step_time"]) for r in csv.DictReader(handle))
        result = {"name": task.name, "step": state.step, "last": state.history[-1] if state.history else {}, "best": state.best,
                  "history": state.history, "wall_seconds": wall} | task.result_extras(files.root, state.history)
        files.metrics.write_text(json.dumps(result, indent=2))
        task.plot_curves(files.log_csv, files.root / "curves.png")
        return result


def check_run_dir(out_dir: str | Path, resume: bool) -> None:
    """Before anything is loaded or written: a new run never overwrites one, and `--resume` needs
    one (it failed after the data had loaded, leaving a train.log behind)."""
    last = RunFiles(Path(out_dir)).last
    if not resume and last.exists():
        raise FileExistsError(f"{out_dir} already holds a run: pass --resume to continue it or choose another --out")
    if resume and not last.exists():
        raise FileNotFoundError(f"{out_dir} holds no run to resume ({last} is missing): drop --resume to start one there")


def run_task(task: Task, schedule: Schedule, out_dir: str | Path, device: torch.device, resume: bool = False, show_progress: bool = True) -> dict:
    """Runs `task` to `schedule.max_steps` (or its time budget) in `out_dir`; returns metrics.json."""
    out_dir = Path(out_dir)
    check_run_dir(out_dir, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    return Runner(task, schedule, out_dir, device).run(resume, show_progress)
