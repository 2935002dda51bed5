"""What every importer shares: its result, its error, and reading a torch.save archive safely."""
from __future__ import annotations

import argparse
import io
import math
import pickle
import re
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from models.spec import ModelSpec
from repository.importers.pickle_scan import PickleRefused, check_archive


class CheckpointError(ValueError):
    """The checkpoint cannot be imported: wrong kind of network, unsupported options, or tensors
    that contradict its configuration."""


@dataclass
class ImportedGenerator:
    generator: nn.Module
    spec: ModelSpec  # what `models.zoo` needs to rebuild it (recorded in spec.json)
    hyperparameters: dict  # the original configuration, as the checkpoint states it (or as inferred)


# bounds on what a checkpoint's configuration may ask to be built: a 300 KB file once asked for a
# billion class names, 10^8 mapping layers or a million convolutions (a hostile probe, 2026-12-02)
MAX_CLASSES = 100_000
MAX_CONFIG_VALUES = 100_000  # values in a configuration, nested containers included
MAX_CONFIG_DEPTH = 32


def plain(value, budget: list[int] | None = None, depth: int = 0, seen: frozenset[int] = frozenset()):
    """Configuration values as JSON-able ones (numpy scalars, tuples, namespaces and easy-dicts
    included), refusing a configuration deeper than MAX_CONFIG_DEPTH, with more than
    MAX_CONFIG_VALUES values (a list that holds itself, or one list shared 40 levels deep, once
    expanded to 2^40), or that contains itself."""
    budget = [MAX_CONFIG_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_CONFIG_DEPTH:
        raise CheckpointError(f"the checkpoint's configuration is over {MAX_CONFIG_VALUES} values or {MAX_CONFIG_DEPTH} levels deep")
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, (dict, list, tuple)):
        if id(value) in seen:
            raise CheckpointError("the checkpoint's configuration contains itself")
        inner = seen | {id(value)}
        if isinstance(value, dict):
            return {str(k): plain(v, budget, depth + 1, inner) for k, v in value.items()}
        return [plain(v, budget, depth + 1, inner) for v in value]
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        return value.item()
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def bounded(name: str, value: object, low: int, high: int) -> int:
    """An integer of a checkpoint's configuration, within [low, high] before anything is built on it."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value))
            or value != int(value) or not low <= int(value) <= high):
        raise CheckpointError(f"{name} is {str(value)[:40]}: an import takes {low}…{high}")
    return int(value)


BUILD_VALUES_PER_FILE_VALUE = 2  # a network built from a file holds at most this many values per value the file gives it
BUILD_SLACK_VALUES = 1 << 20  # plus this many (filters and constants a network makes itself)
BUILD_TENSORS_PER_FILE_TENSOR = 2  # and registers at most this many parameters and buffers per tensor of the file
BUILD_SLACK_TENSORS = 1000  # plus this many (buffers a network computes itself)


def tensor_values(tensors: dict, seen: set[int] | None = None, storages: set[tuple[int, int]] | None = None) -> int:
    """How many values a state dict's tensors give, those of dicts within it included (a
    checkpoint may wrap its weights as `params_ema`); its other entries give none. Counted by
    storage, once each: every tensor of a 788 KB ESRGAN was a view of one storage of 110,592
    values, summed per key to 72 M, and a network of that size was built from it (a probe)."""
    seen = set() if seen is None else seen
    storages = set() if storages is None else storages
    if id(tensors) in seen:
        return 0
    seen.add(id(tensors))
    total = 0
    for value in tensors.values():
        if isinstance(value, dict):
            total += tensor_values(value, seen, storages)
        elif isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if (key := (storage.data_ptr(), storage.nbytes())) not in storages:
                storages.add(key)
                total += storage.nbytes() // value.element_size()
    return total


def tensor_count(tensors: dict, seen: set[int] | None = None) -> int:
    """How many tensors a state dict holds, those of dicts within it included."""
    seen = set() if seen is None else seen
    if id(tensors) in seen:
        return 0
    seen.add(id(tensors))
    return sum(1 if isinstance(value, torch.Tensor) else tensor_count(value, seen) if isinstance(value, dict) else 0 for value in tensors.values())


def network_values(network: nn.Module) -> int:
    return sum(t.numel() for t in (*network.parameters(), *network.buffers()))


def built_within(build: Callable[[], nn.Module], file_values: int) -> nn.Module:
    """`build()`, once the same build on the meta device (shapes, no memory) holds no more than
    the file's values can fill (BUILD_VALUES_PER_FILE_VALUE of them, plus BUILD_SLACK_VALUES).
    Each size a configuration gives is bounded, but not their product: a 406-byte NVlabs pickle
    asked for a 12 GB network and a 12 KB BigGAN folder for 31 GB, built (and every page written
    by the initialiser) before any tensor was compared (a hostile probe, 2026-12-07)."""
    with torch.device("meta"):
        probe = build()
    check_fills(network_values(probe), file_values, "its configuration")
    return build()


@contextmanager
def weights_within(state: dict, what: str, on_meta: bool = False) -> Iterator[None]:
    """While open, the parameters and buffers modules register are counted, and the registration
    that takes a build past what `state` can fill (`build_values_allowed` values, or
    `build_tensors_allowed` tensors: a strict load needs a tensor of the file for each) is refused
    with a `CheckpointError` naming `what`, before anything more is built. RCAN reads its depth off
    numbered keys: 14.7 KB of one-value tensors built 64 x 100 residual blocks (2.8 GB, 18 s)
    before the load named the missing ones, and 101 KB of SwinIR keys built 10,000 Swin blocks
    (157 s) on the meta device (a probe).

    With `on_meta`, each is made on the meta device (its shape, no memory) and every other tensor
    stays where it was made: `torch.device("meta")` makes every tensor meta, and the Swin family's
    constructors read numbers off tensors they make (drop-path rates, `torch.linspace(...)[i].item()`),
    which meta tensors lack (under it HAT, DRCT, RGT, SCUNet, Uformer, GRL and MoSR could not be
    tried, and were built for real). A parameter is made by its module (`torch.empty`: address
    space, no pages written) before it is registered here.

    Patches `nn.Module`'s two registration methods for the duration: imports run in the CLI, on one thread."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer
    max_values, max_tensors = build_values_allowed(tensor_values(state)), build_tensors_allowed(tensor_count(state))
    built = {"values": 0, "tensors": 0}

    def counted(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        built["values"] += tensor.numel()
        built["tensors"] += 1
        if built["values"] > max_values or built["tensors"] > max_tensors:
            raise CheckpointError(f"{what} builds more than {max_values:,} values or {max_tensors:,} tensors, and the file holds "
                                  f"{tensor_values(state):,} values in {tensor_count(state):,} tensors: an import builds only what the file's tensors can fill")
        return tensor if not on_meta or tensor.device.type == "meta" else torch.empty_like(tensor, device="meta")

    def parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and type(param) is nn.Parameter:  # (lazy modules' uninitialised ones kept as they are)
            param = nn.Parameter(counted(param), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, counted(tensor), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


class TensorsWithin(TorchDispatchMode):
    """While open, an operation that would make a tensor of more than `max_values` values (its
    storage: a broadcast view costs nothing) is refused before it runs, as a `CheckpointError`
    naming `what`. Each operation is first run on meta copies of its arguments, which tells the
    size without allocating; one without a meta kernel runs unchecked.

    Why: constructors compute buffers from sizes read off a file's shapes. HAT's window side is
    the square root of one tensor's first dimension, and its constructor computes a [side²,
    side²] index table from it: a 2.8 MB file with a [9216, 1] tensor there had the dry run make
    3.4 GB (side 96; side 256 asks for ~70 GB), before any shape was compared."""

    def __init__(self, max_values: int, what: str) -> None:
        super().__init__()
        self.max_values, self.what = max_values, what

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for made in made_on_meta(func, args, kwargs):
            values = made.untyped_storage().nbytes() // max(1, made.element_size())
            if values > self.max_values:
                raise CheckpointError(f"{self.what} makes a tensor of {values:,} values ({func.__name__.split('.')[0]} of "
                                      f"{list(made.shape)[:6]}), more than the {self.max_values:,} the file's tensors allow")
        return func(*args, **kwargs)


def made_on_meta(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors `func` returns when run on meta copies of its tensor arguments (and on the meta
    device where it takes one): their shapes and storages, nothing allocated. [] where it cannot
    be run so (no meta kernel, or its result depends on values)."""
    def meta(value):
        return value.to("meta") if isinstance(value, torch.Tensor) and value.device.type != "meta" else value

    if any(argument.name == "device" for argument in func._schema.arguments):
        kwargs = {**kwargs, "device": torch.device("meta")}
    try:
        result = func(*tree_map(meta, args), **tree_map(meta, kwargs))
    except Exception:  # noqa: BLE001 (any failure only means the size is not known beforehand)
        return []
    return [value for value in tree_flatten(result)[0] if isinstance(value, torch.Tensor)]


def build_values_allowed(file_values: int) -> int:
    """The most values a network built from a file of `file_values` may hold (`check_fills`)."""
    return BUILD_VALUES_PER_FILE_VALUE * file_values + BUILD_SLACK_VALUES


def build_tensors_allowed(file_tensors: int) -> int:
    """The most parameters and buffers a network built from a file of `file_tensors` tensors may register."""
    return BUILD_TENSORS_PER_FILE_TENSOR * file_tensors + BUILD_SLACK_TENSORS


def check_fills(wanted: int, file_values: int, what: str) -> None:
    """A network of `wanted` values (built on the meta device from `what`) is one the file's values can fill."""
    if wanted > build_values_allowed(file_values):
        raise CheckpointError(f"{what} builds a network of {wanted:,} values, and the file holds {file_values:,}: "
                              "an import builds only what the file's tensors can fill")


def check_tensor(name: str, tensor: torch.Tensor) -> None:
    """A tensor is no larger than the storage it was saved with: a zero stride repeats one value
    (a 295 KB file once declared a 2.5 GB tensor), and the pickle path could even grow a storage
    past its saved bytes (the heap's leftovers exported as weights)."""
    if tensor.numel() and tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
        raise CheckpointError(f"{name} is {list(tensor.shape)} over a storage of {tensor.untyped_storage().nbytes()} bytes: "
                              "tensors that repeat or invent values are not imported")
    if not tensor.numel() and any(tensor.shape):
        # importers (and spandrel) read widths off shapes: a [8000, 0, 3, 3] tensor costs nothing in
        # a 2.8 KB file and built convolutions of 8000 channels (gigabytes) before any compare
        raise CheckpointError(f"{name} is {list(tensor.shape)[:8]}, empty but sized: an import reads a network's widths from its "
                              "tensors' shapes, so empty tensors with sizes are refused")


def check_tensors(value, path: str = "the checkpoint", seen: set[int] | None = None) -> None:
    """Every tensor in a loaded checkpoint (nested dicts and lists) passes `check_tensor`, and
    every dict of tensors `check_numbering`. Each container is walked once: a list shared twice
    at each of 60 levels (2.7 KB) was walked 2^60 times."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        check_tensor(path[:200], value)
    elif isinstance(value, (dict, list, tuple)):
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, dict):
            check_numbering([str(key)[:200] for key, item in value.items() if isinstance(item, torch.Tensor)])
            for key, item in value.items():
                check_tensors(item, str(key)[:200], seen)
        else:
            for index, item in enumerate(value):
                check_tensors(item, f"{path[:200]}[{index}]", seen)


def check_numbering(names: list[str]) -> None:
    """Numbered layers (`body.0`, `style.1`, …) are numbered densely: importers and spandrel take a
    network's depth from its highest number, so `body.2000000` in a 118 KB file once asked for a
    million convolutions. Gaps of non-parameter layers (activations, norms) stay well inside."""
    numbers: dict[str, set[int]] = defaultdict(set)
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if re.fullmatch(r"\d{1,18}", part):
                numbers[".".join(parts[:i])].add(int(part))
    for prefix, found in numbers.items():
        if max(found) > 4 * len(found) + 16:
            raise CheckpointError(f"{prefix or 'the top level'} has layers numbered up to {max(found)} but only {len(found)} of them: "
                                  "a network's depth is read from its highest number, so an import refuses such gaps")


def refused_global(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, by name. Its message begins by advising a
    load with `weights_only=False` (code execution, for a file from anyone), which an import
    never does, so only the refused global is quoted."""
    named = re.search(r"GLOBAL ([\w.]{1,200})", str(error))
    return f"it calls {named.group(1)}" if named else "torch's weights-only reader refused its pickle"


def load_torch_archive(data: bytes) -> dict:
    """A torch.save archive read with `weights_only=True` (tensors, containers, numbers; plus
    argparse.Namespace, which training scripts save their options in); anything else is refused."""
    try:
        check_archive(data, "the archive")  # its expansion and its pickle's shape (pickle_scan.py), before torch reads it
    except PickleRefused as error:
        raise CheckpointError(str(error).replace("the archive is not", "the file is not")) from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"the archive holds objects an import never loads ({refused_global(error)}); "
                              "an import reads tensors, containers and numbers only") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"the archive is damaged or truncated ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"the archive holds a {type(loaded).__name__}, not a dict of weights")
    check_tensors(loaded)
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
    """Loads `tensors` after checking each shape against the generator's own and each value for
    NaN and infinity; every parameter and buffer must be given, except those `rebuilt(name)` says
    the generator makes itself."""
    expected = generator.state_dict()
    for name, tensor in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{name} has no place in the rebuilt generator")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{name} is {list(tensor.shape)} in the checkpoint, but its configuration gives {list(expected[name].shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():  # else found only by the parity check, after the export
            raise CheckpointError(f"{name} holds NaN or infinity: the checkpoint is broken")
    missing = [name for name in expected if name not in tensors and not rebuilt(name)]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {missing[:5]}")
    generator.load_state_dict(tensors, strict=False)
