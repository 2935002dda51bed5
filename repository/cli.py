"""The repository-side verb of `ganserve`: import (foreign checkpoints → entries)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import typer
from rich.console import Console

console = Console()
FORMATS = ("auto", "nvlabs", "rosinality")


def detect_format(data: bytes) -> str:
    """nvlabs for a network pickle, rosinality for a torch.save archive."""
    if data[:1] == b"\x80":
        return "nvlabs"
    if data[:2] == b"PK":
        return "rosinality"
    raise ValueError("the file is neither a network pickle nor a torch.save archive")


def import_command(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="a checkpoint: an NVlabs StyleGAN2-ADA network pickle (*.pkl) or rosinality stylegan2-pytorch *.pt"),
    name: str = typer.Option(..., "--name", help="model name in the repository"),
    version: int = typer.Option(1, "--version", min=1),
    format: str = typer.Option("auto", "--format", help="auto, nvlabs or rosinality"),
    repository: Path = typer.Option(Path("model_repository"), "--repository"),
    formats: str = typer.Option("onnx,torchscript", "--formats", help="comma-separated: onnx, torchscript"),
    noise_mode: str = typer.Option("const", "--noise-mode", help="const (each layer's fixed noise: a seed fixes an image) or none"),
) -> None:
    """Import a published checkpoint: rebuild it with the project's own networks, export it with parity, write an entry."""
    from repository.graphs import ExportError
    from repository.importers.checkpoint import CheckpointError
    from repository.importers.nvlabs import import_nvlabs
    from repository.importers.rosinality import import_rosinality
    from repository.style_entry import write_style_entry

    if format not in FORMATS:
        console.print(f"[red]import failed:[/] unknown format {format!r}: choose from {FORMATS}", soft_wrap=True)
        raise typer.Exit(2)
    data = path.read_bytes()
    try:
        detected = detect_format(data) if format == "auto" else format
        with console.status(f"reading {path.name} ({detected})"):
            imported = (import_nvlabs if detected == "nvlabs" else import_rosinality)(data, noise_mode)
        source = {"format": detected, "network": imported.spec.arch, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
                  "hyperparameters": imported.hyperparameters}
        with console.status(f"exporting {imported.spec.resolution}² {imported.spec.arch} ({sum(p.numel() for p in imported.generator.parameters()) / 1e6:.1f} M parameters)"):
            entry = write_style_entry(imported.generator, imported.spec, name, version, repository, [f.strip() for f in formats.split(",") if f.strip()], source)
    except (ValueError, CheckpointError, ExportError) as error:
        console.print(f"[red]import failed:[/] {error}", soft_wrap=True)
        raise typer.Exit(1)
    spec = json.loads((entry / "spec.json").read_text())
    for graph, block in (("synthesis", spec), ("mapping", spec["mapping"])):
        for fmt, info in block["formats"].items():
            if fmt != "eager":
                console.print(f"{graph:10s} {fmt:12s} {info['file']:14s} parity max abs error {info['parity_max_abs_error']:.2e}")
    console.print(f"wrote [bold]{entry}[/] ({spec['source']['imported_seconds']:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)
