"""Operations turn a validated request into per-item model inputs.

Latents are drawn per item on the CPU from the item's own seed (torch's generator, as training
and export draw them), so a seed fixes its image whatever batch it lands in."""
from __future__ import annotations

import numpy as np

from models.biggan import truncated_latent, truncation_stats_weights
from models.latent import seed_latent
from service.errors import ApiError
from service.repository import ModelEntry


def latent_for_seed(seed: int, z_dim: int) -> np.ndarray:
    return seed_latent(z_dim, seed).numpy()


def resolve_label(entry: ModelEntry, label: int | str | None) -> int | None:
    """A class index or name → index; 422 when it is unknown or the model is unconditional."""
    if label is None:
        return None
    names = entry.class_names
    if entry.kind not in ("conditional", "style") or not names:
        raise ApiError(422, f"model {entry.name!r} is unconditional: it takes no class")
    if isinstance(label, str) and label in names:
        return names.index(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
        return label
    raise ApiError(422, f"unknown class {label!r}: use an index 0..{len(names) - 1} or one of {names}")


def resolve_truncation(entry: ModelEntry, truncation: float | None) -> float | None:
    """BigGAN's truncation for a model that has one (its default when none is asked for); 422 for
    a model that has none."""
    block = entry.spec.get("truncation")
    if block is None:
        if truncation is not None:
            raise ApiError(422, f"model {entry.name!r} has no BigGAN truncation (style models take truncation_psi)")
        return None
    return block["default"] if truncation is None else truncation


def generate_inputs(entry: ModelEntry, seeds: list[int], label: int | None, truncation: float | None = None) -> list[dict[str, np.ndarray]]:
    """Per-item inputs; with a BigGAN truncation t, z is truncated-normal times t and the item
    carries the weights of t's batch-norm statistics."""
    z_dim = entry.spec["z_dim"]
    if truncation is not None:
        stats = np.array(truncation_stats_weights(truncation, entry.spec["truncation"]["n_stats"]), dtype=np.float32)
    items = []
    for i, seed in enumerate(seeds):
        if truncation is not None:
            item = {"z": truncated_latent(seed, z_dim, truncation).numpy(), "truncation_stats": stats}
        else:
            item = {"z": latent_for_seed(seed, z_dim)}
        if entry.kind == "conditional":
            # without a class, the images cycle through the classes in order
            item["label"] = np.array(label if label is not None else i % len(entry.class_names), dtype=np.int64)
        items.append(item)
    return items
