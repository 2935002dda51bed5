"""The training-side verbs of `ganserve`: train, evaluate, sample, train-classifier, results."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def stop(verb: str, message: str) -> typer.Exit:
    """One line on stderr for a problem the user can fix (a config, their data), then exit 2."""
    from rich.markup import escape

    Console(stderr=True).print(f"[red]ganserve {verb}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def checked_device(device: str | None) -> str | None:
    """`--device` as torch takes it, on a device torch has (cuda on a machine without one failed
    120 lines into the run's set-up)."""
    import re

    import torch

    if device is None:
        return None
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise stop("train", f"--device {device!r}: use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise stop("train", f"--device {device}: torch finds no CUDA device here")
    return device


def train_command(
    config: Path = typer.Option(..., "--config", "-c", exists=True, dir_okay=False, help="YAML config, e.g. configs/dcgan-digits.yaml"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/<config name>)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="override the config's generator steps"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    seed: Optional[int] = typer.Option(None, "--seed", help="override the config's seed"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", min=0.1, help="stop cleanly after this many minutes of this invocation"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)"),
) -> None:
    """Train a GAN from a config; writes checkpoints, samples, log.csv and metrics.json."""
    import yaml
    from pydantic import ValidationError

    from training.config import TrainConfig
    from training.data.readers import DataError
    from training.image2image.config import I2IConfig, is_image_to_image
    from training.image2image.train import train_image_to_image
    from training.loop import train

    try:
        device = checked_device(device)
        raw = yaml.safe_load(config.read_text()) or {}
        if not isinstance(raw, dict):
            raise stop("train", f"{config} is not a YAML mapping of settings")
        updates = {k: v for k, v in {"max_steps": max_steps, "seed": seed, "max_minutes": max_minutes}.items() if v is not None}
        if is_image_to_image(raw):
            cfg = I2IConfig.model_validate(raw | updates)
            out = out or Path("runs") / cfg.name
            result = train_image_to_image(cfg, out, resume=resume, device=device)
        else:
            cfg = TrainConfig.model_validate(raw | updates)
            out = out or Path("runs") / cfg.name
            result = train(cfg, out, resume=resume, device=device)
    except yaml.YAMLError as error:
        raise stop("train", f"{config} is not valid YAML ({error})")
    except ValidationError as error:  # each setting's place and problem, not a traceback
        raise stop("train", "; ".join(f"{'.'.join(map(str, problem['loc'])) or 'config'}: {problem['msg']}" for problem in error.errors()))
    except (DataError, FileExistsError, FileNotFoundError) as error:
        raise stop("train", str(error))
    print_metrics(f"{cfg.name} — step {result['step']}", result["last"], result.get("best"))
    console.print(f"run written to [bold]{out}[/]")


def evaluate_command(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="a run directory written by `ganserve train`"),
    checkpoint: str = typer.Option("best", help="best or last"),
    num_samples: int = typer.Option(5000, min=10, help="generated samples to evaluate"),
    inception_weights: Optional[Path] = typer.Option(None, help="InceptionV3 FID weights file, adds standard FID"),
) -> None:
    """Evaluate a run's generator and write the metrics into its metrics.json."""
    from training.run_eval import evaluate_run

    from training.data.readers import DataError
    from training.run_eval import RunError

    try:
        metrics = evaluate_run(run_dir, checkpoint, num_samples, inception_weights)
    except (DataError, RunError, FileNotFoundError) as error:  # the run's data moved or changed since it trained, a checkpoint it lacks
        raise stop("evaluate", str(error))
    print_metrics(f"{run_dir} ({checkpoint})", metrics)


def sample_command(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False),
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid to write"),
    n: int = typer.Option(64, "--n", min=1, max=1024, help="number of samples"),
    seed: int = typer.Option(0, help="latent seed: the same seed gives the same samples"),
    label: Optional[str] = typer.Option(None, "--class", help="class index or name for conditional models (default: all classes in turn)"),
    checkpoint: str = typer.Option("best", help="best or last"),
    truncation: float = typer.Option(1.0, min=0.0, max=1.0, help="scale latents toward 0 (1 = off)"),
) -> None:
    """Draw samples from a trained run into a PNG grid."""
    from training.run_eval import RunError, sample_run

    try:
        sample_run(run_dir, out, n, seed, label, checkpoint, truncation)
    except (RunError, FileNotFoundError) as error:  # a class the model has not, a checkpoint the run lacks
        raise stop("sample", str(error))
    console.print(f"wrote [bold]{out}[/]")


def train_classifier_command(epochs: int = typer.Option(40, min=1)) -> None:
    """Rebuild the digits feature classifier shipped in training/metrics/."""
    from training.feature_classifier import train_digits_classifier

    accuracy = train_digits_classifier(epochs=epochs)
    console.print(f"held-out accuracy {accuracy:.4f}")


def train_shapes_predictor_command(
    epochs: int = typer.Option(8, min=1),
    role: str = typer.Option("features", help="features (FID/KID features, data size range) or reader (judges latent edits, wider size range)"),
) -> None:
    """Rebuild a shapes attribute predictor shipped in training/metrics/."""
    from training.shapes_predictor import ROLES, train_shapes_predictor

    if role not in ROLES:
        raise typer.BadParameter(f"role must be one of {', '.join(ROLES)}, not {role!r}", param_hint="--role")
    for name, value in train_shapes_predictor(ROLES[role], epochs=epochs).items():
        console.print(f"{name:28s} {value:.4f}")


def results_command(
    out: Path = typer.Option(Path("docs/results.md"), "--out"),
    runs: Path = typer.Option(Path("runs/results"), "--runs", help="where the result runs are trained"),
    seeds: int = typer.Option(3, min=1, help="seeds per grid25 loss"),
    sections: str = typer.Option("grid,grid-seeds,digits,style,image2image,cyclegan-shapes", help="comma-separated: grid, grid-seeds, digits, style, image2image, cyclegan-shapes; a partial list rewrites only those sections of an existing --out"),
) -> None:
    """Train the benchmark runs (grid25 x losses x seeds, digits DCGAN and cDCGAN, StyleGAN on shapes) and write docs/results.md."""
    from training.results import build_results

    build_results(out, runs, seeds, tuple(p.strip() for p in sections.split(",") if p.strip()))
    console.print(f"wrote [bold]{out}[/]")


def export_command(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="a run directory written by `ganserve train`"),
    name: str = typer.Option(..., "--name", help="model name in the repository, e.g. dcgan-digits"),
    version: int = typer.Option(1, "--version", min=1),
    formats: str = typer.Option("onnx,torchscript", "--formats", help="comma-separated: onnx, torchscript"),
    repository: Path = typer.Option(Path("model_repository"), "--repository"),
    checkpoint: str = typer.Option("best", help="best or last (image-to-image runs also l1, an SR run's L1 model); runs trained before best existed for image-to-image fall back to last"),
) -> None:
    """Export a run to a model-repository entry (ONNX + TorchScript), parity-checked against eager PyTorch."""
    from repository.graphs import ExportError
    from training.export import export_run
    from training.image2image.export import export_i2i_run, is_i2i_run
    from training.latent.directions import directions_for_run

    from training.run_eval import RunError

    from repository.cli import export_progress

    format_list = [f.strip() for f in formats.split(",") if f.strip()]
    replacing = (repository / name / str(version)).is_dir()
    export_progress()
    try:
        if is_i2i_run(run_dir):
            if checkpoint == "best" and not (run_dir / "checkpoints" / "best.safetensors").exists():
                console.print(f"{run_dir} has no best checkpoint (trained before image-to-image runs kept one): exporting last")
                checkpoint = "last"
            entry = export_i2i_run(run_dir, name, version, repository, format_list, checkpoint)
        else:
            directions = directions_for_run(run_dir, checkpoint)
            entry = export_run(run_dir, name, version, repository, format_list, checkpoint, directions=directions)
    except ExportError as error:
        console.print(f"[red]export failed:[/] {error}")
        raise typer.Exit(1)
    except (RunError, FileNotFoundError) as error:  # a checkpoint the run lacks or this kind of run has not
        raise stop("export", str(error))
    if replacing:  # (the entry is swapped whole; a server polling the repository reloads it)
        console.print(f"[yellow]replaced[/] the entry that was at {entry}")
    spec = json.loads((entry / "spec.json").read_text())
    for fmt, info in spec["formats"].items():
        parity = f"parity max abs error {info['parity_max_abs_error']:.2e}" if "parity_max_abs_error" in info else "the reference the others are checked against"
        console.print(f"{fmt:12s} {info['file']:20s} {parity}")
    console.print(f"wrote [bold]{entry}[/]")


def print_metrics(title: str, metrics: dict, best: dict | None = None) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key != "step":
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    if best:
        judge = f" (judge: {best['judge']})" if best.get("judge") else ""
        console.print(f"best {best.get('metric')} = {best.get('value'):.4g} at step {best.get('step')}{judge}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("sample")(sample_command)
    app.command("train-classifier")(train_classifier_command)
    app.command("train-shapes-predictor")(train_shapes_predictor_command)
    app.command("results")(results_command)
    app.command("export")(export_command)
