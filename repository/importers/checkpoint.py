"""What every importer shares: its result, its error, and reading a torch.save archive safely."""
from __future__ import annotations

import argparse
import io
import pickle
import zipfile
from dataclasses import dataclass

import torch
from torch import nn

from models.spec import ModelSpec


class CheckpointError(ValueError):
    """The checkpoint cannot be imported: wrong kind of network, unsupported options, or tensors
    that contradict its configuration."""


@dataclass
class ImportedGenerator:
    generator: nn.Module
    spec: ModelSpec  # what `models.zoo` needs to rebuild it (recorded in spec.json)
    hyperparameters: dict  # the original configuration, as the checkpoint states it (or as inferred)


def plain(value):
    """Configuration values as JSON-able ones (numpy scalars, tuples, namespaces and easy-dicts included)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        return value.item()
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def load_torch_archive(data: bytes) -> dict:
    """A torch.save archive read with `weights_only=True` (tensors, containers, numbers; plus
    argparse.Namespace, which training scripts save their options in); anything else is refused."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise CheckpointError("the archive is damaged or truncated" if data[:2] == b"PK" else "the file is not a torch.save archive")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"the archive holds objects an import never loads ({first[:200]})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"the archive is damaged or truncated ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"the archive holds a {type(loaded).__name__}, not a dict of weights")
    return loaded
