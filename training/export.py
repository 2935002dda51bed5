"""Turns a training run into a self-describing model-repository entry:

    <repository>/<name>/<version>/
        model.onnx          ONNX (opset 17, dynamic batch axis)
        model.pt            TorchScript
        model.safetensors   generator weights, for the eager runtime
        spec.json           everything a runtime and a client need (see DESIGN.md)
        metrics.json        the run's metrics
        samples.png         a grid from fixed seeds

Every format is checked against eager PyTorch on 16 fixed seeds; an export whose max abs
error exceeds the tolerance fails with a clear message and leaves no entry behind.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from models.latent import RANGE_NAMES, named_layers
from models.spec import ModelSpec
from training.images import save_grid
from training.run_eval import load_generator
from training.sampling import balanced_labels, latents

FORMATS = ("onnx", "torchscript")
PARITY_SEEDS = list(range(16))
PARITY_TOLERANCE = 1e-4
OPSET = 17
MAX_BATCH = 4096


class ExportError(RuntimeError):
    """Export could not produce a faithful entry (parity failed, or a format is unknown)."""


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: list[int]  # -1 is the dynamic batch axis

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.dtype, "shape": self.shape}


def io_specs(spec: ModelSpec) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of the main graph: the generator, or a style model's synthesis network."""
    if spec.kind == "style":
        return [TensorSpec("ws", "float32", [-1, spec.num_ws, spec.w_dim])], [TensorSpec("image", "float32", [-1, spec.channels, spec.resolution, spec.resolution])]
    inputs = [TensorSpec("z", "float32", [-1, spec.z_dim])]
    if spec.kind == "conditional":
        inputs.append(TensorSpec("label", "int64", [-1]))
    output_shape = [-1, spec.channels, spec.resolution, spec.resolution] if spec.is_image else [-1, spec.out_dim]
    return inputs, [TensorSpec("image" if spec.is_image else "sample", "float32", output_shape)]


def example_inputs(spec: ModelSpec, seeds: list[int]) -> tuple[torch.Tensor, ...]:
    """The parity inputs: one latent per seed drawn exactly as the service draws it."""
    z = torch.cat([latents(spec, 1, seed) for seed in seeds])
    labels = balanced_labels(spec, len(seeds))
    return (z,) if labels is None else (z, labels)


@dataclass
class Graph:
    """One exported network: `model.*` is the main graph the service batches, `mapping.*` a
    style model's z → w network."""

    stem: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]  # 16 parity inputs
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    size_multiple: int = 1  # image-to-image graphs: height and width must be multiples of this
    other_sizes: tuple[tuple[torch.Tensor, ...], ...] = ()  # parity inputs at other heights/widths


def dynamic_shapes(inputs: list[TensorSpec], size_multiple: int) -> tuple[dict, ...]:
    """torch.export dims for each -1 axis: batch on axis 0, height/width on axes 2/3 (as
    multiples of `size_multiple` when the network halves the image)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if size_multiple > 1:
        height = size_multiple * torch.export.Dim("height_blocks", min=1, max=8192 // size_multiple)
        width = size_multiple * torch.export.Dim("width_blocks", min=1, max=8192 // size_multiple)
    else:
        height, width = torch.export.Dim("height", min=2, max=8192), torch.export.Dim("width", min=2, max=8192)
    named = {0: batch, 2: height, 3: width}
    return tuple({axis: named[axis] for axis, size in enumerate(t.shape) if size == -1} for t in inputs)


def graphs_for(generator: nn.Module, spec: ModelSpec) -> list[Graph]:
    z_example = example_inputs(spec, PARITY_SEEDS)
    inputs, outputs = io_specs(spec)
    if spec.kind != "style":
        return [Graph("model", generator, z_example, inputs, outputs)]
    with torch.no_grad():
        w = generator.mapping(*z_example)
    ws = w[:, None, :].expand(-1, spec.num_ws, -1).contiguous()
    mapping_io = ([TensorSpec("z", "float32", [-1, spec.z_dim])], [TensorSpec("w", "float32", [-1, spec.w_dim])])
    return [Graph("model", generator.synthesis, (ws,), inputs, outputs), Graph("mapping", generator.mapping, z_example, *mapping_io)]


def export_torchscript(generator: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(generator, example, check_trace=False)
    traced.save(str(path))


def export_onnx(generator: nn.Module, example: tuple[torch.Tensor, ...], inputs: list[TensorSpec], outputs: list[TensorSpec], path: Path,
                size_multiple: int = 1) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            generator, example, str(path), input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
            opset_version=OPSET, dynamo=True, external_data=False, dynamic_shapes=dynamic_shapes(inputs, size_multiple),
            verbose=False,
        )


def onnx_outputs(path: Path, example: tuple[torch.Tensor, ...], inputs: list[TensorSpec]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {t.name: x.numpy() for t, x in zip(inputs, example)})[0]


def parity_errors(graph: Graph, entry: Path, formats: list[str]) -> dict[str, float]:
    """Max abs error of each exported format against eager PyTorch on the 16 parity inputs.

    The batch is split 1 + 15 for the exported graphs, so a graph that only works at the batch
    size it was traced with fails here rather than in the service."""
    with torch.no_grad():
        reference = graph.module(*graph.example).numpy()
    errors: dict[str, float] = {}
    parts = [tuple(x[:1] for x in graph.example), tuple(x[1:] for x in graph.example)]
    if "torchscript" in formats:
        scripted = torch.jit.load(str(entry / f"{graph.stem}.pt"))
        with torch.no_grad():
            got = np.concatenate([scripted(*part).numpy() for part in parts])
        errors["torchscript"] = float(np.abs(got - reference).max())
    if "onnx" in formats:
        got = np.concatenate([onnx_outputs(entry / f"{graph.stem}.onnx", part, graph.inputs) for part in parts])
        errors["onnx"] = float(np.abs(got - reference).max())
    for other in graph.other_sizes:  # the dynamic height/width axes, at sizes the trace never saw
        with torch.no_grad():
            expected = graph.module(*other).numpy()
        if "torchscript" in formats:
            with torch.no_grad():
                got = scripted(*other).numpy()
            errors["torchscript"] = max(errors["torchscript"], float(np.abs(got - expected).max()))
        if "onnx" in formats:
            got = onnx_outputs(entry / f"{graph.stem}.onnx", other, graph.inputs)
            errors["onnx"] = max(errors["onnx"], float(np.abs(got - expected).max()))
    return errors


def export_graph(graph: Graph, staging: Path, formats: list[str], tolerance: float) -> dict:
    """Writes the graph in each format, checks parity; returns its spec block."""
    example = tuple(x[:2] for x in graph.example)
    if "torchscript" in formats:
        export_torchscript(graph.module, example, staging / f"{graph.stem}.pt")
    if "onnx" in formats:
        export_onnx(graph.module, example, graph.inputs, graph.outputs, staging / f"{graph.stem}.onnx", graph.size_multiple)
    parity = parity_errors(graph, staging, formats)
    failed = {fmt: err for fmt, err in parity.items() if not err <= tolerance}
    if failed:
        raise ExportError(f"parity check failed for {graph.stem}: max abs error {failed} exceeds {tolerance} against eager PyTorch on 16 seeds")
    files = {"onnx": f"{graph.stem}.onnx", "torchscript": f"{graph.stem}.pt"}
    return {
        "inputs": [t.to_dict() for t in graph.inputs],
        "outputs": [t.to_dict() for t in graph.outputs],
        "formats": {fmt: {"file": files[fmt], "parity_max_abs_error": parity[fmt]} for fmt in formats},
    }


def entry_spec(spec: ModelSpec, name: str, version: int, run_dir: Path, cfg_dump: dict, blocks: dict[str, dict], latent_names: list[str]) -> dict:
    run_spec = json.loads((run_dir / "spec.json").read_text()) if (run_dir / "spec.json").exists() else {}
    main = blocks["model"]
    entry = {
        "name": name,
        "version": version,
        "kind": spec.kind,
        "arch": spec.arch,
        "resolution": spec.resolution,
        "channels": spec.channels,
        "value_range": list(spec.value_range),
        "z_dim": spec.z_dim,
        "w_dim": spec.w_dim or None,
        "num_ws": spec.num_ws or None,
        "class_names": spec.class_names,
        "inputs": main["inputs"],
        "outputs": main["outputs"],
        "formats": main["formats"] | {"eager": {"file": "model.safetensors", "parity_max_abs_error": 0.0}},
        "model": spec.to_dict(),
        "training": {"config": cfg_dump, "step": run_spec.get("step"), "checkpoint_sha256": run_spec.get("checkpoint_sha256"), "run_dir": str(run_dir)},
        "metrics_file": "metrics.json",
        "parity": {"seeds": PARITY_SEEDS, "tolerance": PARITY_TOLERANCE},
    }
    if spec.kind == "style":
        entry["mapping"] = blocks["mapping"]
        entry["latents_file"] = "latents.safetensors"
        entry["directions"] = [n.removeprefix("direction.") for n in latent_names if n.startswith("direction.")]
        entry["layer_ranges"] = {r: named_layers(r, spec.num_ws) for r in RANGE_NAMES}
    return entry


def style_latents(generator: nn.Module, spec: ModelSpec, directions: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """w_avg and the named edit directions, for truncation and editing on the server."""
    tensors = {"w_avg": generator.w_avg.detach().clone().contiguous()}
    for direction_name, vector in (directions or {}).items():
        tensors[f"direction.{direction_name}"] = vector.float().contiguous()
    return tensors


def ship_feature_network(spec: ModelSpec, cfg, staging: Path) -> dict | None:
    """Style models of 32 px shapes carry the shapes predictor, whose features the service's
    projection uses as its perceptual loss (the service never imports training code)."""
    from training.metrics.shapes_features import PREDICTOR_PATH

    if spec.kind != "style" or cfg.data.name != "shapes" or cfg.data.resolution != 32 or not PREDICTOR_PATH.exists():
        return None
    shutil.copy(PREDICTOR_PATH, staging / "features.safetensors")
    return {"name": "shapes_predictor", "file": "features.safetensors"}


def export_run(run_dir: Path, name: str, version: int, repository: Path, formats: list[str], checkpoint: str = "best",
               tolerance: float = PARITY_TOLERANCE, directions: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes `repository/name/version/`; returns its path. Raises ExportError on parity failure."""
    check_export_request(formats, version)
    generator, spec, cfg = load_generator(run_dir, checkpoint)
    generator = generator.float().cpu().eval()

    def fill(staging: Path) -> None:
        save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(staging / "model.safetensors"))
        blocks = {graph.stem: export_graph(graph, staging, formats, tolerance) for graph in graphs_for(generator, spec)}
        latent_tensors = style_latents(generator, spec, directions) if spec.kind == "style" else {}
        if latent_tensors:
            save_file(latent_tensors, str(staging / "latents.safetensors"))
        feature_network = ship_feature_network(spec, cfg, staging)
        entry = entry_spec(spec, name, version, run_dir, cfg.model_dump(), blocks, sorted(latent_tensors))
        if feature_network:
            entry["feature_network"] = feature_network
        (staging / "spec.json").write_text(json.dumps(entry, indent=2))
        metrics = run_dir / "metrics.json"
        (staging / "metrics.json").write_text(metrics.read_text() if metrics.exists() else "{}")
        if spec.is_image:
            z, *labels = example_inputs(spec, list(range(64 if spec.kind != "conditional" else 10 * spec.num_classes)))
            with torch.no_grad():
                save_grid(generator(z, *labels), staging / "samples.png", nrow=spec.num_classes if spec.kind == "conditional" else 8)

    return write_entry(repository, name, version, fill)


def check_export_request(formats: list[str], version: int) -> None:
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ExportError(f"unknown formats {sorted(unknown)}: choose from {FORMATS}")
    if version < 1:
        raise ExportError("versions start at 1")


def write_entry(repository: Path, name: str, version: int, fill) -> Path:
    """Builds `repository/name/version/` in a staging folder with `fill(staging)` and moves it in
    whole: a failed export (parity, a crash) leaves no entry behind and the old one untouched."""
    target = repository / name / str(version)
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=repository))
    try:
        fill(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; an entry is meant to be shared
        for file in staging.iterdir():
            file.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)  # the entry appears whole or not at all
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
