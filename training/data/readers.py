"""Readers for the formats users bring: an image folder, MNIST IDX files, CIFAR-10 python batches.

Each returns a `TensorData` in [-1, 1] at the config's resolution, so a user's data trains exactly
like the built-in sets. What cannot be trained on is a `DataError` naming the file and the problem
(`ganserve train` prints it as one line); a few unreadable images among many are skipped, named in
a warning.
"""
from __future__ import annotations

import codecs
import gzip
import logging
import os
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from rich.progress import track

from repository.importers.safe_pickle import ALLOWED as SAFE_GLOBALS
from repository.importers.safe_pickle import UnsafePickle
from training.data.base import TensorData

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# a source image past this many pixels is skipped (named): a 168 KB PNG of 12000² decoded to 570 MB
# in 12 s, and Pillow only warned below its own bomb limit (178 M pixels)
MAX_SOURCE_PIXELS = 8192 * 8192
SHOWN_PROBLEMS = 5  # skipped files named in the warning
PROGRESS_FROM_FILES = 200  # a folder this large shows a progress bar while it is read
CIFAR_BATCH = re.compile(r"data_batch_\d+")  # not data_batch_1.bak beside it


class DataError(ValueError):
    """Data that cannot be trained on: the message names the file and what is wrong with it."""


def is_hidden(name: str) -> bool:
    """Dot files and folders (`.thumbnails`, macOS's `._photo.jpg` and `.DS_Store`) and macOS's
    `__MACOSX` archive folder: never images of the set, never classes."""
    return name.startswith(".") or name == "__MACOSX"


def image_files(root: Path) -> list[Path]:
    """Every image file under `root`, hidden ones left out, following symbolic links (a linked
    class folder is a class) but walking each real folder once (a link loop ends)."""
    found, walked = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:
            subfolders[:] = []
            continue
        walked.add(real)
        subfolders[:] = sorted(name for name in subfolders if not is_hidden(name))
        found += [Path(folder) / name for name in names if not is_hidden(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def class_of(path: Path, root: Path) -> str | None:
    """The top-level sub-folder an image lies in (its class, however deep it sits), None at the top."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def fitted_image(path: Path, resolution: int, channels: int) -> np.ndarray:
    """uint8 [resolution, resolution, channels]: upright as its EXIF orientation says, 16-bit grey
    scaled (not clipped) to 8 bits, short side resized to `resolution`, centre-cropped."""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(path) as image:
        width, height = image.size
        if width * height > MAX_SOURCE_PIXELS:
            raise DataError(f"{width}x{height} pixels, over the {MAX_SOURCE_PIXELS:,} read")
        image.draft(mode, (resolution, resolution))  # a JPEG decodes at the smallest scale still ≥ the size asked
        picture = ImageOps.exif_transpose(image)
        if picture.mode.startswith("I"):  # 16-bit grey: convert() clips at 255 (99.6 % of a gradient came out white)
            picture = Image.fromarray((np.asarray(picture) >> 8).clip(0, 255).astype(np.uint8), "L")
        fitted = ImageOps.fit(picture.convert(mode), (resolution, resolution), Image.Resampling.BICUBIC)
        return np.array(fitted).reshape(resolution, resolution, channels)  # (writable: torch warns on a read-only array)


def read_image_folder(root: str | Path, resolution: int, channels: int = 3) -> TensorData:
    """Every image under `root`; each top-level sub-folder is a class, its images however deep
    (like torchvision's ImageFolder). Each image is resized so its short side is `resolution`,
    then centre-cropped to a square, straight into the one float tensor the set is held in."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    files = image_files(root)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    classes = [class_of(path, root) for path in files]
    class_names = sorted({name for name in classes if name is not None})
    if class_names and None in classes:
        raise DataError(f"{root} mixes images at its top level with class sub-folders")
    if class_names:
        empty = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not is_hidden(entry.name) and entry.name not in class_names)
        if empty:
            log.warning("%s: sub-folders without images are no classes: %s", root, ", ".join(empty[:SHOWN_PROBLEMS]))
    x = torch.empty((len(files), channels, resolution, resolution))
    kept, skipped = [], []
    for path, name in track(list(zip(files, classes)), description=f"reading {len(files)} images", transient=True,
                            disable=len(files) < PROGRESS_FROM_FILES):
        try:
            pixels = fitted_image(path, resolution, channels)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError, struct.error, zlib.error) as error:
            skipped.append(f"{path.relative_to(root)} ({str(error)[:120] or type(error).__name__})")
            continue
        x[len(kept)] = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
        kept.append(name)
    if not kept:
        raise DataError(f"none of the {len(files)} images under {root} could be read: {'; '.join(skipped[:SHOWN_PROBLEMS])}")
    if skipped:
        log.warning("%s: skipped %d of %d images that could not be read: %s%s", root, len(skipped), len(files),
                    "; ".join(skipped[:SHOWN_PROBLEMS]), " …" if len(skipped) > SHOWN_PROBLEMS else "")
    labels = torch.tensor([class_names.index(name) for name in kept]) if class_names else None
    return TensorData(x=x[: len(kept)], y=labels, class_names=class_names)


def resized(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [N, H, W, C] at resolution x resolution (bicubic), as it is when it already is."""
    if images.shape[1:3] == (resolution, resolution):
        return images
    mode = "L" if images.shape[3] == 1 else "RGB"
    return np.stack([np.asarray(Image.fromarray(image.squeeze(-1) if mode == "L" else image, mode).resize(
        (resolution, resolution), Image.Resampling.BICUBIC)).reshape(resolution, resolution, images.shape[3]) for image in images])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] → float [N, C, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float() / 127.5 - 1


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX array (MNIST's format), gzip-compressed or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # a truncated or damaged .gz (click reported it as "Aborted.")
        raise DataError(f"{path} cannot be read ({type(error).__name__}: {str(error)[:160]})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX data type 0x{dtype_code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: the header is cut short ({len(raw)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {data.size} values")
    return data.reshape(shape)


def checked_labels(labels: np.ndarray, count: int, num_classes: int, source: str | Path) -> torch.Tensor:
    """[N] class indices in 0 … num_classes - 1, one per image (a labels file of images, or labels
    past the classes, failed deep inside the conditional model's embedding)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{source}: labels must be one integer per image, got {labels.dtype} {labels.shape}")
    if len(labels) != count:
        raise DataError(f"{source}: {count} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels must lie in 0 … {num_classes - 1}, found {labels.min()} … {labels.max()}")
    return torch.from_numpy(labels.astype(np.int64))


def read_mnist(images_path: str | Path, labels_path: str | Path | None = None, resolution: int | None = None) -> TensorData:
    """MNIST-style IDX images [N, H, W] (and labels [N]) as [N, 1, R, R] in [-1, 1], resized to
    `resolution` (MNIST's 28 px fit no generator: they train at 32)."""
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    images = resized(images[..., None], resolution or images.shape[1])
    labels = None
    if labels_path is not None:
        labels = checked_labels(read_idx(labels_path), len(images), 10, labels_path)
    return TensorData(x=to_tensor(images), y=labels, class_names=[str(d) for d in range(10)] if labels is not None else [])


def array_from_buffer(buffer: bytes, dtype: np.dtype, shape: tuple, order: str = "C") -> np.ndarray:
    """Stands in for NumPy's `_frombuffer` (its pickles at protocol 5): an array over the bytes the
    pickle holds, never larger than they are."""
    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype) or order not in ("C", "F"):
        raise UnsafePickle("a NumPy array in the pickle is malformed")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


# what a CIFAR batch's pickle may name: NumPy's array and dtype rebuilders (checked stand-ins, from
# the importers' allow-list, and `array_from_buffer`) and `_codecs.encode`, which Python 3 writes
# for bytes at protocol 2
BATCH_GLOBALS = {key: value for key, value in SAFE_GLOBALS.items() if key[0].startswith("numpy")} | {
    ("_codecs", "encode"): codecs.encode, ("numpy._core.numeric", "_frombuffer"): array_from_buffer,
    ("numpy.core.numeric", "_frombuffer"): array_from_buffer}


class BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in BATCH_GLOBALS:
            return BATCH_GLOBALS[(module, name)]
        raise UnsafePickle(f"the pickle asks for {module}.{name}; a CIFAR batch holds arrays, lists and dicts, and nothing "
                           "else in it is run")

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickle("the pickle refers to external persistent objects")


def load_cifar_pickle(path: Path) -> object:
    """A CIFAR python batch: a pickle by format, read without running it (plain containers and
    NumPy arrays only: a batch whose pickle named any other global ran it while loading)."""
    try:
        with open(path, "rb") as handle:
            return BatchUnpickler(handle, encoding="bytes").load()
    except UnsafePickle as error:
        raise DataError(f"{path}: {error}") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise DataError(f"{path} is not a CIFAR python batch ({type(error).__name__}: {str(error)[:160]})") from None


def cifar_batches(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if CIFAR_BATCH.fullmatch(path.name))


def read_cifar10(batch_paths: list[str | Path], meta_path: str | Path | None = None, resolution: int = 32) -> TensorData:
    """CIFAR-10 python batches (`data_batch_1` …): [N, 3, R, R] in [-1, 1] with labels."""
    class_names = [f"class_{i}" for i in range(10)]
    if meta_path is not None:
        meta = load_cifar_pickle(Path(meta_path))
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if not isinstance(names, list) or not all(isinstance(name, bytes) for name in names):
            raise DataError(f"{meta_path}: expected a dict with label_names")
        class_names = [name.decode(errors="replace") for name in names]
    images, labels = [], []
    for path in map(Path, batch_paths):
        batch = load_cifar_pickle(path)
        if not isinstance(batch, dict) or b"data" not in batch:
            raise DataError(f"{path}: expected a dict with data and labels, got {type(batch).__name__}")
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: expected uint8 data [N, 3072], got {data.dtype} {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(checked_labels(np.asarray(batch.get(b"labels", batch.get(b"fine_labels", []))), len(data), len(class_names), path))
    return TensorData(x=to_tensor(resized(np.concatenate(images), resolution)), y=torch.cat(labels), class_names=class_names)
