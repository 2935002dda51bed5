"""What reading a user's data costs before training's first step: time and peak resident memory
of `load_dataset` (reader + held-out split) on an `image_folder` config (a synthetic folder of
JPEGs made for the run) or a `cifar10` one (synthetic python batches in CIFAR's layout), for this
code and for another checkout (`--baseline-code`: a git worktree of the code before a change),
each in its own process (peak memory is per process).

    ganserve bench-data --images 20000 --resolution 128 --baseline-code /tmp/base
    ganserve bench-data --dataset cifar10 --images 50000 --resolution 64 --baseline-code /tmp/base
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

from bench.runner import machine, write_report

REPO = Path(__file__).resolve().parents[1]
# run in a child with the code under test first on its path: prints seconds, tensor bytes and peak RSS
CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from training.config import DataConfig
from training.data.registry import load_dataset
started = time.perf_counter()
train, held_out = load_dataset(DataConfig(name=sys.argv[4], path=sys.argv[2], resolution=int(sys.argv[3])))
print(json.dumps({"seconds": time.perf_counter() - started, "images": len(train) + len(held_out),
                  "tensor_bytes": train.x.nbytes + held_out.x.nbytes, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def make_folder(root: Path, images: int, classes: int = 4) -> None:
    """`images` 128x96 JPEGs (shifted copies of one noise picture) in `classes` class folders."""
    base = np.random.default_rng(2).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    for i in track(range(images), description=f"writing {images} JPEGs", transient=True):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i:05d}.jpg", quality=85)


def make_cifar(root: Path, images: int, batches: int = 5) -> None:
    """`images` random 32x32 images in CIFAR-10's python batches (`data_batch_1` …, protocol-2
    pickles of uint8 [n, 3072] and their labels) and its `batches.meta`."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for index, count in enumerate(np.diff(np.linspace(0, images, batches + 1).astype(int)), start=1):
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, count).tolist()}
        (root / f"data_batch_{index}").write_bytes(pickle.dumps(batch, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"class{i}".encode() for i in range(10)]}, protocol=2))


DATASETS = {"image_folder": make_folder, "cifar10": make_cifar}


def measure(code: Path, folder: Path, resolution: int, dataset: str = "image_folder") -> dict:
    finished = subprocess.run([sys.executable, "-c", CHILD, str(code.resolve()), str(folder), str(resolution), dataset],
                              capture_output=True, text=True, cwd=code, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def run_data_loading_bench(images: int, resolution: int, baseline_code: Path | None, out: Path | None, dataset: str = "image_folder") -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "images"
        DATASETS[dataset](folder, images)
        codes = {"now": REPO} | ({"baseline": baseline_code} if baseline_code else {})
        results = {name: measure(code, folder, resolution, dataset) for name, code in codes.items()}
    what = "JPEGs" if dataset == "image_folder" else "CIFAR-10 images"
    table = Table(title=f"{images} {what} read at {resolution} px ({machine()})")
    for column in ("code", "seconds", "tensor GB", "peak RSS GB"):
        table.add_column(column)
    for name, result in results.items():
        table.add_row(name, f"{result['seconds']:.1f}", f"{result['tensor_bytes'] / 1e9:.2f}", f"{result['peak_rss_bytes'] / 1e9:.2f}")
    Console().print(table)
    report = {"machine": machine(), "dataset": dataset, "images": images, "resolution": resolution, "results": results}
    write_report(report, out)
    return report
