"""Compute lanes (Triton's instance groups): each model runs its batches on its own threads, so a
slow model queues behind itself only.

A lane has `threads` slots: that many batches of its model may run at once (each runtime call
also uses its own intra-op threads). On a CPU the lanes share the cores through the OS
scheduler: a lane busy with a 10-second translate holds one thread's share, and a DCGAN lane
beside it still gets its slice every few milliseconds instead of waiting for the translate to
end. The lane also keeps its backlog, the estimated seconds of every item queued or running on
it, which is what admission compares with a request's deadline, and how long it has had nothing
to do (`idle_for`), which is when the server may time its models again (service/remeasure.py).

The threads take work from a plain queue and hand results back with one
`call_soon_threadsafe`: half the cost of `run_in_executor`'s concurrent.futures round trip
(measured on the 2-core machine: ~45 µs against ~90 µs per hop, paid once per batch).

Lanes are not independent, though: on one device they share its cores (or the GPU). The lanes of
a device share one `SharedDevice`, which keeps how much of the device the jobs running now ask
for and so how fast each one goes beside the others. A job's *stretch* (its wall time over the
time it would have taken alone) is what lets a batch's cost be judged against its fit without the
other models' work counted as the model's own slowness, and each lane's `bookings` (the requests
admitted to it, each with when its work is projected to end and the latest it may) are what lets
admission see what a new request does to the requests already admitted beside it
(service/admission.py). A backlog is only what is queued now: a model kept busy by a stream of
small requests has almost none at any moment, yet computes the whole time a long request beside
it does, and its requests are each too slight a push on a booked request to be refused for it.
So each lane also keeps its *steady demand*: the seconds of such slight requests it computed
lately, per second, which admission takes to go on for as long as a new request computes.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from service.host_load import usable_cpus

STOP = None  # the sentinel that ends one lane thread
# how long a lane's steady demand remembers (the time constant of its exponential average): a
# stream of small requests shows within it, and a lane left alone is forgotten within a few times it
STEADY_WINDOW_S = 4.0


class SharedDevice:
    """The device the lanes of one process share, seen as processor sharing: a job asks for a
    `share` of it (its runtime's threads over the cores; a GPU's whole), and while the shares of
    the jobs running add up to more than 1 each one goes at 1 / that sum of its own speed alone.
    On a CPU the other processes on the same cores are one more job, of the share they held
    lately (`other_load`, service/host_load.py; a `--workers` front is told the engine's reading).

    `progress` is the integral of that speed over time: between a job's start and end it grows
    by the seconds the job would have taken alone. Updated under a lock by the lane threads, at
    each job's start and end (a few microseconds)."""

    def __init__(self, other_load: OtherShare | None = None) -> None:
        self._lock = threading.Lock()
        self._demand = 0.0  # the shares of the jobs running now
        self._progress = 0.0
        self._asked = 0.0  # core-seconds the jobs have asked for (`asked_core_seconds`)
        self._since = time.perf_counter()
        self._host = 0.0  # the shares of the host work outside every lane running now (`host_work`)
        self._promised = 0.0  # the shares of host work about to start (`promise_host`)
        self._lane_changes = 0  # lane jobs entered and left (`lanes_quiet_since`)
        self.other_load = other_load
        self.reported_other_share: float | None = None  # a front's: the engine's reading, from its snapshots
        self.reported_host_share: float | None = None  # a front's: the engine's `host_share`, from its snapshots
        self.cpus = len(usable_cpus())

    def other_share(self) -> float:
        """Other processes' demand over the device, lately (0: none; 1: as much as all of it)."""
        if self.reported_other_share is not None:
            return self.reported_other_share
        return self.other_load.share() if self.other_load is not None else 0.0

    def other_cores(self) -> float:
        return self.other_share() * self.cpus

    def host_share(self) -> float:
        """The share of the device this process's own work outside every lane asks for now (a
        projection job's optimisation on the CPU: `host_work`), or is promised for when it starts
        (`promise_host`); 0 with none."""
        if self.reported_host_share is not None:
            return self.reported_host_share
        return self._host + self._promised

    def promise_host(self, delta: float) -> None:
        """Host work about to start changed its promise by `delta`: a projection job waiting for
        the requests booked before it (service/jobs.py). Admission counts it (`host_share`), so the
        requests admitted meanwhile are judged beside the job (their bookings say so), which does
        not wait for them too (without it, a smaller upscale admitted while a job waited held it
        2.0 s instead of 1.3, and heavy requests one after another could hold it to its time
        limit); the sharing's timing does not count it, as it computes nothing yet."""
        with self._lock:
            self._promised = max(0.0, self._promised + delta)

    @contextlib.contextmanager
    def host_work(self, threads_share: float, start_share: float | None = None) -> Iterator[HostWork]:
        """Work of this process that runs on the device outside every lane, for as long as it
        runs: a projection job, seconds to minutes of optimisation on torch's intra-op threads.
        It is a job of the sharing (the lanes' batches beside it are timed as stretched by it, not
        as their models' slowness) and admission counts it beside the other processes'
        (`host_share`). It was counted nowhere: the process's own CPU is left out of the other
        processes' reading, so a 320² upscale refused beside another process's light load was
        admitted beside a job, computed 1.8x its estimate and answered 504 (a hostile probe).

        Its share starts at what its threads may ask for (`threads_share`) and follows what it
        is measured using (`HostWork.sample`): a 64-px StyleGAN's projection, on two intra-op
        threads of a 2-core machine, used 0.99 of a core (its steps are small), and an upscale
        beside it took 1.8x its time alone, which that use predicts (`slowdown`: 1.75x), where
        its threads predict 2.5x. `start_share`: where to start instead, when a like piece of work
        was measured before (never above `threads_share`, which stays its ceiling)."""
        work = HostWork(self, threads_share if start_share is None else min(start_share, threads_share), ceiling=threads_share)
        self.resize_host(work.share)
        try:
            yield work
        finally:
            self.resize_host(-work.share)

    def resize_host(self, delta: float) -> None:
        """Host work's share changed by `delta` (it began, was measured again, or ended)."""
        other = self.other_share()
        with self._lock:
            self._advance(other)
            self._demand = max(0.0, self._demand + delta)
            self._host = max(0.0, self._host + delta)

    def lanes_quiet_since(self) -> int | None:
        """A mark of the lanes' activity: equal marks taken at two moments mean no lane job
        entered or left between them; None while a lane job is running."""
        with self._lock:
            return None if self._demand - self._host > 1e-9 else self._lane_changes

    def asked_core_seconds(self) -> float:
        """The cores this process's jobs asked for, integrated over time: what `OtherLoad` weighs
        the other processes' use against while the CPUs were saturated."""
        with self._lock:
            return self._asked + (time.perf_counter() - self._since) * self._demand * self.cpus

    def _advance(self, other: float) -> float:
        now = time.perf_counter()
        elapsed = now - self._since
        self._progress += elapsed / max(1.0, self._demand + (other if self._demand > 0 else 0.0))
        self._asked += elapsed * self._demand * self.cpus
        self._since = now
        return self._progress

    def enter(self, share: float) -> float:
        other = self.other_share()  # (outside the lock: reading it may read `asked_core_seconds`)
        with self._lock:
            progress = self._advance(other)
            self._demand += share
            self._lane_changes += 1
            return progress

    def leave(self, share: float) -> float:
        other = self.other_share()
        with self._lock:
            progress = self._advance(other)
            self._demand = max(0.0, self._demand - share)
            self._lane_changes += 1
            return progress


HOST_WORK_SAMPLE_S = 0.5  # how long a span of host work is before its use is measured
MIN_HOST_SHARE = 0.05  # the least a piece of host work is taken to ask for (it computes, however small its steps)


class HostWork:
    """One piece of host work held on a `SharedDevice`: its share, at first what its threads
    may ask for, then what it used over spans in which no lane computed (`sample`, called by
    the work at each of its steps). In a span where lanes computed, the process's CPU is theirs
    too, and the share stays as it was. `measured`: the most it used over a span that began at a
    step, None before one: the span up to the first step holds the work's set-up (a projection's
    networks built, its first step's warm-up, ~1.3 s), whose use says nothing of the steps'; a
    job of one step counted by it made the next job of its model look half as heavy."""

    def __init__(self, device: SharedDevice, share: float, ceiling: float | None = None) -> None:
        self.device = device
        self.share = share
        self.ceiling = share if ceiling is None else ceiling
        self.measured: float | None = None
        self._stepping = False  # a step has been sampled: spans from here on began at a step
        self._mark: tuple[float, float, int | None] = (time.perf_counter(), time.process_time(), device.lanes_quiet_since())

    def sample(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        then, cpu_then, quiet_then = self._mark
        from_a_step, self._stepping = self._stepping, True
        if wall - then < HOST_WORK_SAMPLE_S:
            if not from_a_step:  # the first step came soon: the next span begins here, not with the set-up
                self._mark = (wall, cpu, self.device.lanes_quiet_since())
            return
        quiet = self.device.lanes_quiet_since()
        if quiet is not None and quiet == quiet_then:  # only this work (and the event loop's little) used the process's CPU
            used = (cpu - cpu_then) / (wall - then) / max(1, self.device.cpus)
            share = min(self.ceiling, max(MIN_HOST_SHARE, used))
            self.device.resize_host(share - self.share)
            self.share = share
            if from_a_step:
                self.measured = max(self.measured or 0.0, share)
        self._mark = (wall, cpu, quiet)


class OtherShare(Protocol):
    """What the device reads of the other processes' load (`service.host_load.OtherLoad`)."""

    def share(self) -> float: ...


def lane_share(device: str, intra_op_threads: int) -> float:
    """How much of the device one job of a lane asks for: a GPU's whole (its kernels take turns),
    or the runtime's threads over the cores this process may use."""
    if device != "cpu":
        return 1.0
    return min(1.0, intra_op_threads / max(1, len(usable_cpus())))


@dataclass(eq=False)
class Booking:
    """An admitted request on its lane: when the lane's work up to its own is projected to end
    (monotonic seconds; moved later when a request admitted beside it will share the device
    meanwhile) and the latest that may be without its deadline being missed; and the share of
    host work (a projection job's, running or promised) it was judged beside, which a job about to
    start does not push it further for (`admission.held_back_by`)."""

    finish: float
    latest: float
    host_share: float = 0.0


@dataclass(eq=False)
class Claim:
    """Room promised to a lane whose request was refused because it would have pushed requests
    admitted beside it past their deadlines: from when its Retry-After ends (`opens`) until a
    second later (`lapses`), or until the lane admits a request, whichever is first."""

    opens: float
    lapses: float


class LaneView(Protocol):
    """What admission reads of a lane: one of this process (`Lane`) or a front's mirror of the
    engine's (`service.front.RemoteLane`)."""

    threads: int
    share: float
    bookings: set[Booking]
    claim: Claim | None

    def expected_wait_s(self) -> float: ...

    def steady_demand(self) -> float: ...


LANE_STOP_POLL_S = 0.01  # how often a stopping lane is looked at (its last job ran for ~1 ms to seconds)


class Lane:
    def __init__(self, name: str, threads: int, device: SharedDevice | None = None, share: float = 1.0) -> None:
        self.name = name
        self.threads = threads
        self.device = device  # shared with the other lanes of this process (None: timed alone)
        self.share = share  # how much of the device one of its jobs asks for (min(1, runtime threads / cores); 1 on a GPU)
        self.bookings: set[Booking] = set()  # the requests admitted here and not yet ended
        self.claim: Claim | None = None  # room promised to this lane's refused request (service/admission.py)
        self.backlog_s = 0.0  # estimated seconds of the items queued or running here
        self.pending = 0  # jobs queued or running (counted on the loop's thread)
        self.last_done = time.monotonic()  # when the last of them ended
        self._slight_s = 0.0  # the seconds of slight requests computed here, decayed to `_slight_at` (`steady_demand`)
        self._slight_at = time.monotonic()
        self._slots: asyncio.Semaphore | None = None
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        # per thread: when the watched job it runs began (None: idle, or loading); each thread writes its own cell
        self._started: list[float | None] = [None] * threads
        self._threads = [threading.Thread(target=self._serve, args=(i,), name=f"lane-{name}_{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def slots(self) -> asyncio.Semaphore:
        """Created on first use, inside the running loop."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.threads)
        return self._slots

    def run(self, function: Callable[..., Any], *args: Any, watched: bool = True) -> asyncio.Future:
        """`function(*args)` on one of the lane's threads; the future resolves on the caller's loop.
        `watched`: counted by `running_for` (serving work, bounded by the deadlines it serves; a
        model's load and warm-up is not: a graph compile may take minutes)."""
        return self._queue(function, args, timed=False, watched=watched)

    def run_timed(self, function: Callable[..., Any], *args: Any) -> asyncio.Future:
        """`run`, resolving to `(result, stretch)`: the job's wall time over what the device's
        sharing says it would have taken alone (1 with nothing else running, ~2 beside one other
        job asking for the whole device)."""
        return self._queue(function, args, timed=True, watched=True)

    def _queue(self, function: Callable[..., Any], args: tuple, timed: bool, watched: bool) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending += 1
        self._work.put((loop, future, function, args, timed, watched))
        return future

    def running_for(self) -> float:
        """How long the longest-running watched job now on the lane has run (0 with none): a
        batch past every deadline it could serve is stuck (a wedged runtime, driver or device),
        and only a restart frees its thread (`ModelRegistry.stuck_lanes`, /health/live)."""
        now = time.monotonic()
        return max((now - started for started in list(self._started) if started is not None), default=0.0)

    def idle_for(self) -> float:
        """Seconds since the lane last had work queued or running; 0 while it has some."""
        return 0.0 if self.pending else time.monotonic() - self.last_done

    def _serve(self, index: int) -> None:
        while (job := self._work.get()) is not STOP:
            loop, future, function, args, timed, watched = job
            if future.cancelled():
                self._hand_back(loop, future, None, None)
                continue
            started = time.perf_counter()
            progress = self.device.enter(self.share) if self.device is not None else 0.0
            if watched:
                self._started[index] = time.monotonic()
            try:
                try:
                    result = function(*args)
                finally:
                    self._started[index] = None
            except BaseException as error:  # handed to the awaiting coroutine, as an executor would
                self._left(progress)
                self._hand_back(loop, future, None, error)
            else:
                alone = self._left(progress)
                if timed:
                    wall = time.perf_counter() - started
                    result = (result, wall / alone if alone > 0 else 1.0)
                self._hand_back(loop, future, result, None)

    def _hand_back(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        """Settles `future` on its loop's thread; nothing when that loop has closed: a stop does not
        wait for a stuck lane (`ModelRegistry.unless_stuck`), and its batch may end after it."""
        with contextlib.suppress(RuntimeError):  # call_soon_threadsafe on a closed loop
            loop.call_soon_threadsafe(self._settle, future, result, error)

    def _left(self, entered_at: float) -> float:
        """The seconds the job that entered the device at `entered_at` would have taken alone."""
        return self.device.leave(self.share) - entered_at if self.device is not None else 0.0

    def _settle(self, future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        self.pending -= 1
        self.last_done = time.monotonic()
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def add_backlog(self, seconds: float) -> None:
        self.backlog_s += seconds

    def remove_backlog(self, seconds: float) -> None:
        self.backlog_s = max(0.0, self.backlog_s - seconds)

    def expected_wait_s(self) -> float:
        """How long new work waits for the work already here, with every slot busy."""
        return self.backlog_s / self.threads

    def count_slight(self, seconds: float) -> None:
        """Items of slight requests (`admission.is_slight`) computed here, of `seconds` estimated
        lane seconds (the batcher's `deliver`: computed, not admitted, so that requests dropped
        before compute, or refused inside their work as an upload that does not decode, ask for
        nothing; a probe's 89-byte broken PNGs at 15 a second had every 224² upscale beside them
        refused on 4 % of a core). Held to a full window's worth, so a burst is forgotten as fast
        as a lane that was busy throughout."""
        now = time.monotonic()
        decayed = self._slight_s * math.exp((self._slight_at - now) / STEADY_WINDOW_S)
        self._slight_s = min(decayed + seconds, STEADY_WINDOW_S * self.threads)
        self._slight_at = now

    def steady_demand(self) -> float:
        """The share of its slots' time the slight requests computed here lately took (0: none;
        1: as much as every slot can do): an exponential average over STEADY_WINDOW_S. A stream of
        small requests keeps the backlog near zero but this near the share of the device it takes
        (admission's `steady_share`). Heavier requests are left out: admission refuses those that
        would push a booked request past its deadline (`crowded_out`), so they cannot stretch it
        past its deadline and are counted where they are queued."""
        decayed = self._slight_s * math.exp((self._slight_at - time.monotonic()) / STEADY_WINDOW_S)
        return min(1.0, decayed / STEADY_WINDOW_S / self.threads)

    def shutdown(self, wait: bool = True) -> None:
        """Ends the threads once the work already queued is done (`wait`: and waits for them)."""
        for _ in self._threads:
            self._work.put(STOP)
        if wait:
            for thread in self._threads:
                thread.join()

    def ended(self) -> bool:
        """Whether every thread has stopped (after `shutdown`)."""
        return not any(thread.is_alive() for thread in self._threads)

    async def stopped(self) -> None:
        """`shutdown` without a thread waiting on the join: an executor thread joined on a wedged
        lane would never return, and the interpreter waits for the default executor's threads at
        exit (the lane's own are daemons). Polled: a lane stops within its last job."""
        self.shutdown(wait=False)
        while not self.ended():
            await asyncio.sleep(LANE_STOP_POLL_S)

