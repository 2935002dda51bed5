"""The process memory budget, and reading the process's own memory (Linux /proc).

Every request reserves what it will hold (its body, decoded image, model inputs, outputs and its
share of the batches it joins) before anything is allocated; a reservation that does not fit is
refused with 503 and a Retry-After instead of growing the process until the kernel kills it.
The estimates come from measurement: models' per-item peaks are read off the process's peak RSS
at warm-up (`measure_peak`).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("ganserve.memory")
T = TypeVar("T")
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """Resident memory now (0 where /proc is missing)."""
    return (status_kib("VmRSS") or 0) * 1024


def measure_peak(work: Callable[[], T]) -> tuple[T, int | None]:
    """Runs `work` and returns (its result, how far the process's peak RSS rose above the RSS
    before it). None where the peak cannot be reset (not Linux). Run it while nothing else
    computes: the peak is the whole process's. Free heap pages are handed back first: a run that
    reused them (glibc serves even a large buffer from a free heap chunk before it maps new
    memory) would need them without raising the peak, and be measured as needing nothing."""
    trim()
    before = rss_bytes()
    try:
        CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return work(), None
    result = work()
    peak = (status_kib("VmHWM") or 0) * 1024
    return result, max(0, peak - before)


def return_freed_memory_to_the_os() -> None:
    """glibc keeps freed blocks in its heaps and raises its mmap threshold after every large free,
    so a burst of big images would stay resident for good. A fixed 1 MiB threshold sends every
    large buffer (images, activations) to mmap, which hands it back on free."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        libc.mallopt(M_MMAP_THRESHOLD, 1024 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 8 * 1024 * 1024)


def freeze_resident_objects() -> None:
    """Collects what is garbage now, then freezes every surviving object out of the cyclic garbage
    collector. Loaded models, ONNX sessions and the frameworks leave ~230k tracked objects, and
    every full collection walked them all: a 90 ms pause a few times a minute under load, the p99
    of every request that waited behind it (measured: docs/benchmarks.md). Frozen objects are
    still freed by reference counting; each (re)load unfreezes first, so the cycles of a model
    that was unloaded are collected then."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def trim() -> None:
    """Hands free heap pages back to the OS (after loading, when the peak of warm-up is over)."""
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(name).malloc_trim(0)


class OverBudget(Exception):
    """A reservation does not fit the memory budget now (`permanent`: it never will)."""

    def __init__(self, wanted: int, free: int, capacity: int) -> None:
        self.wanted, self.free, self.capacity = wanted, free, capacity
        self.permanent = wanted > capacity
        super().__init__(f"{wanted / 2**20:.0f} MiB wanted, {free / 2**20:.0f} MiB free of {capacity / 2**20:.0f} MiB")


class MemoryBudget:
    """Bytes that admitted work may hold at once. `reserve` never waits: what does not fit is
    refused at once, which is what keeps a burst of big requests from piling up in memory."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.lock = threading.Lock()  # the intake reserves on the loop, jobs from their thread

    def set_capacity(self, capacity: int) -> None:
        with self.lock:
            self.capacity = max(0, capacity)

    def try_reserve(self, nbytes: int) -> None:
        nbytes = max(0, int(nbytes))
        with self.lock:
            if self.used + nbytes > self.capacity:
                raise OverBudget(nbytes, self.capacity - self.used, self.capacity)
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.used = max(0, self.used - max(0, int(nbytes)))
