"""The dynamic batcher: one queue per (model, version, operation), items not requests.

A worker takes up to `max_batch_size` items, or waits at most `max_queue_delay_ms` after the
first one, then runs one forward pass on the shared compute thread. The queue is bounded
(QueueFull → 429); items whose request expired or went away are dropped before compute; items
of different shapes never share a batch; on out-of-memory the batch is split and retried and the
cap lowered. `close()` refuses new work and drains what was accepted.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from service.metrics import ServiceMetrics
from service.runtimes import OutOfMemory


class QueueFull(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("queue full")
        self.retry_after_s = retry_after_s


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
    cancelled: bool = False

    def alive(self, now: float) -> bool:
        return not self.cancelled and now < self.deadline


@dataclass(eq=False)
class WorkItem:
    inputs: dict[str, np.ndarray]  # one item's arrays, no batch axis
    request: RequestState
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def signature(self) -> tuple:
        return tuple((name, a.shape, a.dtype.str) for name, a in sorted(self.inputs.items()))


class DynamicBatcher:
    def __init__(self, key: BatchKey, run_batch: Callable[[dict[str, np.ndarray]], np.ndarray], compute: Executor,
                 metrics: ServiceMetrics, max_batch_size: int, max_queue_delay_ms: float, max_queue_size: int) -> None:
        self.key = key
        self.run_batch = run_batch
        self.compute = compute
        self.metrics = metrics.bound(*key.labels)
        self.max_batch_size = max_batch_size  # lowered after an out-of-memory
        self.max_queue_delay = max_queue_delay_ms / 1000
        self.max_queue_size = max_queue_size
        self.queue: deque[WorkItem] = deque()
        self.wakeup = asyncio.Event()
        self.accepting = True
        self.last_compute_s = 0.01
        self.worker = asyncio.get_running_loop().create_task(self.work(), name=f"batcher-{key}")

    # --- the request side -------------------------------------------------------------------
    def submit(self, inputs: list[dict[str, np.ndarray]], request: RequestState) -> list[asyncio.Future]:
        """Queues all of a request's items or none of them."""
        if not self.accepting:
            raise ShuttingDown()
        if len(self.queue) + len(inputs) > self.max_queue_size:
            self.metrics.rejected("queue_full").inc()
            # the queue drains at about one batch per compute time
            batches_ahead = (len(self.queue) + len(inputs)) / max(self.max_batch_size, 1)
            raise QueueFull(retry_after_s=max(1.0, batches_ahead * self.last_compute_s))
        loop = asyncio.get_running_loop()
        items = [WorkItem(item, request, loop.create_future()) for item in inputs]
        self.queue.extend(items)
        self.metrics.queue_items.set(len(self.queue))
        self.wakeup.set()
        return [item.future for item in items]

    # --- the worker side --------------------------------------------------------------------
    async def work(self) -> None:
        while True:
            if not self.queue:
                if not self.accepting:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            await self.wait_for_batch()
            batch = self.take_batch()
            if batch:
                await self.execute(batch)

    async def wait_for_batch(self) -> None:
        """Until the queue holds a full batch or the first item has waited max_queue_delay.

        With max_queue_delay_ms = 0 this is natural batching: whatever queued up while the
        previous batch ran goes together, and an idle device never waits."""
        while len(self.queue) < self.max_batch_size and self.accepting:
            remaining = self.queue[0].enqueued + self.max_queue_delay - time.monotonic()
            if remaining <= 0:
                return
            self.wakeup.clear()
            timer = asyncio.get_running_loop().call_later(remaining, self.wakeup.set)
            await self.wakeup.wait()
            timer.cancel()

    def take_batch(self) -> list[WorkItem]:
        """Up to max_batch_size live items shaped like the oldest; dead items are dropped here."""
        now = time.monotonic()
        signature = self.queue[0].signature
        batch: list[WorkItem] = []
        kept: deque[WorkItem] = deque()
        while self.queue:
            item = self.queue.popleft()
            if not item.request.alive(now) or item.future.done():
                reason = "deadline" if now >= item.request.deadline else "cancelled"
                self.metrics.rejected(reason).inc()
                if not item.future.done():
                    item.future.set_exception(DeadlineExceeded())
                continue
            if len(batch) < self.max_batch_size and item.signature == signature:
                batch.append(item)
            else:
                kept.append(item)
        self.queue = kept
        self.metrics.queue_items.set(len(self.queue))
        for item in batch:
            self.metrics.queue_duration.observe(now - item.enqueued)
        return batch

    async def execute(self, batch: list[WorkItem]) -> None:
        stacked = {name: np.stack([item.inputs[name] for item in batch]) for name in batch[0].inputs}
        started = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self.compute, self.run_batch, stacked)
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
        self.last_compute_s = time.perf_counter() - started
        self.metrics.compute_duration.observe(self.last_compute_s)
        self.metrics.batch_items.observe(len(batch))
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


async def run_items(batcher: DynamicBatcher, inputs: list[dict[str, np.ndarray]], request: RequestState) -> list[np.ndarray]:
    """Submits a request's items and waits for all of them until the request's deadline."""
    futures = batcher.submit(inputs, request)
    try:
        _, pending = await asyncio.wait(futures, timeout=max(0.0, request.deadline - time.monotonic()))
    except asyncio.CancelledError:  # the client went away
        request.cancelled = True
        for future in futures:
            future.cancel()
        raise
    if pending:
        request.cancelled = True  # the worker drops what has not run yet
        for future in pending:
            future.cancel()
        raise DeadlineExceeded()
    return [future.result() for future in futures]
