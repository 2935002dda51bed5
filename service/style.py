"""Style-model operations: every request reduces to W arithmetic on the server plus batched
calls of two shared queues, `mapping` (z → w) and `synthesis` (ws → image), so generate,
style-mix, interpolate and edit requests share synthesis batches."""
from __future__ import annotations

import numpy as np
import torch

from models import latent
from service.batcher import RequestState, run_items
from service.errors import ApiError
from service.registry import LoadedModel, ModelRegistry

MAPPING_OP, SYNTHESIS_OP = "mapping", "synthesis"


def require_style(model: LoadedModel) -> None:
    if model.entry.kind != "style":
        raise ApiError(422, f"model {model.entry.name!r} is of kind {model.entry.kind!r}: this operation needs a style model (kind 'style')")


def mapping_items(model: LoadedModel, z: np.ndarray, label: int | None) -> list[dict[str, np.ndarray]]:
    """One mapping input per row of z; a conditional model's rows take `label`, or the classes in
    turn when none is asked for (as conditional generation does)."""
    items = [{"z": row.astype(np.float32)} for row in z]
    classes = len(model.entry.class_names)
    if classes:
        for index, item in enumerate(items):
            item["label"] = np.array(label if label is not None else index % classes, dtype=np.int64)
    return items


def one_class(model: LoadedModel, label: int | None) -> int | None:
    """The latent tools (style-mix, interpolate, edit) keep one class for every image they draw:
    the one asked for, else class 0 of a conditional model."""
    return 0 if label is None and model.entry.class_names else label


async def map_z(registry: ModelRegistry, model: LoadedModel, z: np.ndarray, state: RequestState, label: int | None = None) -> np.ndarray:
    """z [N, z_dim] → w [N, w_dim] through the mapping queue."""
    outputs = await run_items(registry.batcher(model, MAPPING_OP, graph="mapping"), mapping_items(model, z, label), state)
    return np.stack(outputs)


def seed_latents(model: LoadedModel, seeds: list[int]) -> np.ndarray:
    return latent.seed_latents(model.entry.spec["z_dim"], seeds).numpy()


def truncate(model: LoadedModel, w: np.ndarray, psi: float) -> np.ndarray:
    return latent.truncate(torch.from_numpy(w), torch.from_numpy(model.latents["w_avg"]), psi).numpy()


def broadcast(model: LoadedModel, w: np.ndarray) -> np.ndarray:
    """w [N, w_dim] → ws [N, num_ws, w_dim]: the same style at every layer."""
    return np.repeat(w[:, None, :], model.entry.spec["num_ws"], axis=1).astype(np.float32)


async def synthesize(registry: ModelRegistry, model: LoadedModel, ws: np.ndarray, state: RequestState) -> np.ndarray:
    outputs = await run_items(registry.batcher(model, SYNTHESIS_OP), [{"ws": row} for row in ws.astype(np.float32)], state)
    return np.stack(outputs)


async def seeds_to_w(registry: ModelRegistry, model: LoadedModel, seeds: list[int], psi: float, state: RequestState,
                     label: int | None = None) -> np.ndarray:
    return truncate(model, await map_z(registry, model, seed_latents(model, seeds), state, label), psi)


async def seeds_to_ws(registry: ModelRegistry, model: LoadedModel, seeds: list[int], psi: float, cutoff: int | None, state: RequestState,
                      label: int | None = None) -> np.ndarray:
    """ws [N, num_ws, w_dim] for seeds, truncated by ψ at every layer, or only at the first
    `cutoff` layers (NVlabs' `truncation_cutoff`: coarse layers pulled to the average, fine detail kept)."""
    if cutoff is None:
        return broadcast(model, await seeds_to_w(registry, model, seeds, psi, state, label))
    num_ws = model.entry.spec["num_ws"]
    if cutoff > num_ws:
        raise ApiError(422, f"truncation_cutoff {cutoff} exceeds the model's {num_ws} layers")
    ws = broadcast(model, await map_z(registry, model, seed_latents(model, seeds), state, label))
    ws[:, :cutoff] = truncate(model, ws[:, :cutoff], psi)
    return ws


def layers_for(model: LoadedModel, layers: str | list[int]) -> list[int]:
    try:
        return latent.resolve_layers(layers, model.entry.spec["num_ws"])
    except ValueError as error:
        raise ApiError(422, str(error))


def direction(model: LoadedModel, name: str) -> torch.Tensor:
    key = f"direction.{name}"
    if key not in model.latents:
        raise ApiError(422, f"unknown direction {name!r}: this model has {model.entry.spec.get('directions', [])}")
    return torch.from_numpy(model.latents[key])


def check_w(model: LoadedModel, w: list[list[float]]) -> np.ndarray:
    w_dim = model.entry.spec["w_dim"]
    if (wrong := [len(row) for row in w if len(row) != w_dim]):
        raise ApiError(422, f"w must be {w_dim} values long (this model's w_dim), got {wrong[0]}")
    array = np.asarray(w, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ApiError(422, "w holds NaN or infinity")
    return array
