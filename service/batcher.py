"""The dynamic batcher: one queue per (model, version, operation), items not requests.

A worker takes up to `max_batch_size` items, or waits at most `max_queue_delay_ms` after the
first one, then runs one forward pass on its model's lane. A batch is capped by cost as well as
by count: it stops where its measured cost (service/costs.py) would pass `max_batch_seconds`, so
62 super-resolution tiles are never one 56-second pass on a CPU while 64 digits still are one
pass of a millisecond. The queue is bounded (QueueFull → 429; a request larger than the whole
queue → RequestTooLarge, a permanent 413); items whose request expired or went away are dropped
before compute; items of different shapes never share a batch; on out-of-memory the batch is
split and retried and the cap lowered. `close()` refuses new work and drains what was accepted.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from collections.abc import AsyncIterator, Callable

import numpy as np

from service.costs import GraphCost
from service.lanes import Lane
from service.metrics import ServiceMetrics
from service.runtimes import OutOfMemory


# A lone item whose measured compute is under this runs on the event loop: handing it to the lane's
# thread and back costs ~45-90 µs of the loop's time and ~0.15 ms of latency on the 2-core machine,
# a third or more of a tiny generator's forward pass (DCGAN-32, one image: ~0.15 ms). Larger
# batches, and every item of a costlier model, run on the lane.
INLINE_COMPUTE_MAX_S = 0.0004


class QueueFull(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("queue full")
        self.retry_after_s = retry_after_s


class RequestTooLarge(Exception):
    """More items than the queue can ever hold: retrying cannot help."""


class ShuttingDown(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


@dataclass(frozen=True)
class BatchKey:
    model: str
    version: int
    operation: str

    @property
    def labels(self) -> tuple[str, str, str]:
        return (self.model, str(self.version), self.operation)


@dataclass
class RequestState:
    """Shared by a request's items: once cancelled (deadline, disconnect), they are skipped."""

    deadline: float  # time.monotonic() seconds
    # the server's deadline, where the client asked for a shorter one (v2's `timeout`): what the request's booking
    # protects against work admitted beside it later (`admission.admit`'s `protected_s`); None: `deadline`
    protected_until: float | None = None
    cancelled: bool = False
    lane_seconds: float = 0.0  # what admission added to the lane's backlog for it, not yet settled by its items
    # the lane that backlog was added to: a reload hands a waiting request's items to the replacement's
    # batcher, on another lane, whose backlog its shares were taken off (under-counted there, left on the old one)
    lane: Lane | None = None
    timing: dict[str, float] | None = None  # the request's stage seconds (Server-Timing): longest queue wait, compute of its batches
    items_batched: int = 0  # its items taken into batches so far: who goes first when a batch cannot take one of each
    slight: bool = False  # admitted as a push too slight to be refused (`admission.is_slight`): its lane's steady demand counts its items

    def alive(self, now: float) -> bool:
        return not self.cancelled and now < self.deadline

    @property
    def protected_deadline(self) -> float:
        return self.deadline if self.protected_until is None else max(self.deadline, self.protected_until)


@dataclass(eq=False)
class WorkItem:
    inputs: dict[str, np.ndarray]  # one item's arrays, no batch axis
    request: RequestState
    future: asyncio.Future
    units: float = 1.0  # its cost units (service/costs.py)
    seconds: float = 0.0  # its estimated compute: what its end takes off the lane's backlog
    enqueued: float = field(default_factory=time.monotonic)
    batched: bool = False  # taken into a batch (service/batcher.py: take_batch)

    @property
    def signature(self) -> tuple:
        return tuple((name, a.shape, a.dtype.str) for name, a in sorted(self.inputs.items()))


class DynamicBatcher:
    assembles_tiles = False  # tile outputs come back one by one, to be assembled by the caller (service/upscaling.py)

    def __init__(self, key: BatchKey, run_batch: Callable[[dict[str, np.ndarray]], np.ndarray], lane: Lane,
                 metrics: ServiceMetrics, max_batch_size: int, max_queue_delay_ms: float, max_queue_size: int,
                 cost: GraphCost | None = None, max_batch_seconds: float = math.inf, pad_to: list[int] | None = None) -> None:
        self.key = key
        self.run_batch = run_batch
        self.lane = lane
        self.metrics = metrics.bound(*key.labels)
        self.max_batch_size = max_batch_size  # lowered after an out-of-memory
        if cost is not None and cost.reference_pixels is None:  # an item is a unit
            self.max_batch_size = cost.capped_batch_size(max_batch_size)
        self.max_queue_delay = max_queue_delay_ms / 1000
        self.max_queue_size = max_queue_size
        self.cost = cost
        self.max_batch_seconds = max_batch_seconds
        self.pad_to = pad_to  # warmed batch sizes a batch is padded up to (None: no padding)
        self.queue: deque[WorkItem] = deque()
        self.wakeup = asyncio.Event()
        self.accepting = True
        self.running: set[asyncio.Task] = set()
        self.loop = asyncio.get_running_loop()
        self.worker = self.loop.create_task(self.work(), name=f"batcher-{key}")

    # --- the request side -------------------------------------------------------------------
    def submit(self, inputs: list[dict[str, np.ndarray]], request: RequestState) -> list[asyncio.Future]:
        """Queues all of a request's items or none of them; one future per item, in order."""
        return [item.future for item in self.submit_items(inputs, request)]

    def submit_items(self, inputs: list[dict[str, np.ndarray]], request: RequestState,
                     admit: Callable[[float], None] | None = None) -> list[WorkItem]:
        """`submit`, returning the queued items themselves, whose `seconds` the engine adds to its
        lane's backlog without pricing each item a second time. `admit(seconds)`, given the items'
        estimated compute, may refuse them (raise) before any is queued."""
        if not self.accepting:
            raise ShuttingDown()
        if len(inputs) > self.max_queue_size:
            self.metrics.rejected("too_large").inc()
            raise RequestTooLarge(f"{len(inputs)} items; this queue holds at most {self.max_queue_size}")
        if len(self.queue) + len(inputs) > self.max_queue_size:
            self.metrics.rejected("queue_full").inc()
            # what is ahead drains at the lane's pace (at least one batch's time)
            raise QueueFull(retry_after_s=max(1.0, self.lane.expected_wait_s()))
        loop = self.loop
        items = []
        for item in inputs:
            units = self.cost.units(item) if self.cost else 1.0
            seconds = self.cost.item_seconds(units) if self.cost else 0.0
            items.append(WorkItem(item, request, loop.create_future(), units, seconds))
        if admit is not None:
            admit(sum(item.seconds for item in items))
        self.queue.extend(items)
        self.metrics.queue_items.set(len(self.queue))
        self.wakeup.set()
        return items

    # --- the worker side --------------------------------------------------------------------
    async def work(self) -> None:
        while True:
            if not self.queue:
                if not self.accepting:
                    break
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            await self.lane.slots.acquire()  # natural batching: items gather while the lane is busy
            await self.wait_for_batch()
            batch = self.take_batch() if self.queue else []
            if not batch:
                self.lane.slots.release()
                continue
            if self.runs_inline(batch):
                try:
                    self.execute_inline(batch)
                finally:
                    self.release(batch)
                continue
            task = self.loop.create_task(self.execute_in_slot(batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
        if self.running:
            await asyncio.gather(*self.running)

    async def wait_for_batch(self) -> None:
        """Until the queue holds a full batch or the first item has waited max_queue_delay.

        With max_queue_delay_ms = 0 this is natural batching: whatever queued up while the
        previous batch ran goes together, and an idle device never waits."""
        while self.queue and len(self.queue) < self.max_batch_size and self.accepting:
            remaining = self.queue[0].enqueued + self.max_queue_delay - time.monotonic()
            if remaining <= 0:
                return
            self.wakeup.clear()
            timer = self.loop.call_later(remaining, self.wakeup.set)
            await self.wakeup.wait()
            timer.cancel()

    def fits(self, batch: list[WorkItem], units: float, item: WorkItem) -> bool:
        """Room for `item`: under the item cap, and under the cost caps (seconds; the units warm-up
        found to fit the device's memory) unless the batch is empty."""
        if len(batch) >= self.max_batch_size:
            return False
        if not batch or self.cost is None:
            return True
        if self.cost.max_batch_units is not None and units + item.units > self.cost.max_batch_units:
            return False
        return self.cost.batch_seconds(units + item.units, corrected=False, item_units=item.units) <= self.max_batch_seconds

    def take_batch(self) -> list[WorkItem]:
        """Live items, up to the item and cost caps; dead items are dropped here.

        Not plain first-in first-out. First the items of requests whose deadline is at risk
        (earliest deadline first), then one item of each other waiting request (those with the
        fewest items batched so far first, then by arrival), then the rest in order. A single
        image queued behind two clients' 64-image requests waited for all 128 (6-16 s against
        1.4 s on a 256-px StyleGAN in a probe): now it is in the next batch. A request's own items
        keep their order; large requests among themselves stay nearly first-come first-served,
        which finishes each sooner than sharing. A request is at risk once it has waited half of
        its time, or its remaining compute, twice over, no longer fits before its deadline:
        newcomers cannot starve it. The batch takes the shape of its first item."""
        now = time.monotonic()
        live: list[WorkItem] = []
        firsts: dict[int, WorkItem] = {}  # each request's oldest waiting item
        pending_s: dict[int, float] = {}  # each request's estimated compute still queued
        for item in self.queue:
            if not item.request.alive(now) or item.future.done():
                reason = "deadline" if now >= item.request.deadline else "cancelled"
                self.metrics.rejected(reason).inc()
                self.settle(item)
                if not item.future.done():
                    item.future.set_exception(DeadlineExceeded())
                continue
            live.append(item)
            firsts.setdefault(id(item.request), item)
            pending_s[id(item.request)] = pending_s.get(id(item.request), 0.0) + item.seconds

        batch: list[WorkItem] = []
        if live:
            order = live
            if len(firsts) > 1:
                at_risk = {key for key, first in firsts.items()
                           if now - first.enqueued > (first.request.deadline - first.enqueued) / 2
                           or first.request.deadline - now < 2 * pending_s[key]}
                # (sorts are stable: a request's items keep their order, and arrival breaks ties)
                urgent = sorted((item for item in live if id(item.request) in at_risk), key=lambda item: item.request.deadline)
                turns = sorted((first for key, first in firsts.items() if key not in at_risk), key=lambda item: item.request.items_batched)
                order = [*urgent, *turns, *live]
            signature = order[0].signature
            units = 0.0
            for item in order:
                if len(batch) >= self.max_batch_size:
                    break
                if not item.batched and item.signature == signature and self.fits(batch, units, item):
                    batch.append(item)
                    units += item.units
                    item.batched = True
                    item.request.items_batched += 1
        self.queue = deque(item for item in live if not item.batched)
        self.metrics.queue_items.set(len(self.queue))
        for item in batch:
            waited = now - item.enqueued
            self.metrics.queue_duration.observe(waited)
            if (timing := item.request.timing) is not None and waited > timing.get("queue", 0.0):
                timing["queue"] = waited
        return batch

    async def execute_in_slot(self, batch: list[WorkItem]) -> None:
        try:
            await self.execute(batch)
        finally:
            self.release(batch)

    def release(self, batch: list[WorkItem]) -> None:
        for item in batch:
            self.settle(item)
        self.lane.slots.release()

    def runs_inline(self, batch: list[WorkItem]) -> bool:
        """A lone item of a tiny graph: see INLINE_COMPUTE_MAX_S."""
        return (len(batch) == 1 and self.cost is not None and self.cost.batch_seconds(batch[0].units, item_units=batch[0].units) < INLINE_COMPUTE_MAX_S
                and (not self.pad_to or self.pad_to[0] == 1))

    def execute_inline(self, batch: list[WorkItem]) -> None:
        stacked = {name: item[None] for name, item in batch[0].inputs.items()}
        started = time.perf_counter()
        try:
            outputs = self.run_batch(stacked)
        except Exception as error:  # a broken model (or out of memory on one item) fails the item, never the worker
            self.fail(batch, error)
            return
        self.deliver(batch, outputs, started)

    def settle(self, item: WorkItem) -> None:
        """An item is done (or dropped): its share of its request's admitted backlog leaves the lane."""
        share = min(item.seconds, item.request.lane_seconds)
        item.request.lane_seconds -= share
        (item.request.lane or self.lane).remove_backlog(share)

    def padded(self, stacked: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
        """The batch with copies of its last item up to the nearest warmed size (outputs past
        `size` are never handed out: `deliver` zips them with the real items)."""
        target = next((s for s in self.pad_to or () if s >= size), size)
        if target == size:
            return stacked
        self.metrics.padded_items.inc(target - size)
        return {name: np.concatenate([array, np.repeat(array[-1:], target - size, axis=0)]) for name, array in stacked.items()}

    async def execute(self, batch: list[WorkItem]) -> None:
        stacked = self.padded({name: np.stack([item.inputs[name] for item in batch]) for name in batch[0].inputs}, len(batch))
        started = time.perf_counter()
        try:
            outputs, stretch = await self.lane.run_timed(self.run_batch, stacked)
        except OutOfMemory as error:
            if len(batch) == 1:
                self.fail(batch, error)
                return
            half = len(batch) // 2
            self.max_batch_size = max(1, min(self.max_batch_size, half))
            self.metrics.rejected("oom_split").inc()
            await self.execute(batch[:half])
            await self.execute(batch[half:])
            return
        except Exception as error:  # a broken model fails its batch, never the worker
            self.fail(batch, error)
            return
        self.deliver(batch, outputs, started, stretch)

    def deliver(self, batch: list[WorkItem], outputs: np.ndarray, started: float, stretch: float = 1.0) -> None:
        """A batch's outputs to its items' futures, with its cost and metrics recorded (`stretch`:
        how much longer the device's other jobs made it take, `Lane.run_timed`)."""
        elapsed = time.perf_counter() - started
        if self.cost is not None:
            self.cost.observe(sum(item.units for item in batch), elapsed, min(item.units for item in batch), stretch)
        self.metrics.compute_duration.observe(elapsed)
        self.metrics.batch_items.observe(len(batch))
        for request in {id(item.request): item.request for item in batch}.values():
            if request.timing is not None:
                request.timing["compute"] = request.timing.get("compute", 0.0) + elapsed
        if slight := sum(item.seconds for item in batch if item.request.slight):
            self.lane.count_slight(slight)
        for item, output in zip(batch, outputs):
            if not item.future.done():
                item.future.set_result(output)

    @staticmethod
    def fail(batch: list[WorkItem], error: Exception) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    async def close(self) -> None:
        """Refuse new items, finish every accepted one, stop the worker."""
        self.accepting = False
        self.wakeup.set()
        await self.worker


async def wait_items(futures: list[asyncio.Future], request: RequestState) -> list[np.ndarray]:
    """A request's outputs, in order. The request's deadline and its client's hang-up cancel the
    waiting task (service/pipeline.py); then, or when one item fails, what has not run yet is
    dropped. Items whose deadline passes in the queue fail with DeadlineExceeded."""
    try:
        if len(futures) == 1:
            return [await futures[0]]
        return list(await asyncio.gather(*futures))
    except BaseException:
        request.cancelled = True  # the worker drops what has not run yet
        for future in futures:
            future.cancel()
        raise


async def each_result(futures: list[asyncio.Future], request: RequestState) -> AsyncIterator[tuple[int, np.ndarray]]:
    """(index, output) of a request's items as they complete, until its deadline (then
    DeadlineExceeded); what has not run is cancelled when the caller stops early."""
    index = {future: i for i, future in enumerate(futures)}
    pending = set(futures)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=max(0.0, request.deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise DeadlineExceeded()
            for future in sorted(done, key=index.__getitem__):
                yield index[future], future.result()
    finally:
        if pending:
            request.cancelled = True
            for future in pending:
                future.cancel()


async def run_items(batcher: DynamicBatcher, inputs: list[dict[str, np.ndarray]], request: RequestState) -> list[np.ndarray]:
    """Submits a request's items and waits for all of them until the request's deadline."""
    return await wait_items(batcher.submit(inputs, request), request)
