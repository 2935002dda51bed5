"""Front processes' heartbeats (`ganserve serve --workers N`): how the supervisor tells a hung
front from a busy one.

The supervisor restarted a front that exited, but not one that stopped answering while alive (a
native deadlock, a stop signal, an event loop held by something): the kernel kept handing it new
connections in the port's SO_REUSEPORT group, so about one client in N waited out its timeout
for as long as it hung (a hostile probe: 7 of 11 fresh requests hung while one of two fronts was
stopped, and nothing was logged).

Each front's event loop writes the time (CLOCK_MONOTONIC, the same clock in every process) into
its slot of a file the supervisor made, every `BEAT_INTERVAL_S`; the supervisor kills a front
whose slot has not moved for `FRONT_SILENT_S` and starts another, as for one that died. The
engine beats in slot 0 once its models loaded; one silent for `GANSERVE_STUCK_COMPUTE_S` (at
least `FRONT_SILENT_S`) stops the server. A slot
is looked at only once its process has beaten (start-up imports torch before the loop runs).
"""
from __future__ import annotations

import asyncio
import time

from service.shared_cells import SharedCells

HEARTBEATS_FILE = "heartbeats"  # in the supervisor's run directory, one int64 per process slot
BEAT_INTERVAL_S = 0.5
FRONT_SILENT_S = 10.0  # a front's event loop that has not turned for this long is taken for hung


class HeartbeatTable(SharedCells):
    """One int64 per process slot (the engine 0, the fronts 1 … N): the monotonic nanoseconds of
    its last beat, 0 before its first. A process writes only its own slot."""

    def beat(self, slot: int) -> None:
        self.cells[slot] = time.monotonic_ns()

    def silent_s(self, slot: int) -> float:
        """Seconds since the slot's last beat; 0 before its first."""
        last = self.cells[slot]
        return (time.monotonic_ns() - last) / 1e9 if last else 0.0

    def clear(self, slot: int) -> None:
        """A replacement process starts unwatched until it beats."""
        self.cells[slot] = 0


def engine_silent_limit_s(stuck_after_s: float) -> float:
    """How long the engine's slot may be silent before the supervisor kills it and stops the
    server: GANSERVE_STUCK_COMPUTE_S, never under FRONT_SILENT_S (a limit of half a second, below
    the beat's own interval, killed a healthy engine)."""
    return max(stuck_after_s, FRONT_SILENT_S)


async def keep_beating(table: HeartbeatTable, slot: int, interval_s: float = BEAT_INTERVAL_S, after: asyncio.Event | None = None) -> None:
    """Beats for as long as this process's event loop turns (cancelled at shutdown); from when
    `after` is set, where given (the engine's models loaded: creating a runtime's session may hold
    the interpreter's lock for as long as the model takes to load)."""
    if after is not None:
        await after.wait()
    while True:
        table.beat(slot)
        await asyncio.sleep(interval_s)
