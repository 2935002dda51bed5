"""The job store with a real memory budget: what a job holds is reserved, waited for when taken,
handed back however the job ends, and a cancel reaches a job queued or running."""
import threading
import time

import pytest

from service.errors import ApiError
from service.jobs import Job, JobStore
from service.memory import MemoryBudget

MIB = 2**20


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def steps_until_stopped(job, tick) -> dict:
    """A job that runs until its tick says stop (a cancel, shutdown or its time limit)."""
    step = 0
    while tick(step := step + 1):
        time.sleep(0.005)
    return {"steps": step}


@pytest.fixture
def store():
    budget = MemoryBudget(total=100 * MIB)
    jobs = JobStore(max_active=4, max_seconds=30, memory=budget)
    yield jobs
    jobs.shutdown()


def test_a_job_that_could_never_fit_the_budget_is_refused_with_413_and_reserves_nothing(store):
    with pytest.raises(ApiError) as refused:
        store.submit("project", "m", 10, steps_until_stopped, working_bytes=90 * MIB, held_bytes=20 * MIB)
    assert refused.value.status == 413 and "110 MiB" in refused.value.message
    assert store.memory.used == 0 and store.jobs == {}


def test_a_job_waits_while_requests_hold_the_budget_says_why_and_hands_everything_back_when_done(store):
    store.memory.try_reserve(60 * MIB)  # a request in flight
    job = store.submit("project", "m", 3, lambda job, tick: {"ticks": [tick(s) for s in (1, 2, 3)]}, working_bytes=50 * MIB, held_bytes=1 * MIB)
    wait_until(lambda: job.waiting is not None)
    assert job.state == "queued" and "memory budget" in job.to_dict()["waiting"]
    assert store.memory.used == 61 * MIB  # its input is held, its working memory not yet
    store.memory.release(60 * MIB)  # the request ends
    wait_until(lambda: job.state == "done")
    assert job.result == {"ticks": [True, True, True]} and job.waiting is None
    assert store.memory.used == 0


def test_cancelling_a_queued_job_means_it_never_starts_and_a_running_one_stops_at_its_next_step(store):
    release = threading.Event()
    blocker = store.submit("project", "m", 1, lambda job, tick: release.wait(10) and {}, working_bytes=10 * MIB)
    wait_until(lambda: blocker.state == "running")
    ran = []
    queued = store.submit("project", "m", 1, lambda job, tick: ran.append(job) or {}, working_bytes=10 * MIB, held_bytes=2 * MIB)
    assert store.cancel(queued.id).state == "cancelled"
    assert store.memory.used == 10 * MIB  # the queued job's input was handed back; the blocker still works
    release.set()
    wait_until(lambda: blocker.state == "done")
    running = store.submit("project", "m", 10**6, steps_until_stopped, working_bytes=20 * MIB)
    wait_until(lambda: running.step > 2)
    store.cancel(running.id)
    wait_until(lambda: running.state == "cancelled")
    assert running.error == "cancelled by the client" and running.result is None
    assert ran == [] and queued.started is None
    assert store.memory.used == 0


def test_a_finished_job_is_forgotten_when_deleted(store):
    job = store.submit("project", "m", 1, lambda job, tick: {"ok": True})
    wait_until(lambda: job.state == "done")
    assert store.cancel(job.id).result == {"ok": True}
    with pytest.raises(ApiError) as unknown:
        store.get(job.id)
    assert unknown.value.status == 404


def test_a_job_whose_budget_stays_taken_fails_after_its_time_limit_and_holds_nothing(store):
    store.max_seconds = 0.3
    store.memory.try_reserve(80 * MIB)
    job = store.submit("project", "m", 1, lambda job, tick: {}, working_bytes=50 * MIB, held_bytes=1 * MIB)
    wait_until(lambda: job.state == "failed")
    assert "memory budget stayed taken" in job.error and job.started is None
    assert store.memory.used == 80 * MIB


def test_finished_results_are_kept_within_their_byte_bound_oldest_forgotten_first():
    budget = MemoryBudget(total=100 * MIB)
    store = JobStore(max_active=4, max_seconds=30, memory=budget, keep_result_bytes=250_000)
    try:
        jobs = []
        for index in range(4):  # each result ~100 kB as JSON
            jobs.append(store.submit("project", "m", 1, lambda job, tick, index=index: {"index": index, "data": "x" * 100_000}))
            wait_until(lambda: jobs[-1].state == "done")
        kept = [job.id for job in jobs if job.id in store.jobs]
        assert kept == [jobs[2].id, jobs[3].id]
        with pytest.raises(ApiError) as forgotten:
            store.get(jobs[0].id)
        assert forgotten.value.status == 404 and "MiB of results" in forgotten.value.message
        big = store.submit("project", "m", 1, lambda job, tick: {"data": "x" * 400_000})  # over the bound alone: still kept, for its client
        wait_until(lambda: big.state == "done")
        assert list(store.jobs) == [big.id]
    finally:
        store.shutdown()


def test_one_clients_many_finished_jobs_push_out_its_own_results_not_another_clients():
    """The bounds on finished jobs were shared: 260 one-step jobs from one address made another
    client's unread result 404 (a hostile probe). The oldest of the client holding the most goes first."""
    store = JobStore(max_active=4, max_seconds=30, memory=MemoryBudget(total=100 * MIB), keep_finished=4, keep_result_bytes=250_000)
    try:
        def finished(owner: str, data: str = "") -> Job:
            job = store.submit("project", "m", 1, lambda job, tick: {"data": data}, owner=owner)
            wait_until(lambda: job.state == "done")
            return job

        victim = finished("10.0.0.1")
        flood = [finished("10.0.0.2") for _ in range(8)]
        assert store.get(victim.id).state == "done"  # past 4 finished jobs: the flooding client's oldest went
        assert [job.id in store.jobs for job in flood] == [False] * 5 + [True] * 3
        big = finished("10.0.0.3", "x" * 60_000)
        flood.append(finished("10.0.0.2", "x" * 100_000))
        flood.append(finished("10.0.0.2", "x" * 100_000))  # past 250 kB of results: the client holding the most bytes gives first
        assert victim.id in store.jobs and big.id in store.jobs and flood[-1].id in store.jobs and flood[-2].id not in store.jobs
    finally:
        store.shutdown()


def test_a_claimed_slot_counts_from_before_the_upload_is_read_until_its_job_is_submitted(store):
    """Every request of a burst once passed the room check before any had submitted its job, and
    decoded its upload (a 16 MP image each) before its 429 (a hostile probe: 30 at once, 11
    refused after decoding). A slot is now claimed before the upload is read."""
    with store.claim("a"), store.claim("b"), store.claim("c"):
        with store.claim("d"):  # the fourth of max_active=4
            with pytest.raises(ApiError) as refused, store.claim("e"):
                pass
            assert refused.value.status == 429
            job = store.submit("project", "m", 10, steps_until_stopped, claimed=True, owner="d")  # takes its own claim's slot
        assert store.active() == 4  # three claims and the job
        with pytest.raises(ApiError):
            store.submit("project", "m", 10, steps_until_stopped, owner="e")  # unclaimed: no room
    assert store.active() == 1  # claims given back however their block ended
    store.cancel(job.id)


def test_one_client_holds_at_most_half_the_job_slots(store):
    """One client held every slot (4 jobs of 1,000 steps on a 256² model ran to their 120 s limit;
    every other client 429 for ~8 minutes: a hostile probe). Now a client's jobs, queued, running
    or claimed, take at most half of `max_active`, and another client still finds room."""
    first = store.submit("project", "m", 10, steps_until_stopped, owner="10.0.0.1")
    with store.claim("10.0.0.1"):
        with pytest.raises(ApiError) as refused, store.claim("10.0.0.1"):
            pass
        assert refused.value.status == 429 and "its share" in refused.value.message and refused.value.headers["Retry-After"]
        with pytest.raises(ApiError):
            store.submit("project", "m", 10, steps_until_stopped, owner="10.0.0.1")
        other = store.submit("project", "m", 10, steps_until_stopped, owner="10.0.0.2")
    assert store.active("10.0.0.1") == 1 and store.active("10.0.0.2") == 1
    for job in (first, other):
        store.cancel(job.id)
