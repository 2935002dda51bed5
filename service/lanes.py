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
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

STOP = None  # the sentinel that ends one lane thread


class Lane:
    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self.threads = threads
        self.backlog_s = 0.0  # estimated seconds of the items queued or running here
        self.pending = 0  # jobs queued or running (counted on the loop's thread)
        self.last_done = time.monotonic()  # when the last of them ended
        self._slots: asyncio.Semaphore | None = None
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"lane-{name}_{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def slots(self) -> asyncio.Semaphore:
        """Created on first use, inside the running loop."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.threads)
        return self._slots

    def run(self, function: Callable[..., Any], *args: Any) -> asyncio.Future:
        """`function(*args)` on one of the lane's threads; the future resolves on the caller's loop."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending += 1
        self._work.put((loop, future, function, args))
        return future

    def idle_for(self) -> float:
        """Seconds since the lane last had work queued or running; 0 while it has some."""
        return 0.0 if self.pending else time.monotonic() - self.last_done

    def _serve(self) -> None:
        while (job := self._work.get()) is not STOP:
            loop, future, function, args = job
            if future.cancelled():
                loop.call_soon_threadsafe(self._settle, future, None, None)
                continue
            try:
                result = function(*args)
            except BaseException as error:  # handed to the awaiting coroutine, as an executor would
                loop.call_soon_threadsafe(self._settle, future, None, error)
            else:
                loop.call_soon_threadsafe(self._settle, future, result, None)

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

    def shutdown(self, wait: bool = True) -> None:
        """Ends the threads once the work already queued is done (`wait`: and waits for them)."""
        for _ in self._threads:
            self._work.put(STOP)
        if wait:
            for thread in self._threads:
                thread.join()

