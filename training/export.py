"""Turns a training run into a self-describing model-repository entry:

    <repository>/<name>/<version>/
        model.onnx          ONNX (opset 18, dynamic batch axis)
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
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from models.latent import RANGE_NAMES, named_layers, seed_latents
from models.spec import ModelSpec
from repository.entries import check_export_request, write_entry
from repository.graphs import EAGER_FORMAT, PARITY_SEEDS, PARITY_TOLERANCE, Graph, TensorSpec, export_graph
from training.images import save_grid
from training.run_eval import load_generator
from training.sampling import balanced_labels



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
    z = seed_latents(spec.z_dim, seeds)
    labels = balanced_labels(spec, len(seeds))
    return (z,) if labels is None else (z, labels)


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
        "formats": main["formats"] | EAGER_FORMAT,
        "half_precision": main["half_precision"],
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
        image_range = tuple(spec.value_range) if spec.is_image else None
        blocks = {graph.stem: export_graph(graph, staging, formats, tolerance, image_range if graph.stem == "model" else None)
                  for graph in graphs_for(generator, spec)}
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


