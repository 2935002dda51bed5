"""Reading a network pickle without running it.

A pickle is a program: each global it names is imported and called. NVlabs' network pickles
(StyleGAN2-ADA, StyleGAN3) even carry the source code of their networks, which their own loader
imports. This unpickler resolves only an allow-list of globals — tensor and storage rebuilders,
`OrderedDict`, numpy scalars and plain arrays, the easy-dict type and NVlabs' persistence reconstructor — and
maps each to a function of ours: storages are read with `torch.load(weights_only=True)`, and a
persistent object becomes a `PersistentRecord` (its class name, constructor arguments and
state: parameters, buffers, children), its embedded source never imported or executed. Any other
global is refused with an error that names it, before anything is called.
"""
from __future__ import annotations

import collections
import hashlib
import io
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repository.importers.checkpoint import check_tensor, refused_global
from repository.importers.pickle_scan import PickleRefused, check_archive, check_legacy, scan_pickle


class UnsafePickle(Exception):
    """The file names a global that an import never loads, or is not a pickle at all."""


class EasyDict(dict):
    """What `dnnlib.EasyDict` holds, as a plain dict (never NVlabs' class)."""


@dataclass
class PersistentRecord:
    """An NVlabs persistent object as data: never an instance of its class."""

    class_name: str
    state: dict
    source_sha256: str  # of the embedded module source (recorded, never run)

    @property
    def init_args(self) -> list:
        return list(self.state.get("_init_args") or [])

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})

    def attribute(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)

    def tensors(self, seen: set[int] | None = None) -> dict[str, torch.Tensor]:
        """Every parameter and buffer below this object, by dotted path (a state_dict), each checked
        against its storage as loaded (`check_tensor`: the unpickler's BUILD may re-shape a tensor
        after its rebuild was checked, and a zero stride made a 306 KB pickle's tensor 16 GiB). A
        module met twice is refused: one shared at each of 40 levels was walked 2^40 times."""
        seen = set() if seen is None else seen
        if id(self) in seen:
            raise UnsafePickle(f"the network holds one {self.class_name[:60]} module in two places: NVlabs networks never share one")
        seen.add(id(self))
        found: dict[str, torch.Tensor] = {}
        for group in ("_parameters", "_buffers"):
            held = self.state.get(group) or {}
            for name, value in (held.items() if isinstance(held, dict) else ()):
                if isinstance(value, torch.Tensor):
                    check_tensor(str(name)[:100], value)
                    found[str(name)] = value.detach().as_subclass(torch.Tensor)
        children = self.state.get("_modules") or {}
        for child_name, child in (children.items() if isinstance(children, dict) else ()):
            if isinstance(child, PersistentRecord):
                found.update({f"{child_name}.{key}": value for key, value in child.tensors(seen).items()})
        return found

    def module(self, path: str) -> "PersistentRecord":
        record = self
        for name in path.split("."):
            child = (record.state.get("_modules") or {}).get(name)
            if not isinstance(child, PersistentRecord):
                raise KeyError(path)
            record = child
        return record


MAX_ARRAY_VALUES = 1 << 20  # numpy arrays in NVlabs pickles are small (StyleGAN3's layer sizes and filters)
PERSISTENCE_VERSIONS = {6}  # torch_utils.persistence._version of stylegan2-ada-pytorch and stylegan3


def reconstruct_persistent(meta: dict) -> PersistentRecord:
    """Stands in for `torch_utils.persistence._reconstruct_persistent_obj`."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise UnsafePickle("a persistent object in the pickle is not a class record")
    version = meta.get("version")
    if not isinstance(version, int) or version not in PERSISTENCE_VERSIONS:  # (the type first: hashing a crafted tuple cost 2^40 steps)
        shown = version if isinstance(version, int) else type(version).__name__
        raise UnsafePickle(f"persistence version {shown} is not one this importer knows ({sorted(PERSISTENCE_VERSIONS)})")
    source = meta.get("module_src") or ""
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise UnsafePickle(f"the state of {meta['class_name']} is not a dict")
    return PersistentRecord(meta["class_name"], dict(state), hashlib.sha256(str(source).encode()).hexdigest())


def load_storage(data: bytes):
    """Stands in for `torch.storage._load_from_bytes`: the bytes are a torch.save of one storage,
    in torch's older format (what `Storage.__reduce__` writes) or a zip archive, whose pickles are
    scanned first (`pickle_scan`) and whose members may not expand (a deflated one grew 1 MB into
    1 GiB)."""
    if not isinstance(data, bytes):
        raise UnsafePickle("a storage in the pickle is not given as bytes")
    try:
        if data[:2] == b"PK":
            check_archive(data, "a storage in the pickle")
        else:
            check_legacy(data, "a storage in the pickle")
    except PickleRefused as error:
        raise UnsafePickle(str(error)) from None
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafePickle(f"a storage in the pickle holds objects an import never loads ({refused_global(error)})") from None


NUMERIC_KINDS = "biufc"  # bool, signed and unsigned integers, floats, complex: values, never pointers


def checked_dtype(spec: object, align: bool = False, copy: bool = True) -> np.dtype:
    """Stands in for `numpy.dtype`: a plain numeric type named by its string, always a fresh copy.
    A pickle may then BUILD (set the state of) what it made; NumPy's own builtin descriptors are
    shared, so one pickle's state on `dtype('u1', copy=False)` would have changed uint8 for the
    whole process."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise UnsafePickle(f"a numpy dtype in the pickle is named by {type(spec).__name__}, not a type string")
    try:
        dtype = np.dtype(spec, align=False, copy=True)
    except TypeError:
        raise UnsafePickle(f"a numpy dtype in the pickle names {spec[:8]!r}, which is no numpy type") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafePickle(f"a numpy dtype in the pickle is {spec!r}: an import takes numeric arrays only")
    return dtype


def clean_dtype(dtype: object) -> np.dtype:
    """A dtype the pickle built, rebuilt from its type and byte order alone. What a BUILD can set on
    a descriptor (its flags, size, fields) is dropped: flags that said an 'O' type holds no
    objects turned the file's bytes into object pointers (a 164-byte file crashed the process)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_KINDS or dtype.byteorder not in "<>|=":
        raise UnsafePickle("a numpy array or scalar in the pickle has a dtype that is not a plain number type")
    clean = np.dtype(dtype.char)
    return clean.newbyteorder(dtype.byteorder) if dtype.byteorder in "<>" else clean


class CheckedArray(np.ndarray):
    """What `_reconstruct` makes: its state (shape, dtype, raw bytes) is checked and its dtype
    rebuilt before NumPy reads the bytes. Consumers take it as a plain array (`np.asarray`)."""

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickle("a numpy array in the pickle has a malformed state")
        version, shape, dtype, fortran, raw = state
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape) or not isinstance(raw, (bytes, bytearray)):
            raise UnsafePickle("a numpy array in the pickle has a malformed shape or data")
        super().__setstate__((version, shape, clean_dtype(dtype), bool(fortran), raw))


class ArrayTypeName:
    """Stands for `numpy.ndarray` in a pickle, only as `_reconstruct`'s first argument: called, it
    allocated any shape asked for (240 bytes of pickle held 4.5 GB)."""


def numpy_scalar(dtype: np.dtype, data: bytes = b""):
    dtype = clean_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickle("a numpy scalar in the pickle has the wrong number of bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def numpy_array(subtype: type, shape: tuple, dtype_code: bytes):
    """Stands in for numpy's `_reconstruct`: an empty `CheckedArray` that the pickle then fills
    with raw bytes (StyleGAN3 keeps layer sizes as small arrays)."""
    if not (isinstance(subtype, type) and issubclass(subtype, ArrayTypeName)):
        raise UnsafePickle(f"a numpy array in the pickle is built from a {type(subtype).__name__}, not an ndarray")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and 0 <= n for n in shape) or np.prod(shape, dtype=np.float64) > MAX_ARRAY_VALUES:
        shown = str(shape)[:60] if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape[:8]) and len(shape) <= 8 else type(shape).__name__
        raise UnsafePickle(f"a numpy array in the pickle has shape {shown}: an import takes small arrays only")
    if dtype_code not in (b"b", "b"):  # what ndarray.__reduce__ writes; the real dtype comes with the state
        raise UnsafePickle("a numpy array in the pickle is not built the way NumPy writes one")
    return np.ndarray.__new__(CheckedArray, shape, dtype_code)


def rebuild_tensor(storage, storage_offset: int, size: tuple, stride: tuple, *rest) -> torch.Tensor:
    """Stands in for `torch._utils._rebuild_tensor_v2`, after checking that the tensor lies inside
    its storage: `set_` grows a storage that is too small, so a tensor declared [32, 32] over one
    saved value once came back holding the import process's uninitialised heap."""
    if not isinstance(storage, (torch.UntypedStorage, torch.TypedStorage)):
        raise UnsafePickle("a tensor in the pickle is not built on a storage")
    if not (isinstance(storage_offset, int) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) == len(stride)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (*size, *stride))):
        raise UnsafePickle("a tensor in the pickle has a malformed shape, stride or offset")
    with warnings.catch_warnings():  # TypedStorage's deprecation notice: NVlabs pickles are made of them
        warnings.simplefilter("ignore")
        elements = storage.size() if isinstance(storage, torch.TypedStorage) else storage.nbytes()  # untyped: bytes, a looser bound
    if storage_offset < 0 or any(v < 0 for v in (*size, *stride)):
        raise UnsafePickle("a tensor in the pickle has a negative size, stride or offset")
    if 0 not in size:
        extent = storage_offset + 1 + sum((n - 1) * step for n, step in zip(size, stride))
        if extent > elements or any(step == 0 and n > 1 for n, step in zip(size, stride)):
            raise UnsafePickle(f"a tensor in the pickle ({list(size)}) reaches past its storage of {elements} values or repeats values by a zero stride")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), *rest).as_subclass(LoadedTensor)


class LoadedTensor(torch.Tensor):
    """A tensor as `rebuild_tensor` made and checked it. A pickle may then BUILD it (its
    `__setstate__`, which is `set_`: any storage, offset, size and stride), past every check: a
    zero stride made a 306 KB pickle's tensor 16 GiB, and a `set_` grew a storage of torch's older
    format (resizable) with the heap's leftovers, which were exported as weights. Refused here;
    `PersistentRecord.tensors` hands out plain tensors."""

    def __setstate__(self, state: object) -> None:
        raise UnsafePickle("the pickle re-shapes a tensor after building it (a BUILD on a tensor): NVlabs pickles never do")


def rebuild_parameter(data: torch.Tensor, requires_grad: bool = True, backward_hooks: object = None) -> torch.Tensor:
    """Stands in for `torch._utils._rebuild_parameter`: the tensor itself (an import needs its
    values, not a Parameter, and a Parameter made of it could be re-shaped as the tensor can't)."""
    if not isinstance(data, LoadedTensor):
        raise UnsafePickle("a parameter in the pickle is not built from a tensor")
    return data


ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("dnnlib.util", "EasyDict"): EasyDict,  # a type: pickles build it with NEWOBJ
    ("dnnlib", "EasyDict"): EasyDict,
    ("numpy", "dtype"): checked_dtype,
    ("numpy.core.multiarray", "scalar"): numpy_scalar,
    ("numpy._core.multiarray", "scalar"): numpy_scalar,
    ("numpy", "ndarray"): ArrayTypeName,
    ("numpy.core.multiarray", "_reconstruct"): numpy_array,
    ("numpy._core.multiarray", "_reconstruct"): numpy_array,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): load_storage,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): reconstruct_persistent,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `allowed`'s globals (a subclass narrows them: the CIFAR reader's)."""

    allowed: dict[tuple[str, str], Any] = ALLOWED
    only = "an import loads only tensors, their containers and NVlabs' persistent-network records, never other code"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resolved: dict[tuple[str, str], Any] = {}  # this unpickler's own copy of each global it was given

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise UnsafePickle(f"the pickle asks for {module}.{name}; {self.only}")
        if (module, name) not in self.resolved:
            self.resolved[(module, name)] = own_copy(self.allowed[(module, name)])
        return self.resolved[(module, name)]


def own_copy(target: Any) -> Any:
    """A global as one unpickler hands it out: a class as a fresh subclass of it, a function as a
    fresh wrapper of it. A pickle may BUILD (set the attributes of) anything it holds, globals
    too: one load set `EasyDict.__len__` to `set` and a rebuilder's `__defaults__` for the rest of
    the process (a hostile probe). What it sets now lands on this load's copies."""
    if isinstance(target, type):
        return type(target.__name__, (target,), {"__module__": target.__module__})
    return lambda *args, **kwargs: target(*args, **kwargs)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("the pickle refers to external persistent objects (a torch.save file? use its own format)")


def load_network_pickle(data: bytes) -> Any:
    """The pickle's top-level object, its persistent networks as records. Raises UnsafePickle."""
    if not data or data[:1] != b"\x80":
        raise UnsafePickle("the file is not a pickle (protocol 2 or newer)")
    try:
        scan_pickle(data)  # its nesting and keys, before anything is built (pickle_scan.py)
    except PickleRefused as error:
        raise UnsafePickle(str(error)) from None
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickle:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as error:
        raise UnsafePickle(f"the pickle is damaged or truncated ({type(error).__name__}: {str(error)[:200]})") from None
