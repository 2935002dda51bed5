"""Super-resolution checkpoints (ESRGAN old and new layouts, Real-ESRGAN RRDBNet x4/x2,
SRVGGNetCompact, SPAN and the rest of what spandrel recognises) → a `super_resolution` entry.

spandrel detects the architecture and its hyperparameters from the state dict alone and builds the
network; the import wraps it for the project's [-1, 1] convention (`models.restoration`), records
what spandrel says about sizes (`size_multiple`, minimum, square-only), picks a tile for the
upscale endpoint that respects them, and exports with dynamic height and width. Files are read
without running code: `.safetensors`, or a torch.save archive with `weights_only=True`.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from models.entry_schema import MAX_SCALE
from models.restoration import UnitRangeNetwork, load_spandrel
from repository.importers.checkpoint import (CheckpointError, TensorsWithin, build_values_allowed, check_tensors, load_torch_archive,
                                             network_values, tensor_count, tensor_values, weights_within)

OUTPUT_TILE = 384  # output px per tile side the default aims at: 96 input px at x4 (the shipped RRDB's sweet spot on 2 cores)
MIN_TILE, MAX_TILE = 64, 192
DEFAULT_OVERLAP = 16
MAX_STATE_TENSORS = 8192  # (`read_state`)
READ_VALUES = 65_536  # a state dict's tensors up to this size stay real in the dry run (`shapes_of`)


def read_state(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """The file's state dict, of at most MAX_STATE_TENSORS tensors: spandrel's SwinIR detection
    scans every key once per numbered layer, and 20,000 one-value keys (2.9 MB) held it 48 s
    before anything was built (a probe); the largest published layouts have ~1,700 (HAT-L,
    RCAN), twice that with Real-ESRGAN's `params` beside `params_ema`."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            state = load(data)
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"the safetensors file is damaged or truncated ({str(error)[:200]})") from None
        check_tensors(state)
    else:
        state = load_torch_archive(data)
    if (count := tensor_count(state)) > MAX_STATE_TENSORS:
        raise CheckpointError(f"the file holds {count:,} tensors; a super-resolution state dict is taken with at most {MAX_STATE_TENSORS:,}")
    return state


def tile_for(scale: int, multiple: int, minimum: int) -> int:
    """The default tile per scale — about OUTPUT_TILE output px (x1, x2: 192; x3: 128; x4: 96;
    x8: 64 input px) — at least the architecture's minimum, rounded up to its multiple."""
    side = max(min(MAX_TILE, max(MIN_TILE, OUTPUT_TILE // max(1, scale))), minimum, 2 * DEFAULT_OVERLAP + multiple)
    return -(-side // multiple) * multiple


def shapes_of(value, depth: int = 0):
    """A checkpoint's tensors as meta tensors of the same shapes, its dicts (`params_ema`) alike
    (a few levels: a dict that holds itself is left to the real load to refuse). Tensors of up to
    READ_VALUES values stay as they are: DAT's, FDAT's and MoESR's detection reads numbers off
    small ones."""
    if isinstance(value, torch.Tensor):
        return value if value.numel() <= READ_VALUES else torch.empty(value.shape, dtype=value.dtype, device="meta")
    return {key: shapes_of(item, depth + 1) for key, item in value.items()} if isinstance(value, dict) and depth < 4 else value


@contextmanager
def built_from(state: dict, on_meta: bool = False) -> Iterator[None]:
    """A build of `state`'s layout bounded by what the file's tensors can fill: in all, as it
    registers its weights (`weights_within`), and for each tensor its code makes (`TensorsWithin`)."""
    with weights_within(state, "its layout", on_meta=on_meta), TensorsWithin(build_values_allowed(tensor_values(state)), "its layout"):
        yield


def check_spandrel_size(state: dict[str, torch.Tensor]) -> int | None:
    """spandrel's build of the state dict's shapes on the meta device (no memory) holds no more
    than the file's values can fill (`built_from`, counted as it registers them): it reads widths and depths
    off the shapes, so one real 864 KB first convolution made an ESRGAN of 2.3 GB a convolution,
    allocated and initialised before it found the file had none of them (a hostile probe). Where an
    architecture's build needs its weights' values (RCAN and IPT set some in their constructors),
    the real build decides alone.

    The registry's `load`, not `ModelLoader`'s: that one moves the model to the CPU after loading,
    which a meta model cannot do, so until 2026-12-07 every architecture left here at that step and
    its size was never counted. Returns the values the layout builds (None where it could not be tried)."""
    import spandrel

    shapes = shapes_of(state)
    try:
        with built_from(state, on_meta=True), warnings.catch_warnings():
            # the tensors kept real (`shapes_of`) load into the meta build as a no-op torch warns of, once a
            # tensor: 633 warnings, 1,266 lines of a user's terminal, for a standard ESRGAN (23 blocks)
            warnings.filterwarnings("ignore", message=r"for .*: copying from a non-meta parameter in the checkpoint to a meta parameter",
                                    category=UserWarning)
            descriptor = spandrel.MAIN_REGISTRY.load(shapes)
    except CheckpointError:
        raise
    except RuntimeError as error:
        if not any(sign in str(error) for sign in ("size mismatch", "Missing key", "Unexpected key")):
            return None  # (an operation meta tensors lack)
        # the layout built, and the file's tensors do not fill it: what the real load says too, after
        # allocating the network first (a 2.3 GB convolution at a time)
        first = next((line.strip() for line in str(error).splitlines() if any(sign in line for sign in ("size mismatch", "Missing", "Unexpected"))), str(error))
        raise CheckpointError(f"spandrel recognised the layout, but the file's tensors do not fit it ({first[:200]})") from None
    except (spandrel.UnsupportedModelError, NotImplementedError, KeyError, ValueError, AssertionError, IndexError, TypeError):
        return None
    check_scale(descriptor)
    return network_values(descriptor.model)  # (within the bound: `built_from` counted each registration)


def check_scale(descriptor) -> None:
    """A scale the entry can hold (`EntrySpec.scale`), said before the export: FDAT reads its
    scale off a tensor's values, and one 146 KB file asked for x32, refused only when its entry
    was written, after a sample, the export and the parity runs at 32 times the input's side
    (4.7 GB, 39 s; a probe)."""
    if not 1 <= descriptor.scale <= MAX_SCALE:
        raise CheckpointError(f"{descriptor.architecture.name} at scale x{descriptor.scale}: /upscale serves x1 to x{MAX_SCALE}")


def import_superres(path: Path, data: bytes) -> tuple[UnitRangeNetwork, dict]:
    """(the wrapped network in eval mode, the entry's fields)."""
    import spandrel

    state = read_state(path, data)
    check_spandrel_size(state)
    try:
        with built_from(state):  # (bounded as the dry run was, for the architectures where none could be made)
            descriptor = load_spandrel(state)
    except CheckpointError:
        raise
    except spandrel.UnsupportedModelError:
        raise CheckpointError("no super-resolution architecture spandrel knows matches this state dict") from None
    except (KeyError, ValueError, RuntimeError, AssertionError, IndexError, TypeError) as error:
        raise CheckpointError(f"spandrel recognised the layout but could not build it ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in ("SR", "Restoration"):
        raise CheckpointError(f"{descriptor.architecture.name} is a {descriptor.purpose} model: only super-resolution and restoration models are served by /upscale")
    check_scale(descriptor)
    built = descriptor.model.state_dict()
    broken = next((name for name, tensor in built.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if broken is not None:  # otherwise found by the parity check, after the export
        raise CheckpointError(f"{broken} holds NaN or infinity: the checkpoint is broken")
    rules = descriptor.size_requirements
    if rules.square:
        raise CheckpointError(f"{descriptor.architecture.name} takes square inputs only, which tiles of any image cannot promise")
    if descriptor.input_channels not in (1, 3) or descriptor.output_channels not in (1, 3):
        raise CheckpointError(f"{descriptor.input_channels} → {descriptor.output_channels} channels: /upscale serves 1 or 3")
    multiple = max(1, rules.multiple_of)
    tile = tile_for(descriptor.scale, multiple, rules.minimum)
    network = UnitRangeNetwork(descriptor.model.float().eval())
    fields = {
        "kind": "super_resolution", "arch": descriptor.architecture.id, "channels": descriptor.output_channels,
        "in_channels": descriptor.input_channels, "size_multiple": multiple, "scale": descriptor.scale,
        "train_resolution": tile * descriptor.scale,  # no training size is known: the output side of one tile
        "value_range": [-1.0, 1.0],
        "model": {"generator": "spandrel", "architecture": descriptor.architecture.id, "tags": list(descriptor.tags)},
        "size_requirements": {"minimum": rules.minimum, "multiple_of": multiple, "square": rules.square},
        "tiling": {"tile": tile, "overlap": DEFAULT_OVERLAP, "spandrel": descriptor.tiling.name.lower()},
    }
    return network, fields
