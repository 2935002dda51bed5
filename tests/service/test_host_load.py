"""Other processes on the server's cores: read off the kernel's counters (service/host_load.py),
counted in the device's sharing and in a request's estimate (service/lanes.py, admission.py); and
the server's own work outside its lanes (a projection job), counted the same way."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from bench.limits import busy_loops
from service.admission import ModelLimits, RequestCost, admit, slowdown
from service.costs import GraphCost
from service.errors import ApiError
from service.host_load import OtherLoad, busy_cpu_seconds
from service.lanes import Lane, SharedDevice
from service.memory import MemoryBudget
from service.registry import LoadedModel
from service.repository import scan_repository
from service.tiling import plan_tiles
from tests.serving import running_server
from tests.service.test_hostile import SHIPPED
from tests.service.test_isolation import png

pytestmark = pytest.mark.quiet_host  # its servers read other processes' load and its own busy processes must be the only ones

linux_only = pytest.mark.skipif(busy_cpu_seconds({0}) is None, reason="reads /proc/stat")


def test_the_reading_is_what_the_cpus_were_busy_with_less_this_process_s_own():
    """Counters as the kernel keeps them: in each half second two CPUs were busy 0.6 s, 0.1 s of it
    this process's own threads: the others wanted one core. A higher reading is taken at once;
    once they stop it goes halfway down each half second."""
    clock, busy, own = [100.0], [50.0], [10.0]
    load = OtherLoad({0, 1}, busy=lambda cpus: busy[0], own=lambda: own[0], clock=lambda: clock[0])

    def span(busy_s: float, own_s: float) -> float:
        clock[0] += 0.5
        busy[0] += busy_s
        own[0] += own_s
        return load.cores()

    assert span(0.6, 0.1) == pytest.approx(1.0)
    assert load.share() == pytest.approx(0.5)  # of two CPUs
    clock[0] += 0.1  # within a span: not read again
    busy[0] += 5.0
    assert load.cores() == pytest.approx(1.0)
    busy[0] -= 5.0
    clock[0] -= 0.1
    assert [round(span(0.1, 0.1), 3) for _ in range(3)] == [0.5, 0.25, 0.125]


def test_saturated_cpus_hide_what_the_others_wanted_and_the_sharing_gives_it_back():
    """Two processes spinning beside a lane computing on both of two cores: the kernel shares the
    CPUs by threads, so each side used one core. What they used (1) is not what they wanted (2):
    weighed against what this process's lanes asked for (2 cores) and got (1), it is."""
    clock, busy, own, asked = [100.0], [50.0], [10.0], [0.0]
    load = OtherLoad({0, 1}, busy=lambda cpus: busy[0], own=lambda: own[0], clock=lambda: clock[0], own_demand=lambda: asked[0])
    clock[0] += 0.5
    busy[0] += 1.0  # both CPUs, the whole span
    own[0] += 0.5  # one core's worth of it this process's
    asked[0] += 1.0  # its lanes asked for two cores
    assert load.cores() == pytest.approx(2.0)


def test_without_the_kernels_counters_nothing_is_counted():
    load = OtherLoad({0}, busy=lambda cpus: None)
    assert load.cores() == 0.0 and load.share() == 0.0


@linux_only
def test_a_busy_process_beside_counts_and_this_process_s_own_threads_do_not():
    load = OtherLoad()
    stop = threading.Event()

    def spin() -> None:  # this process's own work: a lane's, an encoder's
        while not stop.is_set():
            sum(range(1000))

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        time.sleep(1.6)
        own_only = load.cores()
    finally:
        stop.set()
        spinner.join()
    with busy_loops(1):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and load.cores() < 0.7:
            time.sleep(0.25)
        beside = load.cores()
    assert own_only < 0.5, own_only
    assert beside >= 0.7, beside


def test_a_job_beside_another_process_s_load_is_stretched_by_it():
    """The device's sharing counts the other processes' share as a job of its own: a lane's job
    asking for all the cores beside another process holding half of them took 1.5x its time alone
    (so its model's correction does not take that for the model's own slowness)."""
    class HalfBusy:
        def share(self) -> float:
            return 0.5

    lane = Lane("beside-others", 1, SharedDevice(HalfBusy()), share=1.0)
    try:
        async def one() -> float:
            _, stretch = await lane.run_timed(time.sleep, 0.3)
            return stretch

        assert asyncio.run(one()) == pytest.approx(1.5, rel=0.05)
    finally:
        lane.shutdown()


def test_the_estimate_grows_with_the_cores_others_hold_where_the_lane_needs_them():
    """On two cores: a runtime on both beside 1 and 2 spinning processes (measured 1.73x and 2.6x),
    and one on a single core beside 1 and 2 (1.0x and 1.55x)."""
    whole, half = Lane("whole", 1, share=1.0), Lane("half", 1, share=0.5)
    try:
        assert [slowdown(whole, other, cpus=2) for other in (0.0, 0.02, 0.5, 1.0)] == [1.0, 1.03, 1.75, 2.5]  # no step
        assert [slowdown(half, other, cpus=2) for other in (0.5, 1.0)] == [1.0, 1.5]
    finally:
        whole.shutdown()
        half.shutdown()


def test_a_request_that_fits_an_idle_machine_is_refused_while_other_processes_hold_its_cores(repository):
    """2 s of compute against a 3-second deadline (2.4 s of it for compute) is admitted on an
    idle machine, and refused at once, naming the other processes, while they hold half of it."""
    entry = next(e for e in scan_repository(repository) if e.name == "upx4")
    lane = Lane("others-test", 1, share=1.0)
    model = LoadedModel(entry, lane=lane, costs={"model": GraphCost(per_unit_s=1.0, overhead_s=0.0, bytes_per_unit=0, reference_pixels=96 * 96)},
                        limits=ModelLimits(compute_seconds=24.0))
    try:
        assert admit(model, RequestCost(seconds=2.0, bytes=0), 3.0, MemoryBudget(1 << 30)) == 2.0  # (not queued: the lane stays empty)
        with pytest.raises(ApiError) as refused:
            admit(model, RequestCost(seconds=2.0, bytes=0), 3.0, MemoryBudget(1 << 30), other_share=0.5)
    finally:
        lane.shutdown()
    assert refused.value.status == 503
    assert "other processes" in refused.value.message and int(refused.value.headers["Retry-After"]) >= 1


def test_a_workers_engine_counts_its_fronts_as_its_own_server_not_as_other_processes():
    """In one process the HTTP parsing and the encoders are the server's own threads; under
    `--workers` they run in the fronts, and the engine took them for other processes (a CI run's
    first upscale refused 503, "other processes want about 0.6 of this machine's 2 cores").
    Each half second: the CPUs busy 1.0 s, the fronts 0.8 s of it, the engine 0.2 s."""
    clock, busy, own, fronts = [100.0], [50.0], [10.0], [5.0]
    load = OtherLoad({0, 1}, busy=lambda cpus: busy[0], own=lambda: own[0], clock=lambda: clock[0], helpers=lambda: fronts[0])
    alone = OtherLoad({0, 1}, busy=lambda cpus: busy[0], own=lambda: own[0], clock=lambda: clock[0])
    clock[0] += 0.5
    busy[0] += 1.0
    own[0] += 0.2
    fronts[0] += 0.8
    assert load.cores() == pytest.approx(0.0) and alone.cores() == pytest.approx(1.6)


@linux_only
def test_a_servers_other_processes_cpu_is_read_off_the_kernel_dead_ones_included():
    """`sibling_cpu_seconds` of this process as the supervisor: a child spinning half a second
    counts while it runs and once it has been reaped; the engine's own pid is left out."""
    import subprocess
    import sys

    from service.host_load import process_cpu_seconds, sibling_cpu_seconds

    spin = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\nprint(flush=True)\nsys.stdin.readline()"
    before = sibling_cpu_seconds(os.getpid(), own_pid=-1)
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child.stdout.readline()  # it has spun
    running = sibling_cpu_seconds(os.getpid(), own_pid=-1)
    without_it = sibling_cpu_seconds(os.getpid(), own_pid=child.pid)
    assert process_cpu_seconds(child.pid) >= 0.45
    child.stdin.close()
    child.wait()
    reaped = sibling_cpu_seconds(os.getpid(), own_pid=-1)
    assert running - before >= 0.45
    assert without_it < running - 0.4
    assert reaped >= running - 0.05


def upscale_of_about(seconds: float, figures: dict, tile: int = 96, overlap: int = 16) -> tuple[int, int]:
    """(width, height) of an upload whose tiles the server estimates at about `seconds`, from the
    per-tile cost it lists (a fixed size was estimated 1.9 s on one machine and 3.6 s on a CI
    machine whose warm-up ran slow) times the running correction admission applies to it (an
    idle re-timing that keeps a faster warm-up's fit sets it to what it timed: sized without it,
    a 3.5 s upscale counted 5.5-5.6 s at 1.6-1.8x was refused as "slower than measured lately"),
    within its listed limits."""
    per_tile = figures["cost"]["seconds_per_unit"] * figures["cost"]["observed_over_measured"]
    side_for = lambda count: tile + (count - 1) * (tile - overlap)  # noqa: E731
    limits = figures["limits"]
    sides = [(side_for(cols), side_for(rows)) for rows in range(1, 6) for cols in range(1, 6)
             if max(side_for(cols), side_for(rows)) <= limits["max_input_side"] and side_for(cols) * side_for(rows) <= limits["max_input_pixels"]]

    def estimate(size: tuple[int, int]) -> float:
        grid = plan_tiles(size[1], size[0], tile, overlap)
        return grid.rows * grid.cols * per_tile

    return min(sides, key=lambda size: abs(estimate(size) - seconds))


def sized_upscale(server, client, seconds: float, remeasures: int = 1):
    """An upscale of `sr-rrdb-x4` the server estimates at about `seconds`, sized from the per-tile
    cost it lists once the idle server has timed its models `remeasures` times: a call answering
    (the response, the seconds it took), and the upload's (width, height)."""
    from bench.limits import model_figures

    deadline = time.monotonic() + 20
    while server.metric("ganserve_cost_remeasures_total") < remeasures and time.monotonic() < deadline:
        time.sleep(0.25)
    time.sleep(1.0)  # (a `--workers` front lists them as of the engine's last snapshot)
    size = upscale_of_about(seconds, model_figures(server.url, "sr-rrdb-x4"))
    body = png(*size)
    # this process is another process to the server: making a large PNG here kept a core busy,
    # which the server read as 1.1 cores of others' demand and refused the first upscale (503)
    deadline = time.monotonic() + 10
    while server.metric("ganserve_other_processes_cores") > 0.1 and time.monotonic() < deadline:
        time.sleep(0.5)

    def upscale():
        started = time.perf_counter()
        response = client.post("/v1/models/sr-rrdb-x4/upscale", content=body, headers={"content-type": "image/png"})
        return response, time.perf_counter() - started

    return upscale, size


@linux_only
@pytest.mark.parametrize("settings", [{}, {"workers": 2}], ids=["one process", "engine and two fronts"])
def test_a_server_sharing_its_cores_with_busy_processes_refuses_up_front_what_it_cannot_finish(settings):
    """sr-rrdb-x4 on both cores with a 5-second deadline (4 s of it for compute): an upscale the
    server estimates at about 2.2 s alone fits it on an idle machine (and still beside 1 core of
    noise). With two processes spinning on the two cores it takes about 2.5 times as long;
    judged as on an idle machine it was admitted and ended past its deadline (and the model,
    taken for slow, was refused for 30 s after they stopped). Counting them it is refused at
    once, saying why, and served once the server has seen them stop. Under `--workers` the engine
    reads the counters and tells the fronts; its fronts are its own server, not other processes
    (counted among them, the engine refused this test's first upscale on a CI machine)."""
    with running_server(SHIPPED, request_timeout_s=5, intra_op_threads=2, models=["sr-rrdb-x4"], remeasure_idle_s=1, **settings) as server, \
            server.client(timeout=30) as client:
        upscale, (width, height) = sized_upscale(server, client, 2.2)
        alone, _ = upscale()
        assert alone.status_code == 200, alone.text
        with busy_loops(2):
            time.sleep(2)  # a few readings of the counters
            busy_reading = server.metric("ganserve_other_processes_cores")
            refused, elapsed = upscale()
        deadline = time.monotonic() + 15
        while server.metric("ganserve_other_processes_cores") > 0.2 and time.monotonic() < deadline:
            time.sleep(0.5)  # the reading falls by half each half second
        served, _ = upscale()
    assert busy_reading >= 1.0
    assert refused.status_code == 503, (refused.status_code, elapsed, width, height)
    assert elapsed < 1.0 and "other processes" in refused.json()["error"]["message"] and "retry-after" in refused.headers
    assert served.status_code == 200, served.text


@linux_only
@pytest.mark.parametrize("settings", [{}, {"workers": 2}], ids=["one process", "engine and two fronts"])
def test_an_upscale_that_fits_alone_is_refused_up_front_while_the_servers_own_projection_job_computes(settings):
    """The server's own projection job computes on the cores its lanes use, outside every lane:
    the reading of other processes leaves it out (it is this process's CPU), and admission counted
    it nowhere. A hostile probe had an upscale refused beside another process's light load
    admitted beside a job, computing 1.8x its estimate and answering 504 at its deadline. Now the
    job is held on the device while it runs (`SharedDevice.host_work`, at the share it is measured
    using): an upscale of about 2.7 s, which fits the 4 s of a 5-second deadline alone, is
    refused at once while a job runs, naming it, and served once the job is cancelled. Under
    `--workers` the job runs in the engine, which tells the fronts."""
    with running_server(SHIPPED, request_timeout_s=5, intra_op_threads=2, models=["sr-rrdb-x4", "stylegan-shapes"], remeasure_idle_s=1,
                        **settings) as server, server.client(timeout=30) as client:
        upscale, (width, height) = sized_upscale(server, client, 2.7, remeasures=2)
        alone, _ = upscale()
        assert alone.status_code == 200, alone.text
        job = client.post("/v1/models/stylegan-shapes/project?steps=1000", content=png(64, 64), headers={"content-type": "image/png"})
        assert job.status_code == 202, job.text
        time.sleep(2.0)  # its use measured (every half second) and, under `--workers`, in the fronts' snapshot
        refused, elapsed = upscale()
        state = client.get(job.json()["status_url"]).json()["state"]
        client.delete(job.json()["status_url"])
        deadline = time.monotonic() + 10
        while client.get(job.json()["status_url"]).json()["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # (the fronts' next snapshot)
        served, _ = upscale()
    assert state == "running"
    assert refused.status_code == 503, (refused.status_code, elapsed, width, height)
    assert elapsed < 1.0 and "a projection job on this server" in refused.json()["error"]["message"], refused.text
    assert "retry-after" in refused.headers
    assert served.status_code == 200, served.text


@linux_only
@pytest.mark.parametrize("settings", [{}, {"workers": 2}], ids=["one process", "engine and two fronts"])
def test_a_projection_job_waits_for_the_requests_admitted_before_it_that_it_would_push_past_their_deadlines(settings):
    """Admission counts a running job for every request after it; the requests admitted before it
    were judged without it. An upscale of about 3.5 s, on both cores within the 5.4 s its
    6-second deadline protects, would take ~2.5x as long beside a job on two threads: submitted
    while it computes, the job waits, queued and saying why, until what is left of the upscale fits
    its deadline beside it; the upscale is answered 200. Meanwhile the job's share is promised: a
    smaller upscale sent while it waits is judged beside it and refused, naming it, where it was
    admitted, the job waited for it too (2.0 s against 1.3 s), and the first upscale was answered
    at 5.4-5.6 s of its 6 (4.1-4.2 s now). Under `--workers` the engine books what the fronts
    admitted on its own lanes, and its snapshots carry the promise to the fronts."""
    with running_server(SHIPPED, request_timeout_s=6, intra_op_threads=2, models=["sr-rrdb-x4", "stylegan-shapes"], remeasure_idle_s=1,
                        **settings) as server, server.client(timeout=30) as client:
        upscale, (width, height) = sized_upscale(server, client, 3.5, remeasures=2)
        smaller, _ = sized_upscale(server, client, 1.0, remeasures=2)
        alone, _ = upscale()
        assert alone.status_code == 200, alone.text
        first = client.post("/v1/models/stylegan-shapes/project?steps=1", content=png(64, 64), headers={"content-type": "image/png"})
        while client.get(first.json()["status_url"]).json()["state"] in ("queued", "running"):  # (its set-up, counted once, is done)
            time.sleep(0.1)
        time.sleep(1.0)  # (under `--workers`, the fronts' next snapshot: the first job's share let go)
        answered: list = []
        computing = threading.Thread(target=lambda: answered.append(upscale()))
        computing.start()
        time.sleep(0.5)  # admitted and booked
        job = client.post("/v1/models/stylegan-shapes/project?steps=1000", content=png(64, 64), headers={"content-type": "image/png"})
        assert job.status_code == 202, job.text
        seen: list[dict] = []

        def watch() -> None:  # from the job's submission: its hold can be shorter than the smaller upscale's refusal takes
            with server.client(timeout=30) as own:
                while computing.is_alive():
                    seen.append(own.get(job.json()["status_url"]).json())
                    time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.6)  # (under `--workers`, the fronts' next snapshot: the promise)
        beside, _ = smaller()
        computing.join()
        watcher.join()
        deadline = time.monotonic() + 5
        while (after := client.get(job.json()["status_url"]).json())["state"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.1)
        client.delete(job.json()["status_url"])
    (response, elapsed), = answered
    assert response.status_code == 200, (response.text, elapsed, width, height)
    held = [status for status in seen if "requests admitted before it would miss their deadlines" in (status["waiting"] or "")]
    assert held and held[0]["state"] == "queued", seen
    assert beside.status_code == 503 and "a projection job on this server" in beside.json()["error"]["message"], beside.text
    assert after["state"] == "running", after


def test_a_job_is_held_back_only_by_bookings_it_would_push_past_their_latest():
    """A job asking one core of two beside a lane on both (`slowdown`: 1.75x on 2 cores): a
    booking that ends in 2 s of a 4.5 s limit would end at 3.5 s: it fits, and the job may start.
    One ending at 3 s would end at 5.25 s, past its limit: held for the 3 s it has left; not for
    the same booking judged beside the job (admitted while its share was promised). A lane on one
    core of two is not slowed by a job on the other, and a booking already past its limit is not
    kept."""
    from service.admission import held_back_by
    from service.lanes import Booking

    now = time.monotonic()
    both, one = Lane("both", 1, share=1.0), Lane("one", 1, share=0.5)
    try:
        both.bookings.add(Booking(now + 2.0, now + 4.5))
        assert held_back_by(0.5, [both], 0.0, 0.0, now) == {}
        both.bookings.add(late := Booking(now + 3.0, now + 4.5))
        assert held_back_by(0.5, [both], 0.0, 0.0, now) == {late: pytest.approx(3.0)}
        both.bookings.add(Booking(now + 3.0, now + 4.5, host_share=0.5))  # admitted while the job's share was promised
        assert held_back_by(0.5, [both], 0.0, 0.0, now) == {late: pytest.approx(3.0)}
        one.bookings.add(Booking(now + 3.0, now + 3.1))
        assert held_back_by(0.5, [one], 0.0, 0.0, now) == {}
        both.bookings = {Booking(now - 1.0, now - 0.5)}
        assert held_back_by(0.5, [both], 0.0, 0.0, now) == {}
    finally:
        both.shutdown()
        one.shutdown()


def test_host_work_is_held_at_the_share_it_is_measured_using_while_no_lane_computes():
    """A projection job starts at what its threads may ask for and is then held at what it uses
    (a 64-px StyleGAN's, on two threads of two cores, used one core: held at its threads it made
    an upscale beside it look 2.5x slower where it took 1.8x). A span in which a lane computed
    says nothing of it (the process's CPU was the lane's too), and it is let go when it ends."""
    from service.lanes import HOST_WORK_SAMPLE_S, MIN_HOST_SHARE

    device = SharedDevice()
    with device.host_work(1.0) as work:
        assert device.host_share() == 1.0
        time.sleep(HOST_WORK_SAMPLE_S + 0.1)  # used nothing
        work.sample()
        assert device.host_share() == pytest.approx(MIN_HOST_SHARE)
        spin_until = time.perf_counter() + HOST_WORK_SAMPLE_S + 0.1
        while time.perf_counter() < spin_until:  # one core's worth
            pass
        work.sample()
        spun = device.host_share()
        device.enter(1.0)  # a lane's batch in the next span: its CPU is not the job's
        time.sleep(HOST_WORK_SAMPLE_S + 0.1)
        device.leave(1.0)
        work.sample()
        assert device.host_share() == spun
    assert 0.5 / device.cpus <= spun <= min(1.0, 1.0 / device.cpus + 0.1)
    assert device.host_share() == pytest.approx(0.0)


def spin_steps(seconds: float, tick) -> None:
    """A job's steps for `seconds`: 10 ms of one thread's spinning each, `tick`ed."""
    ends = time.perf_counter() + seconds
    while time.perf_counter() < ends:
        spun = time.perf_counter() + 0.01
        while time.perf_counter() < spun:
            pass
        tick(1)


def test_a_job_is_counted_at_what_the_last_job_of_its_model_used_not_at_its_threads():
    """A job was counted at its threads' share until measured running, every time: a 64-px
    StyleGAN's projection on two threads of two cores asks for 1.0 and uses 0.5, so requests
    beside it waiting or starting were judged beside twice its load. The store keeps what the
    last measured job of each model used: here a job spinning one thread of work asks for the
    whole device; the next job of that model waits for a booked request promising what the first
    used, and starts at it. Another model's job is still counted at its threads' share."""
    from service.jobs import JobStore
    from service.lanes import HOST_WORK_SAMPLE_S, Booking

    device = SharedDevice()
    lane = Lane("both", 1, share=1.0)
    store = JobStore(max_active=4, max_seconds=30, memory=MemoryBudget(total=2**30), device=device, job_share=lambda: 1.0,
                     booked_lanes=lambda: [lane])

    def spin(job, tick) -> dict:  # one thread's worth of steps for a few samples
        spin_steps(3 * HOST_WORK_SAMPLE_S + 0.2, tick)
        return {}

    release, seen = threading.Event(), {}

    def hold(job, tick) -> dict:
        seen["share"] = device.host_share()  # before its first sample
        release.wait(10)
        return {}

    try:
        first = store.submit("project", "style", 1, spin)
        deadline = time.monotonic() + 10
        while first.state != "done" and time.monotonic() < deadline:
            time.sleep(0.02)
        used = store.measured_shares["style"]
        assert first.state == "done" and 0.5 / device.cpus <= used <= min(1.0, 1.0 / device.cpus + 0.15), used
        assert store.share_of("style") == used and store.share_of("other") == 1.0
        now = time.monotonic()
        lane.bookings.add(Booking(now + 1.0, now + 1.2))  # pushed past its limit by any job: the next waits ~1 s
        second = store.submit("project", "style", 1, hold)
        deadline = time.monotonic() + 5
        while second.waiting is None and second.state == "queued" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert second.state == "queued" and device.host_share() == pytest.approx(used), second.to_dict()
        lane.bookings.clear()
        deadline = time.monotonic() + 5
        while "share" not in seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen["share"] == pytest.approx(used)
        release.set()
    finally:
        release.set()
        store.shutdown()
        lane.shutdown()


def test_what_a_job_remembers_of_its_model_is_its_steps_use_not_its_set_up():
    """The span before a job's first step holds its set-up (a projection's networks built and its
    first step warmed: ~1.3 s, little of it on every thread). Remembered, it made the next job of
    the model look light: a one-step job's set-up was all that was measured, the next job started
    at once beside an upscale admitted before it and pushed it toward its deadline (a real-server
    test caught it). Now a job of one step, however long its set-up, leaves nothing remembered,
    and a job that idles through its set-up and then spins a thread is remembered at the thread's
    share, not at the set-up's idle."""
    from service.jobs import JobStore
    from service.lanes import HOST_WORK_SAMPLE_S

    device = SharedDevice()
    store = JobStore(max_active=4, max_seconds=30, memory=MemoryBudget(total=2**30), device=device, job_share=lambda: 1.0,
                     booked_lanes=lambda: [])

    def set_up_then_spin(steps_for_s: float):
        def work(job, tick) -> dict:
            time.sleep(2 * HOST_WORK_SAMPLE_S)  # the set-up: nothing computed
            tick(1)
            spin_steps(steps_for_s, tick)
            return {}
        return work

    def finished(job) -> None:
        deadline = time.monotonic() + 10
        while job.state != "done" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.state == "done", job.to_dict()

    try:
        finished(store.submit("project", "style", 1, set_up_then_spin(0.0)))
        assert "style" not in store.measured_shares and store.share_of("style") == 1.0
        finished(store.submit("project", "style", 1, set_up_then_spin(3 * HOST_WORK_SAMPLE_S + 0.2)))
        used = store.measured_shares["style"]
        assert 0.5 / device.cpus <= used <= min(1.0, 1.0 / device.cpus + 0.15), used
    finally:
        store.shutdown()


def test_the_idle_server_is_not_timed_while_other_processes_are_busy():
    """Lanes idle is not the device idle: timed beside two spinning processes, a model's
    correction was set to their slowness and kept after they had gone (503 "slower than
    measured lately" on an idle machine, found through the real server under `--workers`)."""
    from types import SimpleNamespace

    from service.remeasure import server_busy

    device = SharedDevice()
    registry = SimpleNamespace(shared_device=device, memory=SimpleNamespace(used=0), jobs=SimpleNamespace(active=lambda: 0),
                               all_models=lambda: [])
    assert not server_busy(registry)
    device.reported_other_share = 0.5
    assert server_busy(registry)
