"""The process memory budget, and reading the process's own memory (Linux /proc).

Every request reserves what it will hold (its body, decoded image, model inputs, outputs and its
share of the batches it joins) before anything is allocated; a reservation that does not fit is
refused with 503 and a Retry-After instead of growing the process until the kernel kills it.
A request refused that way claims the room it needs (`MemoryClaim`): until its client is back,
requests of others that would take that room are refused in turn, so the client that waited
out its Retry-After finds it, rather than whatever arrived in the meantime.
The estimates come from measurement: models' per-item peaks are read off the process's peak RSS
at warm-up (`measure_peak`). Under `ganserve serve --workers N` the budget is the server's, shared
by its processes through a mapped table (`SharedMemoryBudget`).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from service.shared_cells import SharedCells

log = logging.getLogger("ganserve.memory")
T = TypeVar("T")
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
SHARED_BUDGET_FILE = "memory-budget"  # in the supervisor's private directory
UNSHARED = contextlib.nullcontext()  # the lock of a budget no other process shares (reusable)


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


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_environment(environ: dict[str, str], thp_mode: Path = THP_MODE) -> dict[str, str] | None:
    """The environment to restart the server in so that glibc (2.35 or later) asks the kernel for
    transparent huge pages on the buffers it maps (`GLIBC_TUNABLES`, read only at a process's
    start); None where it already is, or where the kernel gives none (THP `never`, no Linux).

    The translate graphs run without ONNX Runtime's arena (every upload has its own size, and an
    arena would keep the largest's activations for good), so each run maps its activations
    afresh, and the kernel faults them in 4 KiB at a time: cyclegan's 1024² translate took 0.74 s
    on two threads here, 0.46 s of it system time, against 0.36 s with an arena; with huge pages
    0.45 s (docs/benchmarks.md "Huge pages"). The upscale graphs keep an arena for their tile
    shape (service/runtimes.py), so only their other sizes (v2 infer) gain here.
    The cost: where memory is fragmented, the kernel may compact it before it hands out a huge
    page (THP `defrag`), and a graph's first runs at a size are slow while it does: warm-up timed
    cyclegan 1.45x slower than without (0.0037 against 0.0025 s a 64² unit) while its requests
    ran 1.5x faster, and some requests took 3x the median. So it is GANSERVE_HUGE_PAGES=true's,
    not the default."""
    if HUGE_PAGES_TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        mode = re.search(r"\[(\w+)\]", thp_mode.read_text())
    except OSError:
        return None
    if mode is None or mode.group(1) == "never":
        return None
    tunables = ":".join(filter(None, [environ.get("GLIBC_TUNABLES", ""), HUGE_PAGES_TUNABLE]))
    return {**environ, "GLIBC_TUNABLES": tunables}


def return_freed_memory_to_the_os() -> None:
    """glibc keeps freed blocks in its heaps and raises its mmap threshold after every large free,
    so a burst of big images would stay resident for good. A fixed 1 MiB threshold sends every
    large buffer (images, activations) to mmap, which hands it back on free."""
    c = libc()
    if c is None:
        return
    with contextlib.suppress(AttributeError):
        c.mallopt(M_MMAP_THRESHOLD, 1024 * 1024)
        c.mallopt(M_TRIM_THRESHOLD, 8 * 1024 * 1024)


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
    c = libc()
    if c is not None:
        with contextlib.suppress(AttributeError):
            c.malloc_trim(0)


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library, looked up once: `find_library` runs ldconfig and took 1.8–4.5 ms a call,
    and `measure_peak` trims before every warmed shape it measures. None where there is none."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


@dataclass(frozen=True)
class MemoryClaim:
    """Room promised to the request a memory refusal turned away (its `holder`: a hash of its
    client's address, model and operation, `memory_holder`): from `opens` (its Retry-After, in
    time.monotonic_ns) until `lapses` (a grace second later). Requests of others that would take
    the room are refused only where they would still hold it at `opens`: until then it is used.
    Renewed while the holder, back when told, is refused again (for at most MAX_CLAIM_S from
    `since`), taken when it is admitted."""

    nbytes: int
    holder: int
    opens_ns: int
    lapses_ns: int
    since_ns: int


MAX_CLAIM_S = 30.0  # a claim renewed this long is let lapse: what holds the room may be no request's
CLIENT_BAR_S = 60.0  # a client whose claim lapsed untaken makes no claim for this long
EVERYONE_BAR_S = 5.0  # and nobody does for this long: rotating addresses would otherwise keep room idle


@dataclass(frozen=True)
class ClaimBar:
    """Who may not claim, after a claim lapsed untaken: its client (`holder_client`) until
    `client_until_ns`, everyone until `everyone_until_ns`. A client sending large requests while
    the budget is busy and never coming back for them kept room promised and idle: a hostile probe
    rotating 31 addresses cut other clients' translates from 181 to 49 a minute. Barred, the worst
    a client can do is what every refusal did before claims: nothing is kept for anyone."""

    client: int
    client_until_ns: int
    everyone_until_ns: int


def memory_holder(client: str, model: str, operation: str) -> int:
    """Who may take a claim: the same client address asking the same model the same thing. Stable
    hashes, the same in every process of the server: the client's in the high bits
    (`holder_client`), never 0 (which means none)."""
    return (zlib.crc32(client.encode()) >> 1) << 31 | (zlib.crc32(f"{model}|{operation}".encode()) >> 1) | 1


def holder_client(holder: int) -> int:
    return holder >> 31


class OverBudget(Exception):
    """A reservation does not fit the memory budget now (`permanent`: it never will, not even once
    the resident figure, read beside admitted work, is read again with none: `unsure`)."""

    def __init__(self, wanted: int, free: int, capacity: int, unsure: int = 0) -> None:
        self.wanted, self.free, self.capacity = wanted, free, capacity
        self.permanent = wanted > capacity + unsure
        super().__init__(f"{wanted / 2**20:.0f} MiB wanted, {free / 2**20:.0f} MiB free of {capacity / 2**20:.0f} MiB")


class ClaimedByAnother(OverBudget):
    """A reservation that fits what is free, but not beside the room claimed for another request."""

    def __init__(self, wanted: int, free: int, capacity: int, claim: MemoryClaim) -> None:
        super().__init__(wanted, free, capacity)
        self.claim = claim
        self.permanent = False

    def lapses_in_s(self) -> float:
        return max(0.0, (self.claim.lapses_ns - time.monotonic_ns()) / 1e9)


class MemoryBudget:
    """Bytes that admitted work may hold at once: the budget less what the process holds resident
    (its loaded models). `try_reserve` never waits: what does not fit is refused at once, which is
    what keeps a burst of big requests from piling up in memory. Where the figures are kept is
    the subclasses' business (`SharedMemoryBudget`: a table every process of the server maps)."""

    def __init__(self, total: int, resident: int = 0) -> None:
        self.total = total
        self.resident = resident
        self.own_reserved = 0  # what this process's admitted work holds
        # how much `resident` may over-count: read beside admitted work, RSS held some of theirs too
        # (service/registry.py `settle_memory`); what a 413 must allow for, as it says "never"
        self.own_unsure = 0
        self.own_claim: MemoryClaim | None = None
        self.own_bar: ClaimBar | None = None
        self.lock = threading.Lock()  # the intake reserves on the loop, jobs from their thread

    @property
    def capacity(self) -> int:
        return max(0, self.total - self.resident)

    @property
    def used(self) -> int:
        return self.own_reserved

    @property
    def unsure(self) -> int:
        return self.own_unsure

    def capacity_if_resident(self, nbytes: int) -> int:
        """What requests would have if this process held `nbytes` resident (a load asks before it
        swaps a model in: service/registry.py)."""
        return max(0, self.total - self.others_resident() - int(nbytes))

    def others_resident(self) -> int:
        """What the server's other processes hold resident (none: one process)."""
        return 0

    def exclusive(self) -> contextlib.AbstractContextManager:
        """Held while a reservation is checked and made (other processes' too, where they share it)."""
        return UNSHARED

    def set_resident(self, nbytes: int, unsure: int = 0) -> None:
        """What this process holds resident (the most it may hold, where it was read beside admitted
        work), and by how much that may over-count."""
        with self.lock:
            self.resident = max(0, int(nbytes))
            self.own_unsure = max(0, int(unsure))

    def read_claim(self) -> MemoryClaim | None:
        """The claim in force (where the figures are kept: the subclasses' business); under `exclusive`."""
        return self.own_claim

    def write_claim(self, claim: MemoryClaim | None) -> None:
        self.own_claim = claim

    def read_bar(self) -> ClaimBar | None:
        return self.own_bar

    def write_bar(self, bar: ClaimBar) -> None:
        self.own_bar = bar

    def live_claim(self, now: int) -> MemoryClaim | None:
        """The claim in force, once a lapsed one is cleared and claims barred (under `exclusive`)."""
        claim = self.read_claim()
        if claim is not None and claim.lapses_ns <= now:
            self.write_claim(None)
            self.write_bar(ClaimBar(holder_client(claim.holder), now + int(CLIENT_BAR_S * 1e9), now + int(EVERYONE_BAR_S * 1e9)))
            return None
        return claim

    def try_reserve(self, nbytes: int, holder: int | None = None, holds_s: float = math.inf) -> None:
        """`holder` (`memory_holder`): the reservation of a request's compute, which a claim
        protects and which may claim; `holds_s`: about how long it will hold the bytes (its wait,
        compute and encoding), so that room claimed for later is used until then. Without a
        holder (a body's chunks, a stream's waiting frame, a job's held bytes), a reservation
        neither sees claims nor makes them: those are bounded by the body limit, or small beside
        a request's activations."""
        nbytes = max(0, int(nbytes))
        with self.lock, self.exclusive():
            capacity, used = self.capacity, self.used
            if used + nbytes > capacity:
                raise OverBudget(nbytes, capacity - used, capacity, self.unsure)
            now = time.monotonic_ns()
            if holder is not None and (claim := self.live_claim(now)) is not None:
                if claim.holder == holder:
                    self.write_claim(None)  # taken
                elif capacity - used - nbytes < claim.nbytes and now + holds_s * 1e9 > claim.opens_ns:
                    raise ClaimedByAnother(nbytes, capacity - used, capacity, claim)
            self.own_reserved += nbytes

    def claim(self, nbytes: int, holder: int, opens_in_s: float, grace_s: float) -> None:
        """Promises `nbytes` to `holder` from `opens_in_s` for `grace_s` more, where no other claim
        is in force (one at a time: the first refused is the first served); renews the holder's
        own (its size kept) where the holder is back no sooner than told; nothing while claims are
        barred (`ClaimBar`)."""
        with self.lock, self.exclusive():
            now = time.monotonic_ns()
            claim = self.live_claim(now)
            bar = self.read_bar()
            if bar is not None and (now < bar.everyone_until_ns or (bar.client == holder_client(holder) and now < bar.client_until_ns)):
                return
            opens = now + int(opens_in_s * 1e9)
            if claim is None:
                self.write_claim(MemoryClaim(max(0, int(nbytes)), holder, opens, opens + int(grace_s * 1e9), now))
            elif claim.holder == holder and claim.opens_ns <= now and now - claim.since_ns < MAX_CLAIM_S * 1e9:
                # back when told (not before: a client retrying early and often moved `opens` ahead
                # of everyone for good, and kept the one claim from the client that waits its turn)
                self.write_claim(MemoryClaim(claim.nbytes, holder, opens, opens + int(grace_s * 1e9), claim.since_ns))

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.own_reserved = max(0, self.own_reserved - max(0, int(nbytes)))


class SharedBudgetTable(SharedCells):
    """The file every process of `ganserve serve --workers N` maps: one slot per process (the
    engine 0, the fronts 1 … N), each three int64 — what the process holds resident, what its
    admitted requests have reserved, and how much its resident figure may over-count. A process
    writes only its own slot; every process reads all of them, so the budget is the server's, not
    split per process. Three more slots after them hold the server's `MemoryClaim` and
    `ClaimBar`, read and written under the table's lock: a client refused by one front finds its
    room kept from every front's requests."""

    CELLS_PER_SLOT = 3
    RESIDENT, RESERVED, UNSURE = range(3)
    CLAIM_SLOTS = 3  # the claim's five figures, the bar's three

    @classmethod
    def create(cls, path: Path, slots: int) -> "SharedBudgetTable":
        return super().create(path, slots + cls.CLAIM_SLOTS)  # the processes' slots, then the claim's

    @property
    def slots(self) -> int:
        return super().slots - self.CLAIM_SLOTS

    def cell(self, slot: int, which: int) -> int:
        return self.CELLS_PER_SLOT * slot + which

    def column(self, which: int) -> int:
        return sum(self.cells[which:self.CELLS_PER_SLOT * self.slots:self.CELLS_PER_SLOT])

    def resident(self) -> int:
        return self.column(self.RESIDENT)

    def reserved(self) -> int:
        return self.column(self.RESERVED)

    def unsure(self) -> int:
        return self.column(self.UNSURE)

    def claim_cells(self, first: int, count: int) -> range:
        return range(self.cell(self.slots, first), self.cell(self.slots, first + count))

    def read_claim(self) -> MemoryClaim | None:
        figures = [self.cells[i] for i in self.claim_cells(0, 5)]
        return MemoryClaim(*figures) if figures[1] else None  # (holder 0: none)

    def write_claim(self, claim: MemoryClaim | None) -> None:
        figures = (claim.nbytes, claim.holder, claim.opens_ns, claim.lapses_ns, claim.since_ns) if claim is not None else (0,) * 5
        for i, value in zip(self.claim_cells(0, 5), figures):
            self.cells[i] = value

    def read_bar(self) -> ClaimBar | None:
        figures = [self.cells[i] for i in self.claim_cells(5, 3)]
        return ClaimBar(*figures) if figures[2] else None

    def write_bar(self, bar: ClaimBar) -> None:
        for i, value in zip(self.claim_cells(5, 3), (bar.client, bar.client_until_ns, bar.everyone_until_ns)):
            self.cells[i] = value

    def clear(self, slot: int) -> None:
        """A process that died: its reservations died with it (its successor sets its own resident bytes)."""
        self.cells[self.cell(slot, self.RESERVED)] = 0
        self.cells[self.cell(slot, self.UNSURE)] = 0


class SlotCell:
    """A SharedMemoryBudget attribute kept in its process's slot of the shared table (one cell of it)."""

    def __init__(self, which: int) -> None:
        self.which = which

    def __get__(self, budget: "SharedMemoryBudget", owner: type | None = None) -> int:
        return budget.table.cells[budget.table.cell(budget.slot, self.which)]

    def __set__(self, budget: "SharedMemoryBudget", nbytes: int) -> None:
        budget.table.cells[budget.table.cell(budget.slot, self.which)] = nbytes


class SharedMemoryBudget(MemoryBudget):
    """One memory budget over every process of `--workers N`: a request admitted by any front is
    checked against what the engine and every front hold resident and have reserved, so the
    largest request the server admits does not shrink as fronts are added (each front held
    1/(N+1) of the budget before, batch memory of the engine included). The check and the
    reservation are one step under an exclusive `flock` of the table, so two fronts cannot both
    take the last bytes; a release writes only this process's own slot."""

    def __init__(self, table: SharedBudgetTable, slot: int, total: int, resident: int = 0) -> None:
        if not 0 <= slot < table.slots:
            raise ValueError(f"slot {slot} is outside the table's {table.slots} slots")
        self.table, self.slot = table, slot
        super().__init__(total, resident)  # a replacement front starts with none of its predecessor's reservations

    # this process's own figures live in its slot of the table
    resident = SlotCell(SharedBudgetTable.RESIDENT)
    own_reserved = SlotCell(SharedBudgetTable.RESERVED)
    own_unsure = SlotCell(SharedBudgetTable.UNSURE)

    @property
    def unsure(self) -> int:
        return self.table.unsure()

    def read_claim(self) -> MemoryClaim | None:
        return self.table.read_claim()

    def write_claim(self, claim: MemoryClaim | None) -> None:
        self.table.write_claim(claim)

    def read_bar(self) -> ClaimBar | None:
        return self.table.read_bar()

    def write_bar(self, bar: ClaimBar) -> None:
        self.table.write_bar(bar)

    @property
    def capacity(self) -> int:
        return max(0, self.total - self.table.resident())

    def others_resident(self) -> int:
        return self.table.resident() - self.resident

    @property
    def used(self) -> int:
        return self.table.reserved()

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self.table.locked()
