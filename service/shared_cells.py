"""A file of int64 cells that every process of `ganserve serve --workers N` maps: the way the
supervisor, the engine and the fronts share small counters without a message (the memory budget's
per-process bytes, the fronts' heartbeats). Each process has a slot of `CELLS_PER_SLOT` cells
(the engine 0, the fronts 1 … N) and writes only its own; int64 stores through the mapping are
single machine words, so a reader never sees half a value."""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Self


class SharedCells:
    CELLS_PER_SLOT = 1

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR)  # kept open: a table may `flock` it (SharedMemoryBudget)
        self.map = mmap.mmap(self.fd, 0)
        self.cells = memoryview(self.map).cast("q")

    @classmethod
    def create(cls, path: Path, slots: int) -> Self:
        """A new table of `slots` slots, every cell 0 (the supervisor makes it before any process starts)."""
        path.write_bytes(bytes(8 * cls.CELLS_PER_SLOT * slots))
        return cls(path)

    @property
    def slots(self) -> int:
        return len(self.cells) // self.CELLS_PER_SLOT

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The table's exclusive `flock`, for changes that read and write several cells as one step
        across the processes (a reservation against the budget, a stream slot taken)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
