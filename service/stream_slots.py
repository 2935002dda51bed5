"""The upscale streams' slots: how many are open, and whose, across the whole server.

A stream holds a connection for as long as its client sends frames, and a frame still arriving is
held by the WebSocket parser outside the memory budget, so the server bounds them: at most
`limit` open (GANSERVE_MAX_STREAMS, and half of GANSERVE_MAX_CONNECTIONS at most), at most half of
them one client address's. A stream's slot number (1 … limit) also names it in `/metrics`, reused,
so a client opening streams in a loop cannot grow the series without bound.

In one process the slots are a list the event loop alone touches. Under `ganserve serve --workers N`
they are a file every front maps (`StreamSlotTable`, made by the supervisor), taken and freed
under its `flock`: counted per front, N fronts held N times the streams (and N times the frames
outside the budget) the settings name, and two fronts gave out the same slot names (a hostile
probe: 64 streams open under the default 32, `s1` twice). A dead front's slots are freed by the
supervisor, as its memory reservations are."""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import MutableSequence
from pathlib import Path

from service.shared_cells import SharedCells

STREAM_SLOTS_FILE = "stream-slots"  # in the supervisor's run directory


class NoStreamSlot(Exception):
    """No slot for this stream: the server's limit, or the client's share of it (the message says which)."""


def owner_key(owner: str) -> int:
    """A client address as a nonzero int64, the same in every process (`hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(owner.encode(), digest_size=7).digest(), "big") + 1


class StreamSlotTable(SharedCells):
    """Two int64 per stream slot: the worker slot of the front holding it plus one (0: free), and
    its client's `owner_key`."""

    CELLS_PER_SLOT = 2

    def clear(self, process: int) -> None:
        """Frees every slot `process` held (it died: its streams' connections died with it)."""
        with self.locked():
            for slot in range(self.slots):
                if self.cells[2 * slot] == process + 1:
                    self.cells[2 * slot] = self.cells[2 * slot + 1] = 0


class StreamSlots:
    """Takes and frees the slots: in `cells` (two per slot, as `StreamSlotTable` lays them out),
    this process's own list, or the table's mapping (`table`) shared with the other fronts, whose
    lock every change takes. `process`: this process's worker slot."""

    def __init__(self, limit: int, table: StreamSlotTable | None = None, process: int = 0) -> None:
        self.limit = limit if table is None else min(limit, table.slots)
        self.share = max(1, self.limit // 2)
        self.table = table
        self.cells: MutableSequence[int] = table.cells if table is not None else [0] * (2 * self.limit)
        self.process = process

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """The table's lock under `--workers`; nothing in one process (only its event loop changes the slots)."""
        return self.table.locked() if self.table is not None else contextlib.nullcontext()

    def take(self, owner: str) -> int:
        """The lowest free slot, for the client at address `owner`; `NoStreamSlot` when `limit`
        streams are open, or when `owner` holds its share of them (half: one client opening them
        all, each kept open by a frame a minute, held every other client out)."""
        key = owner_key(owner)
        with self.locked():
            held = [self.cells[2 * slot + 1] for slot in range(self.limit) if self.cells[2 * slot]]
            if len(held) >= self.limit:
                raise NoStreamSlot(f"the server holds its limit of {self.limit} streams (GANSERVE_MAX_STREAMS, and half of "
                                   "GANSERVE_MAX_CONNECTIONS at most); retry later")
            if held.count(key) >= self.share:
                raise NoStreamSlot(f"this client already holds {self.share} streams, its share of the {self.limit} this server "
                                   "holds (half of that limit); close one first")
            slot = next(slot for slot in range(self.limit) if not self.cells[2 * slot])
            self.cells[2 * slot], self.cells[2 * slot + 1] = self.process + 1, key
        return slot + 1

    def free(self, number: int) -> None:
        """Frees slot `number` (1 … limit), if this process holds it."""
        slot = number - 1
        with self.locked():
            if 0 <= slot < self.limit and self.cells[2 * slot] == self.process + 1:
                self.cells[2 * slot] = self.cells[2 * slot + 1] = 0


def stream_limit(max_streams: int, max_connections: int) -> int:
    """Streams the server takes at once: GANSERVE_MAX_STREAMS, and at most half the connection cap
    (a stream holds a connection no newcomer can take: 16 streams of 4 addresses filled
    GANSERVE_MAX_CONNECTIONS=16 under GANSERVE_MAX_STREAMS=32, a re-probe)."""
    return max(1, min(max_streams, max_connections // 2))


def stream_slots_for(max_streams: int, max_connections: int, run_dir: Path | None, process: int) -> StreamSlots:
    """This process's slots, or under `--workers` the server's, in the table the supervisor made."""
    limit = stream_limit(max_streams, max_connections)
    if run_dir is None:
        return StreamSlots(limit)
    return StreamSlots(limit, StreamSlotTable(run_dir / STREAM_SLOTS_FILE), process)
