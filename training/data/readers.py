"""Readers for the formats users bring: an image folder, MNIST IDX files, CIFAR-10 python batches.

Each returns a `TensorData` in [-1, 1] at the config's resolution, so a user's data trains exactly
like the built-in sets. What cannot be trained on is a `DataError` naming the file and the problem
(`ganserve train` prints it as one line); a few unreadable images among many are skipped, named in
a warning.
"""
from __future__ import annotations

import codecs
import io
import gzip
import logging
import os
import pickle
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from rich.progress import track

from repository.importers.safe_pickle import ALLOWED as SAFE_GLOBALS
from repository.importers.pickle_scan import PickleRefused, scan_pickle
from repository.importers.safe_pickle import RestrictedUnpickler, UnsafePickle, clean_dtype
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
MAX_CLASSES = 1000  # class names a CIFAR meta file may list


class DataError(ValueError):
    """Data that cannot be trained on: the message names the file and what is wrong with it."""


def is_hidden(name: str) -> bool:
    """Dot files and folders (`.thumbnails`, macOS's `._photo.jpg` and `.DS_Store`) and macOS's
    `__MACOSX` archive folder: never images of the set, never classes."""
    return name.startswith(".") or name == "__MACOSX"


def image_files(root: Path) -> list[Path]:
    """Every regular image file under `root` (a named pipe called x.png hung the load), hidden ones
    left out, following symbolic links (a linked class folder is a class) but walking each real
    folder once (a link loop ends). Folders that cannot be read, and links that lead out of
    `root`, are named in a warning (an unreadable class folder vanished without a word)."""
    found, walked, unreadable, outside = [], set(), [], {}
    base = os.path.realpath(root)
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=unreadable.append):
        real = os.path.realpath(folder)
        if real in walked:
            subfolders[:] = []
            continue
        walked.add(real)
        if not within(real, base) and not any(within(real, other) for other in outside.values()):  # each link named once, not its sub-folders
            outside[folder] = real
        subfolders[:] = sorted(name for name in subfolders if not is_hidden(name))
        found += [path for name in names if not is_hidden(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES
                  and (path := Path(folder) / name).is_file()]
    if unreadable:
        log.warning("%s: %d folder(s) could not be read, and their images are left out: %s", root, len(unreadable),
                    "; ".join(f"{error.filename} ({error.strerror})" for error in unreadable[:SHOWN_PROBLEMS]))
    if outside:
        log.warning("%s: links lead out of the folder, and the images there are read too: %s", root,
                    ", ".join(f"{folder} → {real}" for folder, real in list(outside.items())[:SHOWN_PROBLEMS]))
    return sorted(found)


def within(path: str, folder: str) -> bool:
    return os.path.commonpath([folder, path]) == folder


def class_of(path: Path, root: Path) -> str | None:
    """The top-level sub-folder an image lies in (its class, however deep it sits), None at the top."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def eight_bits(values: np.ndarray, sixteen_bits: bool = False) -> np.ndarray:
    """Grey values deeper than 8 bits as uint8: 16-bit samples » 8; otherwise by the range they
    hold (Pillow's 32-bit "I" and float "F" modes say nothing of it): floats up to 1 (a float TIFF
    of 0…1) × 255, integers up to 255 as they are, up to 65,535 » 8, beyond that scaled to their
    maximum. (int32 and float data came out black.)"""
    if sixteen_bits:
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    if values.dtype.kind == "f":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(values.max(initial=0.0))
        scaled = values * 255 if top <= 1.0 else values * (255 / top) if top > 255 else values
        return scaled.round().clip(0, 255).astype(np.uint8)
    top = int(values.max(initial=0))
    if top <= 255:
        return values.clip(0, 255).astype(np.uint8)
    if top <= 65535:
        return (values >> 8).clip(0, 255).astype(np.uint8)
    return (values.astype(np.float64) * (255 / top)).round().clip(0, 255).astype(np.uint8)


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
        if picture.mode.startswith("I") or picture.mode == "F":  # convert() clips these at 255 (a 16-bit gradient came out 99.6 % white)
            picture = Image.fromarray(eight_bits(np.asarray(picture), sixteen_bits=picture.mode.startswith("I;16")), "L")
        fitted = ImageOps.fit(picture.convert(mode), (resolution, resolution), Image.Resampling.BICUBIC)
        return np.array(fitted).reshape(resolution, resolution, channels)  # (writable: torch warns on a read-only array)


def read_image_folder(root: str | Path, resolution: int, channels: int = 3) -> TensorData:
    """Every image under `root`; each top-level sub-folder is a class, its images however deep
    (like torchvision's ImageFolder). Each image is resized so its short side is `resolution`,
    then centre-cropped to a square, straight into the one uint8 tensor the set is held in."""
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
    x = torch.empty((len(files), channels, resolution, resolution), dtype=torch.uint8)
    kept, skipped = [], []
    for path, name in track(list(zip(files, classes)), description=f"reading {len(files)} images", transient=True,
                            disable=len(files) < PROGRESS_FROM_FILES):
        try:
            with warnings.catch_warnings():  # Pillow's bomb warning printed raw, where `fitted_image` checks the size itself
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                pixels = fitted_image(path, resolution, channels)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError, struct.error, zlib.error) as error:
            skipped.append(f"{path.relative_to(root)} ({str(error)[:120] or type(error).__name__})")
            continue
        x[len(kept)] = torch.from_numpy(pixels).permute(2, 0, 1)
        kept.append(name)
    if not kept:
        raise DataError(f"none of the {len(files)} images under {root} could be read: {'; '.join(skipped[:SHOWN_PROBLEMS])}")
    if skipped:
        log.warning("%s: skipped %d of %d images that could not be read: %s%s", root, len(skipped), len(files),
                    "; ".join(skipped[:SHOWN_PROBLEMS]), " …" if len(skipped) > SHOWN_PROBLEMS else "")
    labels = torch.tensor([class_names.index(name) for name in kept]) if class_names else None
    return TensorData(x=x[: len(kept)], y=labels, class_names=class_names)


def held_pixels(parts: list[np.ndarray], resolution: int) -> torch.Tensor:
    """uint8 [N, H, W, C] arrays (a file's images, or a CIFAR batch's) → the one uint8
    [N, C, R, R] tensor the set is held in, each image written straight into its row (bicubic
    where its size differs). Stacked, resized and transposed in turn, 50k CIFAR images at 64 px
    were held three times over (2.56 GB peak for a 0.61 GB set)."""
    count, channels = sum(len(part) for part in parts), parts[0].shape[3]
    held = torch.empty((count, channels, resolution, resolution), dtype=torch.uint8)
    rows, start = held.numpy(), 0  # (written through NumPy: the sources may be read-only arrays, which torch warns of)
    mode = "L" if channels == 1 else "RGB"
    for part in parts:
        if part.shape[1:3] == (resolution, resolution):
            rows[start:start + len(part)] = part.transpose(0, 3, 1, 2)
        else:
            for i, image in enumerate(part):
                fitted = Image.fromarray(image.squeeze(-1) if mode == "L" else image, mode).resize((resolution, resolution), Image.Resampling.BICUBIC)
                rows[start + i] = np.asarray(fitted).reshape(resolution, resolution, channels).transpose(2, 0, 1)
        start += len(part)
    return held


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
    """MNIST-style IDX images [N, H, W] (and labels [N]) as uint8 pixels [N, 1, R, R], resized to
    `resolution` (MNIST's 28 px fit no generator: they train at 32)."""
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    pixels = held_pixels([images[..., None]], resolution or images.shape[1])
    labels = None
    if labels_path is not None:
        labels = checked_labels(read_idx(labels_path), len(images), 10, labels_path)
    return TensorData(x=pixels, y=labels, class_names=[str(d) for d in range(10)] if labels is not None else [])


def array_from_buffer(buffer: bytes, dtype: np.dtype, shape: tuple, order: str = "C") -> np.ndarray:
    """Stands in for NumPy's `_frombuffer` (its pickles at protocol 5): an array over the bytes the
    pickle holds, never larger than they are."""
    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)) or order not in ("C", "F"):
        raise UnsafePickle("a NumPy array in the pickle is malformed")
    return np.frombuffer(buffer, dtype=clean_dtype(dtype)).reshape(shape, order=order)


# what a CIFAR batch's pickle may name: NumPy's array and dtype rebuilders (checked stand-ins, from
# the importers' allow-list, and `array_from_buffer`) and `_codecs.encode`, which Python 3 writes
# for bytes at protocol 2
BATCH_GLOBALS = {key: value for key, value in SAFE_GLOBALS.items() if key[0].startswith("numpy")} | {
    ("_codecs", "encode"): codecs.encode, ("numpy._core.numeric", "_frombuffer"): array_from_buffer,
    ("numpy.core.numeric", "_frombuffer"): array_from_buffer}


class BatchUnpickler(RestrictedUnpickler):
    allowed = BATCH_GLOBALS
    only = "a CIFAR batch holds arrays, lists and dicts, and nothing else in it is run"


def load_cifar_pickle(path: Path) -> object:
    """A CIFAR python batch: a pickle by format, read without running it (plain containers and
    NumPy arrays only: a batch whose pickle named any other global ran it while loading)."""
    try:
        data = path.read_bytes()
        scan_pickle(data)  # its nesting and keys first: a nested key crashed the process when hashed (repository/importers/pickle_scan.py)
        return BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (UnsafePickle, PickleRefused) as error:
        raise DataError(f"{path}: {error}") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise DataError(f"{path} is not a CIFAR python batch ({type(error).__name__}: {str(error)[:160]})") from None


def cifar_batches(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if CIFAR_BATCH.fullmatch(path.name))


def batch_arrays(batch: object, path: Path, num_classes: int) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 images [N, 32, 32, 3], labels [N]) of one CIFAR batch, every part checked."""
    if not isinstance(batch, dict) or b"data" not in batch:
        raise DataError(f"{path}: expected a dict with data and labels, got {type(batch).__name__}")
    labels = batch.get(b"labels", batch.get(b"fine_labels"))
    if labels is None:
        raise DataError(f"{path}: no labels (a CIFAR batch holds `labels`, or CIFAR-100's `fine_labels`)")
    try:  # (400 KB of nested lists made NumPy refuse 64 dimensions, in a traceback)
        data, labels = np.asarray(batch[b"data"]), np.asarray(labels)
    except (ValueError, TypeError, OverflowError, MemoryError) as error:
        raise DataError(f"{path}: its data or labels are no arrays ({type(error).__name__}: {str(error)[:120]})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected uint8 data [N, 3072], got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), checked_labels(labels, len(data), num_classes, path)


def read_cifar10(batch_paths: list[str | Path], meta_path: str | Path | None = None, resolution: int = 32) -> TensorData:
    """CIFAR-10 python batches (`data_batch_1` …): uint8 pixels [N, 3, R, R] with labels."""
    class_names = [f"class_{i}" for i in range(10)]
    if meta_path is not None:
        meta = load_cifar_pickle(Path(meta_path))
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if not isinstance(names, list) or not all(isinstance(name, bytes) for name in names):
            raise DataError(f"{meta_path}: expected a dict with label_names")
        if not 2 <= len(names) <= MAX_CLASSES:  # (100,000 names made a conditional model of 9.7 GB; none, "labels in 0 … -1")
            raise DataError(f"{meta_path} lists {len(names)} class names: between 2 and {MAX_CLASSES} are taken (CIFAR-10 has 10, CIFAR-100 100)")
        class_names = [name.decode(errors="replace") for name in names]
    images, labels = [], []
    for path in map(Path, batch_paths):
        data, batch_labels = batch_arrays(load_cifar_pickle(path), path, len(class_names))
        images.append(data)
        labels.append(batch_labels)
    return TensorData(x=held_pixels(images, resolution), y=torch.cat(labels), class_names=class_names)
