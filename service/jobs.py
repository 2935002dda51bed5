"""Long jobs (projection): bounded in number and in time, run on their own thread (off every
model's lane), polled with GET /v1/jobs/{id}. Jobs live in memory: they do not survive a
restart. On shutdown queued jobs are cancelled and a running one stops at its next step
(`tick` answers False), so shutdown never waits for a job's whole time limit."""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from service.errors import ApiError


@dataclass
class Job:
    id: str
    kind: str
    model: str
    total_steps: int
    state: str = "queued"  # queued | running | done | failed | cancelled
    step: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "model": self.model, "state": self.state,
                "progress": {"step": self.step, "total": self.total_steps}, "created": self.created,
                "started": self.started, "finished": self.finished, "result": self.result, "error": self.error}


class JobStore:
    def __init__(self, max_active: int, max_seconds: float, keep_finished: int = 256) -> None:
        self.max_active = max_active
        self.max_seconds = max_seconds
        self.keep_finished = keep_finished
        self.jobs: dict[str, Job] = {}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="jobs")
        self.stopping = False

    def active(self) -> int:
        return sum(job.state in ("queued", "running") for job in self.jobs.values())

    def check_room(self) -> None:
        """503 while stopping, 429 while `max_active` jobs are queued or running: asked before a
        job's upload is decoded (a refused 4000² PNG once cost its decode first), and again at submit."""
        if self.stopping:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"})
        if self.active() >= self.max_active:
            raise ApiError(429, f"{self.max_active} jobs are already queued or running; retry later", headers={"Retry-After": "5"})

    def submit(self, kind: str, model: str, total_steps: int, work: Callable[[Job, Callable[[int], bool]], dict]) -> Job:
        """Queues `work(job, tick)`; `tick(step)` records progress and returns False past the time limit."""
        self.check_room()
        job = Job(uuid.uuid4().hex, kind, model, total_steps)
        self.jobs[job.id] = job
        self.forget_old()
        self.executor.submit(self.run, job, work)
        return job

    def run(self, job: Job, work: Callable[[Job, Callable[[int], bool]], dict]) -> None:
        if job.state == "cancelled":
            return
        job.state, job.started = "running", time.time()

        def tick(step: int) -> bool:
            job.step = step
            return not self.stopping and time.time() - job.started < self.max_seconds

        try:
            job.result = work(job, tick)
            job.state = "done"
        except Exception as error:  # a failed job reports why; the server carries on
            job.state, job.error = ("cancelled", "the server shut down") if self.stopping else ("failed", f"{type(error).__name__}: {error}")
        job.finished = time.time()

    def cancel_all(self) -> None:
        """Shutdown: queued jobs never start, the running one stops at its next step."""
        self.stopping = True
        for job in self.jobs.values():
            if job.state == "queued":
                job.state, job.error, job.finished = "cancelled", "the server shut down", time.time()

    def forget_old(self) -> None:
        finished = sorted((j for j in self.jobs.values() if j.state in ("done", "failed", "cancelled")), key=lambda j: j.finished or 0)
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self.jobs[job.id]

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise ApiError(404, f"unknown job {job_id!r}")
        return self.jobs[job_id]

    def shutdown(self) -> None:
        self.cancel_all()
        self.executor.shutdown(wait=True, cancel_futures=True)
