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


class TensorSource:
    """A checkpoint's tensors, taken by name as an importer maps them: a missing one is an error,
    and every one must have been taken by the end (`check_all_used`)."""

    def __init__(self, tensors: dict[str, torch.Tensor], what: str = "its configuration") -> None:
        self.tensors, self.what, self.used = tensors, what, set()

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"the checkpoint has no {name}, which {self.what} implies")
        self.used.add(name)
        return self.tensors[name].float()

    def ignore(self, predicate) -> None:
        """Tensors the importer knows it does not need (e.g. filter taps it rebuilds itself)."""
        self.used |= {name for name in self.tensors if predicate(name)}

    def check_all_used(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise CheckpointError(f"the checkpoint has tensors {self.what} does not use: {unused[:5]}{' …' if len(unused) > 5 else ''}")


def load_checked(generator: nn.Module, tensors: dict[str, torch.Tensor], rebuilt=lambda name: False) -> None:
    """Loads `tensors` after checking each shape against the generator's own; every parameter and
    buffer must be given, except those `rebuilt(name)` says the generator makes itself."""
    expected = generator.state_dict()
    for name, tensor in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{name} has no place in the rebuilt generator")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{name} is {list(tensor.shape)} in the checkpoint, but its configuration gives {list(expected[name].shape)}")
    missing = [name for name in expected if name not in tensors and not rebuilt(name)]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {missing[:5]}")
    generator.load_state_dict(tensors, strict=False)
