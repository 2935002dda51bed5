"""Operations turn a validated request into per-item model inputs.

Latents are drawn per item on the CPU from the item's own seed (torch's generator, as training
and export draw them), so a seed fixes its image whatever batch it lands in."""
from __future__ import annotations

import numpy as np
import torch

from service.errors import ApiError
from service.repository import ModelEntry


def latent_for_seed(seed: int, z_dim: int) -> np.ndarray:
    return torch.randn(1, z_dim, generator=torch.Generator().manual_seed(seed))[0].numpy()


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


def generate_inputs(entry: ModelEntry, seeds: list[int], label: int | None) -> list[dict[str, np.ndarray]]:
    z_dim = entry.spec["z_dim"]
    items = []
    for i, seed in enumerate(seeds):
        item = {"z": latent_for_seed(seed, z_dim)}
        if entry.kind == "conditional":
            # without a class, the images cycle through the classes in order
            item["label"] = np.array(label if label is not None else i % len(entry.class_names), dtype=np.int64)
        items.append(item)
    return items
