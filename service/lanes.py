"""Compute lanes (Triton's instance groups): each model runs its batches on its own executor, so
a slow model queues behind itself only.

A lane has `threads` slots: that many batches of its model may run at once (each runtime call
also uses its own intra-op threads). On a CPU the lanes share the cores through the OS
scheduler: a lane busy with a 10-second translate holds one thread's share, and a DCGAN lane
beside it still gets its slice every few milliseconds instead of waiting for the translate to
end. The lane also keeps its backlog, the estimated seconds of every item queued or running on
it, which is what admission compares with a request's deadline.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor


class Lane:
    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self.threads = threads
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix=f"lane-{name}")
        self.backlog_s = 0.0  # estimated seconds of the items queued or running here
        self._slots: asyncio.Semaphore | None = None

    @property
    def slots(self) -> asyncio.Semaphore:
        """Created on first use, inside the running loop."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.threads)
        return self._slots

    def add_backlog(self, seconds: float) -> None:
        self.backlog_s += seconds

    def remove_backlog(self, seconds: float) -> None:
        self.backlog_s = max(0.0, self.backlog_s - seconds)

    def expected_wait_s(self) -> float:
        """How long new work waits for the work already here, with every slot busy."""
        return self.backlog_s / self.threads

    def shutdown(self, wait: bool = True) -> None:
        self.executor.shutdown(wait=wait, cancel_futures=not wait)
