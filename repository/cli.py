"""The repository-side verb of `ganserve`: import (foreign checkpoints → entries)."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
FORMATS = ("auto", "nvlabs", "rosinality", "biggan", "junyanz", "superres")


def shown(text: object) -> str:
    """An error's text as the terminal should show it: it may quote names from the file, so rich's
    markup in it is escaped (a tensor named `[/x].100` raised a MarkupError, a traceback) and
    control characters are replaced (an ESC in a name reached the terminal: its title, a clear)."""
    return escape("".join(c if c.isprintable() else "?" for c in str(text)))


def detect_format(path: Path, data: bytes) -> str:
    """biggan for a folder (or its weights file) with BigGAN's config.json, nvlabs for a network
    pickle, rosinality for another torch.save archive."""
    from repository.importers.biggan import is_biggan

    if is_biggan(path):
        return "biggan"
    if path.suffix == ".safetensors":
        return "superres"
    if data[:1] == b"\x80":
        return "nvlabs"
    if data[:2] == b"PK":
        from repository.importers.checkpoint import CheckpointError, load_torch_archive
        from repository.importers.junyanz import is_junyanz
        from repository.importers.rosinality import is_rosinality

        try:
            archive = load_torch_archive(data)  # loaded once to tell the three apart
        except CheckpointError:
            return "superres"  # its importer reports the damage
        return "junyanz" if is_junyanz(archive) else "rosinality" if is_rosinality(archive) else "superres"
    raise ValueError("the file is neither a network pickle, a torch.save archive nor a safetensors file")


def parse_options(text: str) -> dict[str, str]:
    """`key=value,key=value` → dict; a malformed pair is a one-line error."""
    options = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--options takes key=value pairs separated by commas, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def weights_file(path: Path) -> Path:
    """The file whose bytes are hashed and sniffed: the path itself, or a BigGAN folder's weights."""
    from repository.importers.biggan import checkpoint_files

    return checkpoint_files(path)[1] if path.is_dir() else path


def import_command(
    path: Path = typer.Argument(..., exists=True, help="a checkpoint: an NVlabs StyleGAN2-ADA/StyleGAN3 network pickle (*.pkl), a rosinality "
                                "stylegan2-pytorch *.pt, a pytorch-pretrained-biggan folder (config.json + pytorch_model.bin), or a pix2pix/CycleGAN "
                                "generator state dict (latest_net_G.pth), or a super-resolution state dict (*.pth, *.safetensors: ESRGAN, Real-ESRGAN, "
                                "SRVGGNetCompact, SPAN, … as spandrel detects them)"),
    name: str = typer.Option(..., "--name", help="model name in the repository"),
    version: int = typer.Option(1, "--version", min=1),
    format: str = typer.Option("auto", "--format", help="auto, nvlabs, rosinality, biggan, junyanz or superres"),
    repository: Path = typer.Option(Path("model_repository"), "--repository"),
    formats: str = typer.Option("onnx,torchscript", "--formats", help="comma-separated: onnx, torchscript"),
    noise_mode: str = typer.Option("const", "--noise-mode", help="const (each layer's fixed noise: a seed fixes an image) or none"),
    class_names: Path | None = typer.Option(None, "--class-names", exists=True, dir_okay=False,
                                            help="BigGAN: a text file of class names, one per line (default: ImageNet's for 1000 classes, else indices)"),
    options: str = typer.Option("", "--options", help="pix2pix/CycleGAN: what the state dict cannot say, as key=value pairs: direction=AtoB|BtoA, "
                                "domains=horse:zebra, train_resolution=256; and any inferred value to check (generator, ngf, n_blocks, num_downs, norm)"),
    replace: bool = typer.Option(False, "--replace", help="write over an entry already at --name/--version (refused without it)"),
) -> None:
    """Import a published checkpoint: rebuild it with the project's own networks, export it with parity, write an entry."""
    from repository.entries import check_entry_name
    from repository.graphs import ExportError
    from repository.conditional_entry import write_conditional_entry
    from repository.importers.biggan import import_biggan
    from repository.importers.checkpoint import CheckpointError
    from repository.importers.nvlabs import import_nvlabs
    from repository.importers.rosinality import import_rosinality
    from repository.style_entry import write_style_entry

    if format not in FORMATS:
        console.print(f"[red]import failed:[/] unknown format {format!r}: choose from {FORMATS}", soft_wrap=True)
        raise typer.Exit(2)
    try:
        check_entry_name(name)
    except (ValueError, ExportError) as error:
        console.print("[red]import failed:[/] " + shown(error), soft_wrap=True)
        raise typer.Exit(1)
    existing = repository / name / str(version)
    if existing.exists() and not replace:  # (checked first: an import can take minutes)
        console.print(f"[red]import failed:[/] {existing} already holds {entry_kind(existing)}: choose another --version, "
                      "or --replace it (a server polling the repository would swap it in)", soft_wrap=True)
        raise typer.Exit(2)
    export_progress()
    try:
        data = weights_file(path).read_bytes()
        detected = detect_format(path, data) if format == "auto" else format
        if detected in ("junyanz", "superres"):
            entry = import_image_model(detected, path, data, name, version, repository, [f.strip() for f in formats.split(",") if f.strip()],
                                       parse_options(options))
            report(entry)
            return
        with console.status(f"reading {path.name} ({detected})"):
            if detected == "biggan":
                imported = import_biggan(path, data, class_names)
            else:
                imported = (import_nvlabs if detected == "nvlabs" else import_rosinality)(data, noise_mode)
        source = {"format": detected, "network": imported.spec.arch, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
                  "hyperparameters": imported.hyperparameters}
        write = write_conditional_entry if detected == "biggan" else write_style_entry
        with console.status(f"exporting {imported.spec.resolution}² {imported.spec.arch} ({sum(p.numel() for p in imported.generator.parameters()) / 1e6:.1f} M parameters)"):
            entry = write(imported.generator, imported.spec, name, version, repository, [f.strip() for f in formats.split(",") if f.strip()], source)
    except (ValueError, OSError, CheckpointError, ExportError) as error:
        console.print("[red]import failed:[/] " + shown(error), soft_wrap=True)
        raise typer.Exit(1)
    except (MemoryError, RecursionError) as error:
        console.print(f"[red]import failed:[/] the checkpoint asks for more than this machine can build ({type(error).__name__})", soft_wrap=True)
        raise typer.Exit(1)
    except Exception as error:  # a checkpoint is hostile input: a malformed one gets one line, not a traceback
        console.print("[red]import failed:[/] " + shown(f"the checkpoint is malformed ({type(error).__name__}: {str(error)[:200]})"), soft_wrap=True)
        raise typer.Exit(1)
    report(entry)


def import_image_model(detected: str, path: Path, data: bytes, name: str, version: int, repository: Path, formats: list[str],
                       options: dict[str, str]) -> Path:
    """pix2pix/CycleGAN (junyanz) or super-resolution (spandrel) → an image-to-image entry."""
    from repository.graphs import progress
    from repository.image_entry import sample_pair, write_image_entry
    from repository.importers.junyanz import import_junyanz, translation_fields
    from repository.importers.superres import import_superres

    with console.status(f"reading {path.name} ({detected})"):
        if detected == "junyanz":
            generator, params = import_junyanz(data)
            fields, hyperparameters = translation_fields(params, options), {"inferred": params, "options": options}
        else:
            if options:
                raise ValueError("--options are for pix2pix/CycleGAN checkpoints; spandrel reads a super-resolution model's layout itself")
            generator, fields = import_superres(path, data)
            hyperparameters = {"inferred": fields["model"] | {"scale": fields["scale"], "size_requirements": fields["size_requirements"]}}
    source = {"source": {"format": detected, "network": fields["arch"], "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
                         "hyperparameters": hyperparameters}}
    progress.info("samples: the photo in and its output, for samples.png")
    samples = sample_pair(generator, fields)
    with console.status(f"exporting {fields['arch']} ({sum(p.numel() for p in generator.parameters()) / 1e6:.1f} M parameters)"):
        return write_image_entry(generator, fields, name, version, repository, formats, source, samples=samples)


def entry_kind(entry: Path) -> str:
    """What an entry folder holds, for a message ("a 'translation' entry")."""
    try:
        return f"a {json.loads((entry / 'spec.json').read_text())['kind']!r} entry"
    except (OSError, ValueError, KeyError, TypeError):
        return "an entry"


def export_progress() -> None:
    """Shows each step of an export as it starts, one timed line each, through the console the
    spinner uses: a StyleGAN3 import ran 15 minutes with nothing but torch's warnings to show,
    and a spinner is not seen in a log file."""
    from rich.logging import RichHandler

    from repository.graphs import progress

    if not progress.handlers:
        progress.addHandler(RichHandler(console=console, show_path=False, show_level=False, omit_repeated_times=False))
        progress.setLevel(logging.INFO)
        progress.propagate = False


def report(entry: Path) -> None:
    spec = json.loads((entry / "spec.json").read_text())
    for graph, block in (("synthesis" if "mapping" in spec else "generator", spec), *((("mapping", spec["mapping"]),) if "mapping" in spec else ())):
        for fmt, info in block["formats"].items():
            if fmt != "eager":
                exact = (f" (float64: {info['float64_max_abs_error']:.2e}, eager float32 {info['eager_float64_max_abs_error']:.2e})"
                         if "float64_max_abs_error" in info else "")
                console.print(f"{graph:10s} {fmt:12s} {info['file']:14s} parity max abs error {info['parity_max_abs_error']:.2e}{exact}")
    took = spec["source"].get("imported_seconds")
    console.print(f"wrote [bold]{entry}[/]" + (f" ({took:.1f} s)" if took is not None else ""))


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)
