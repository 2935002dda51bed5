"""How much of this process's cores other processes keep busy, read off the kernel's counters.

The lanes of a process know their own jobs (service/lanes.py `SharedDevice`), but not a second
server on the same machine, the `--workers` fronts parsing and encoding beside the engine, Ray
replicas beside each other, or a backup job. Under such load admitted upscales ran 1.6-2.7x their
estimate and some answered 504 (a hostile probe, load average 2-8 on 2 cores), and a model idle
for a minute had its running correction faded back to 1 while the load stayed. Linux counts every
CPU's busy time (`/proc/stat`, steal included: another VM's turn on the same core) and this
process's own (`os.times`); the difference over the last half second is what the others took.
Elsewhere (no `/proc/stat`) it reads 0: the estimate is then what it was before.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

SAMPLE_INTERVAL_S = 0.5  # the shortest span a reading covers (the kernel counts in 10 ms ticks)
FALLING = 0.5  # a lower reading moves it this far down per span; a higher one is taken at once
SATURATED = 0.85  # a span whose CPUs were this busy hides how much more the others wanted
MAX_DEMAND_PER_CPU = 4.0  # the most cores' worth of demand a reading may infer per CPU
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (idle and iowait are not busy)
PROC_STAT = Path("/proc/stat")


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity; every CPU where that cannot be read)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def busy_cpu_seconds(cpus: set[int], read: Callable[[], str] = lambda: PROC_STAT.read_text()) -> float | None:
    """The busy seconds the kernel has counted on these CPUs since boot (None without `/proc/stat`)."""
    try:
        text = read()
    except OSError:
        return None
    ticks = 0
    for line in text.splitlines():
        name, _, fields = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = fields.split()
            ticks += sum(int(values[i]) for i in BUSY_FIELDS if i < len(values))
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process's CPU seconds, every thread's (the runtimes' intra-op pools included)."""
    times = os.times()
    return times.user + times.system


def process_cpu_seconds(pid: int, reaped: bool = False) -> float:
    """A process's CPU seconds off `/proc/<pid>/stat` (0 where it is gone); with `reaped`, its
    children's that it has waited for too (a front that died and was replaced keeps counting)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def sibling_cpu_seconds(supervisor: int, own_pid: int) -> float:
    """The CPU seconds of a `--workers` server's other processes, as seen by its engine: the
    supervisor (`supervisor`) and its children but `own_pid` (the fronts), reaped ones included.
    To the engine they are the same server: in one process the HTTP parsing and the encoder pool
    are its own threads, not other processes."""
    try:
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    except OSError:
        children = []
    return process_cpu_seconds(supervisor, reaped=True) + sum(process_cpu_seconds(int(pid)) for pid in children if int(pid) != own_pid)


class OtherLoad:
    """How many cores' worth of work other processes on this process's CPUs wanted lately, read at
    most once a half-second span (a file read of ~30 µs), whoever asks.

    What they *used* is busy time less this process's own. While the CPUs were free that is what
    they wanted; while they were saturated it is only their part of the sharing: two loops
    spinning beside a lane computing on both cores got one core between them. There the kernel's
    sharing by threads is inverted: their demand over this process's is what they used over what
    it used, and this process's is its lanes' (`own_demand`: the cores its running jobs asked
    for, averaged over the span). A higher reading is taken at once, a lower one halfway per
    span: quick to see load arrive, slow to trust that it left.

    `helpers`: the CPU seconds of processes that are part of this server (a `--workers` engine's
    fronts and supervisor, `sibling_cpu_seconds`): their use counts as this process's own, and
    their demand as what they used. Counted as other processes, they made a `--workers` engine
    refuse what one process admits (the first upscale of a test, 503 "other processes want about
    0.6 of this machine's 2 cores", on a CI machine)."""

    def __init__(self, cpus: set[int] | None = None, busy: Callable[[set[int]], float | None] = busy_cpu_seconds,
                 own: Callable[[], float] = own_cpu_seconds, clock: Callable[[], float] = time.monotonic,
                 own_demand: Callable[[], float] | None = None, helpers: Callable[[], float] | None = None) -> None:
        self.cpus = cpus if cpus is not None else usable_cpus()
        self._busy, self._own, self._clock = busy, own, clock
        self.own_demand = own_demand  # core-seconds this process's lanes asked for since it began (`SharedDevice`)
        self.helpers = helpers
        self._lock = threading.Lock()
        self._cores = 0.0
        self._last = self._read()

    def _read(self) -> tuple[float, float, float, float] | None:
        busy = self._busy(self.cpus)
        if busy is None:
            return None
        helped = self.helpers() if self.helpers else 0.0  # used by the server's other processes: wanted as much
        return (self._clock(), busy, self._own() + helped, (self.own_demand() if self.own_demand else 0.0) + helped)

    def cores(self) -> float:
        """Cores' worth of work other processes wanted lately (0 up to MAX_DEMAND_PER_CPU a CPU)."""
        if self._last is None:
            return 0.0
        with self._lock:
            if self._clock() - self._last[0] >= SAMPLE_INTERVAL_S and (now := self._read()) is not None:
                (then, busy, own, asked), (at, busy_now, own_now, asked_now) = self._last, now
                span, cpus = at - then, len(self.cpus)
                used, mine = max(0.0, (busy_now - busy) / span), max(0.0, (own_now - own) / span)
                others = max(0.0, used - mine)
                wanted = (asked_now - asked) / span  # cores this process's lanes asked for
                if used >= SATURATED * cpus and wanted > 0.05 and mine > 0.05:
                    others *= wanted / mine
                others = min(others, MAX_DEMAND_PER_CPU * cpus)
                self._cores = others if others >= self._cores else self._cores - FALLING * (self._cores - others)
                self._last = now
            return self._cores

    def share(self) -> float:
        """Their demand over this process's CPUs (1: as much as all of them; may be more)."""
        return self.cores() / max(1, len(self.cpus))
