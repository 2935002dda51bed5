"""Long jobs (projection): bounded in number, in time and in memory, run one at a time on their own
thread (off every model's lane), polled with GET /v1/jobs/{id} and cancelled with DELETE. Jobs
live in memory: they do not survive a restart. On shutdown queued jobs are cancelled and a running
one stops at its next step (`tick` answers False), so shutdown never waits for a job's whole time
limit.

Memory: a job's input is reserved from the server's budget when it is accepted and held until it
ends; what its computation holds (`working_bytes`, counted before it is accepted) is reserved when
it starts, since jobs run one at a time. A job that could never fit is refused with 413; one that
finds the budget taken by requests waits, queued and saying so, for as long as its time limit.

Cores: a running job computes on the device the lanes share (the CPU), held there at its share
(`SharedDevice.host_work`: what it is measured using, from what the last job of its model used,
`share_of`), which admission counts for every request after it. The requests
admitted before it were not: a job waits, queued and saying so, while starting would push one of
them past its deadline (`admission.held_back_by`), which is at most until their deadlines. Only
for those: while it waits its share is promised on the device (`SharedDevice.promise_host`), so
the requests admitted meanwhile are judged beside it (and their bookings say so). A job waiting
for the memory budget promises nothing: the requests admitted then are waited for when it could
start (a probe's upscale admitted as the budget freed under a waiting job answered 504)."""
from __future__ import annotations

import collections
import contextlib
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Callable

from service.admission import held_back_by, reserve_memory
from service.lanes import Booking, HostWork, LaneView, SharedDevice
from service.errors import ApiError
from service.memory import MemoryBudget, OverBudget

MEMORY_RETRY_S = 0.25  # how often a job waiting for the memory budget (or for booked requests) looks again


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
    held_bytes: int = 0  # its input, reserved from acceptance to its end
    working_bytes: int = 0  # what its computation holds, reserved while it runs
    waiting: str | None = None  # why a queued job has not started (the memory budget is taken)
    cancel_requested: bool = False
    result_bytes: int = 0  # its result's size as JSON, while it is kept
    owner: str = ""  # the client address that submitted it (its share of the slots: JobStore.per_client)

    @property
    def finished_state(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "model": self.model, "state": self.state,
                "progress": {"step": self.step, "total": self.total_steps}, "created": self.created,
                "started": self.started, "finished": self.finished, "result": self.result, "error": self.error,
                "waiting": self.waiting, "memory_mib": round(self.holds_bytes() / 2**20, 1)}

    def holds_bytes(self) -> int:
        """What the job holds of the memory budget now: its input while queued, its working memory
        too while running, nothing once ended (a cancelled or finished job said it still held both)."""
        if self.finished_state:
            return 0
        return self.held_bytes + (self.working_bytes if self.state == "running" else 0)


class JobStore:
    def __init__(self, max_active: int, max_seconds: float, memory: MemoryBudget, keep_finished: int = 256,
                 keep_result_bytes: int = 64 * 2**20, device: SharedDevice | None = None,
                 job_share: Callable[[], float] | None = None, booked_lanes: Callable[[], Sequence[LaneView]] | None = None) -> None:
        self.max_active = max_active
        # the device the lanes compute on, where a running job computes too (the CPU): the job is held
        # there as host work of `job_share()` (`SharedDevice.host_work`), which admission counts, and
        # does not start while that would push a request booked on `booked_lanes()` past its deadline
        self.device = device
        self.job_share = job_share
        self.booked_lanes = booked_lanes
        self.promised = 0.0  # the share promised on the device for the job waiting for booked requests (`promise`)
        self.promised_for: Job | None = None  # that job
        # model → the most the last job of it that was measured used (`share_of`): a job is counted
        # at that before it runs, not at its threads' share, which is twice what a 64-px StyleGAN's
        # projection uses on two threads of two cores (requests beside it were refused for the rest)
        self.measured_shares: dict[str, float] = {}
        self.max_seconds = max_seconds
        self.memory = memory
        # finished jobs are kept for their clients to read, the oldest forgotten past either bound:
        # a result holds its ws and a base64 PNG (~6 MB at 1024²), and 256 of them were 1.5 GB
        # outside the memory budget
        self.keep_finished = keep_finished
        self.keep_result_bytes = keep_result_bytes
        self.jobs: dict[str, Job] = {}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="jobs")
        # uploads decoded into job inputs, one at a time, before the job is submitted: in the encoder pool a
        # client submitting and deleting projections of 4096² PNGs (58 KB each, 0.6 s of decoding) held both
        # encoder threads, and every other answer's encoding waited (a DCGAN grid's p90 8 → 264 ms)
        self.intake = ThreadPoolExecutor(1, thread_name_prefix="job-intake")
        self.lock = threading.RLock()  # state changes: the loop cancels while the job thread starts or ends a job
        self.stopping = False
        self.claims: collections.Counter[str] = collections.Counter()  # per client: slots held by requests still reading their upload (`claim`)
        # one client's share of the slots: it held them all (4 jobs of 1,000 steps on a 256² model ran to
        # their time limit, every other client 429 for ~8 minutes: a hostile probe)
        self.per_client = max(1, max_active // 2)

    def active(self, owner: str | None = None) -> int:
        """Jobs queued or running, and the slots claimed for jobs about to be submitted (of one client's, with `owner`)."""
        with self.lock:
            jobs = sum(job.state in ("queued", "running") and owner in (None, job.owner) for job in self.jobs.values())
            return jobs + (self.claims.total() if owner is None else self.claims[owner])

    def check_room(self, owner: str = "", own_claims: int = 0) -> None:
        """503 while stopping, 429 while `max_active` jobs are queued, running or claimed, or
        while `owner` holds its share of them (not counting the caller's own claims)."""
        if self.stopping:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"})
        if self.active() - own_claims >= self.max_active:
            raise ApiError(429, f"{self.max_active} jobs are already queued or running; retry later", headers={"Retry-After": "5"})
        if self.active(owner) - own_claims >= self.per_client:
            raise ApiError(429, f"this client already has {self.per_client} jobs queued or running, its share of the server's "
                                f"{self.max_active}; retry once one has finished", headers={"Retry-After": "5"})

    @contextlib.contextmanager
    def claim(self, owner: str = "") -> Iterator[None]:
        """A job slot held from before its upload is read and decoded until the job is submitted
        (`submit(..., claimed=True)`) or the request fails: the room was once only checked first,
        so every request of a burst passed the check and decoded its upload before the 429 at
        submit (a hostile probe: 30 at once, 11 refused after decoding a 16 MP image each, the
        decode pool held for 36 s). A refused 4000² PNG once cost its decode, before any check."""
        with self.lock:
            self.check_room(owner)
            self.claims[owner] += 1
        try:
            yield
        finally:
            with self.lock:
                self.claims[owner] -= 1

    def check_fits(self, working_bytes: int, held_bytes: int = 0) -> None:
        """413 for a job whose memory could never fit the budget, however long it waited."""
        wanted = working_bytes + held_bytes
        if wanted > self.memory.capacity:
            raise ApiError(413, f"this job needs about {wanted / 2**20:.0f} MiB; the server's memory budget for requests "
                                f"is {self.memory.capacity / 2**20:.0f} MiB", code="too_expensive")

    def submit(self, kind: str, model: str, total_steps: int, work: Callable[[Job, Callable[[int], bool]], dict],
               working_bytes: int = 0, held_bytes: int = 0, claimed: bool = False, owner: str = "") -> Job:
        """Queues `work(job, tick)`; `tick(step)` records progress and returns False once the job
        should stop (its time limit, a cancel, shutdown). `held_bytes` are reserved now (503 when
        the budget is taken), `working_bytes` when the job starts. `claimed`: within the caller's
        `claim` (for the same `owner`), whose slot the job takes."""
        self.check_room(owner, own_claims=1 if claimed else 0)
        self.check_fits(working_bytes, held_bytes)
        reserve_memory(self.memory, held_bytes)
        job = Job(uuid.uuid4().hex, kind, model, total_steps, held_bytes=held_bytes, working_bytes=working_bytes, owner=owner)
        with self.lock:
            self.jobs[job.id] = job
        self.executor.submit(self.run, job, work)
        return job

    def run(self, job: Job, work: Callable[[Job, Callable[[int], bool]], dict]) -> None:
        try:
            if self.start(job):
                self.compute(job, work)
        finally:
            self.promise(None)

    def compute(self, job: Job, work: Callable[[Job, Callable[[int], bool]], dict]) -> None:
        job.started = time.time()

        held: HostWork | None = None

        def tick(step: int) -> bool:
            job.step = step
            if held is not None:
                held.sample()  # what the job uses, as its share of the device (every half second at most)
            return not (job.cancel_requested or self.stopping) and time.time() - job.started < self.max_seconds

        try:
            with self.computing(job) as held:
                self.promise(None)  # (held as running work now)
                try:
                    result, state, error = work(job, tick), "done", None
                finally:
                    if held is not None and held.measured is not None:
                        self.measured_shares[job.model] = held.measured
        except Exception as failure:  # a failed job reports why; the server carries on
            result, state, error = None, "failed", f"{type(failure).__name__}: {failure}"
        if self.stopping:
            result, state, error = None, "cancelled", "the server shut down"
        elif job.cancel_requested:
            result, state, error = None, "cancelled", "cancelled by the client"
        self.finish(job, state, error, result)

    def computing(self, job: Job) -> contextlib.AbstractContextManager[HostWork | None]:
        """The running job held on the device it shares with the lanes (nothing where it does not),
        from the share it is expected to use (`share_of`) up to its threads'."""
        if self.device is None or self.job_share is None:
            return contextlib.nullcontext()
        return self.device.host_work(self.job_share(), self.share_of(job.model))

    def share_of(self, model: str) -> float:
        """The share of the device a job of `model` is counted at before it is measured running:
        what the last measured job of that model used, its threads' share at most (the steps of a
        model's projection cost the same from job to job), else its threads' share."""
        threads = self.job_share() if self.job_share is not None else 0.0
        measured = self.measured_shares.get(model)
        return threads if measured is None else min(threads, measured)

    def endangered(self, job: Job) -> dict[Booking, float]:
        """The booked requests `job` starting now would push past their deadlines, each with the
        seconds until it ends (`admission.held_back_by`, at `share_of` its model; its own promise
        left out)."""
        if self.device is None or self.job_share is None or self.booked_lanes is None:
            return {}
        return held_back_by(self.share_of(job.model), self.booked_lanes(), self.device.other_share(), self.device.host_share() - self.promised,
                            time.monotonic())

    def promise(self, waiting: Job | None) -> None:
        """The `waiting` job's share promised on the device (`SharedDevice.promise_host`) while it
        waits for booked requests, taken back (None) when it starts, ends or is cancelled (jobs
        run one at a time: one promise at most)."""
        if self.device is None or self.job_share is None:
            return
        with self.lock:
            share = self.share_of(waiting.model) if waiting is not None else 0.0
            if share != self.promised:
                self.device.promise_host(share - self.promised)
                self.promised = share
            self.promised_for = waiting

    def start(self, job: Job) -> bool:
        """Takes the job's working memory, waiting while requests hold the budget or while it
        would push requests admitted before it past their deadlines; False when the job ended
        instead (cancelled, shutdown, or it could not start within its time limit)."""
        waited_since = time.monotonic()
        while True:
            with self.lock:
                if job.state != "queued":
                    return False
                if job.cancel_requested or self.stopping:
                    self.cancel_if_queued(job, "the server shut down" if self.stopping else "cancelled by the client")
                    return False
                endangered = self.endangered(job)
                self.promise(job if endangered else None)
                if endangered:
                    blocked = "requests admitted before it kept needing the cores"
                    job.waiting = (f"requests admitted before it would miss their deadlines beside it: it starts once they have ended "
                                   f"(in about {max(endangered.values()):.1f} s)")
                else:
                    try:
                        self.memory.try_reserve(job.working_bytes)
                    except OverBudget as error:
                        blocked, job.waiting = "the memory budget stayed taken", f"the memory budget: {error}"
                    else:
                        job.state, job.waiting = "running", None
                        return True
            if time.monotonic() - waited_since > self.max_seconds:
                self.finish(job, "failed", f"{blocked} for {self.max_seconds:g} s ({job.waiting})", release_working=False)
                return False
            time.sleep(MEMORY_RETRY_S)

    def finish(self, job: Job, state: str, error: str | None, result: dict | None = None, release_working: bool = True) -> None:
        """Ends a job once: its state, and its memory handed back."""
        result_bytes = len(json.dumps(result)) if result is not None else 0  # (off the lock: ~50 ms for a 1024² result)
        with self.lock:
            if job.finished_state:
                return
            job.state, job.error, job.result, job.finished, job.waiting = state, error, result, time.time(), None
            job.result_bytes = result_bytes
            self.memory.release(job.held_bytes + (job.working_bytes if release_working else 0))
            self.forget_old()

    def cancel(self, job_id: str) -> Job:
        """DELETE /v1/jobs/{id}: a queued job never starts, a running one stops at its next step
        (its state says `running` until then), a finished one is forgotten."""
        job = self.get(job_id)
        if job.finished_state:
            with self.lock:
                self.jobs.pop(job_id, None)
            return job
        job.cancel_requested = True
        self.cancel_if_queued(job, "cancelled by the client")
        return job

    def cancel_if_queued(self, job: Job, reason: str) -> None:
        with self.lock:  # not started meanwhile: it would run, and its working memory never be handed back
            if job.state == "queued":
                self.finish(job, "cancelled", reason, release_working=False)
                if self.promised_for is job:  # at once: the requests refused beside it meanwhile are admitted again
                    self.promise(None)

    def cancel_queued_of(self, model: str, reason: str) -> None:
        """`model` was unloaded: its queued jobs never start (a probe's queued job ran to `done`
        after the unload, on the memory and cores the operator unloaded it to free). The running one
        finishes, as the model's accepted requests do: it holds its own copy of the networks."""
        with self.lock:
            jobs = [job for job in self.jobs.values() if job.model == model]
        for job in jobs:
            self.cancel_if_queued(job, reason)

    def cancel_all(self) -> None:
        """Shutdown: queued jobs never start, the running one stops at its next step."""
        self.stopping = True
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            self.cancel_if_queued(job, "the server shut down")

    def forget_old(self) -> None:
        """Past `keep_finished` finished jobs or `keep_result_bytes` of results, forgets the oldest
        finished job of the client holding the most of them (by count past the first bound, by
        result bytes past the second), so that one client's many jobs push out its own results,
        not another client's: the bounds were shared, and 260 one-step jobs from one address made
        every other client's unread result 404 (a hostile probe). The newest finished job is kept
        whatever its size, for its client to read. Under the lock."""
        finished = sorted((j for j in self.jobs.values() if j.finished_state), key=lambda j: j.finished or 0)
        if len(finished) < 2:
            return
        by_owner: dict[str, list[Job]] = {}
        for job in finished[:-1]:  # (the newest is never a candidate)
            by_owner.setdefault(job.owner, []).append(job)
        count, kept_bytes = len(finished), sum(j.result_bytes for j in finished)
        while by_owner and (count > self.keep_finished or kept_bytes > self.keep_result_bytes):
            by_count = count > self.keep_finished
            owner = max(by_owner, key=lambda o: len(by_owner[o]) if by_count else sum(j.result_bytes for j in by_owner[o]))
            oldest = by_owner[owner].pop(0)
            if not by_owner[owner]:
                del by_owner[owner]
            del self.jobs[oldest.id]
            count, kept_bytes = count - 1, kept_bytes - oldest.result_bytes

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"unknown job {job_id[:64]!r} (finished jobs are kept until deleted, or until the server holds over "
                                f"{self.keep_finished} of them or {self.keep_result_bytes / 2**20:.0f} MiB of results: then the oldest of "
                                "the client holding the most goes first)")
        return job

    def shutdown(self) -> None:
        self.cancel_all()
        self.intake.shutdown(wait=True, cancel_futures=True)
        self.executor.shutdown(wait=True, cancel_futures=True)
