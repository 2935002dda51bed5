"""The batcher's own rules, driven directly with a recording runtime (no HTTP needed to see
which items shared a forward pass)."""
import asyncio
import time

import numpy as np
import pytest

from service.batcher import BatchKey, DeadlineExceeded, DynamicBatcher, QueueFull, RequestState, RequestTooLarge, ShuttingDown, run_items
from service.costs import GraphCost
from service.lanes import Lane, SharedDevice
from service.metrics import ServiceMetrics
from service.runtimes import OutOfMemory


class RecordingRuntime:
    """Doubles its input; remembers every batch size; runs out of memory above `memory_items`."""

    def __init__(self, memory_items: int = 10_000, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.contents: list[list[float]] = []  # each batch's items, by their first value
        self.memory_items = memory_items
        self.delay_s = delay_s

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        x = inputs["x"]
        if len(x) > self.memory_items:
            raise OutOfMemory(f"{len(x)} items do not fit")
        time.sleep(self.delay_s)
        self.batches.append(len(x))
        self.contents.append([float(v) for v in x[:, 0]])
        return x * 2


def make_batcher(runtime: RecordingRuntime, **settings) -> DynamicBatcher:
    options = dict(max_batch_size=8, max_queue_delay_ms=20, max_queue_size=64) | settings
    return DynamicBatcher(BatchKey("m", 1, "op"), runtime.run, Lane("m", 1), ServiceMetrics(), **options)


def items(values, size: int = 3) -> list[dict[str, np.ndarray]]:
    return [{"x": np.full(size, v, dtype=np.float32)} for v in values]


def alive(seconds: float = 5.0) -> RequestState:
    return RequestState(deadline=time.monotonic() + seconds)


def test_items_from_concurrent_requests_share_a_forward_pass_and_get_their_own_results():
    async def scenario():
        runtime = RecordingRuntime()
        batcher = make_batcher(runtime)
        results = await asyncio.gather(*(run_items(batcher, items([i]), alive()) for i in range(8)))
        await batcher.close()
        return runtime, results

    runtime, results = asyncio.run(scenario())
    assert runtime.batches == [8]
    assert [r[0][0] for r in results] == [2.0 * i for i in range(8)]


def test_items_of_different_shapes_never_share_a_batch():
    async def scenario():
        runtime = RecordingRuntime()
        batcher = make_batcher(runtime)
        small, large = items(range(3), size=2), items(range(3), size=5)
        out = await asyncio.gather(run_items(batcher, small, alive()), run_items(batcher, large, alive()))
        await batcher.close()
        return runtime, out

    runtime, (small, large) = asyncio.run(scenario())
    assert sorted(runtime.batches) == [3, 3]
    assert [a.shape for a in small] == [(2,)] * 3 and [a.shape for a in large] == [(5,)] * 3


def test_out_of_memory_splits_the_batch_retries_and_lowers_the_cap():
    async def scenario():
        runtime = RecordingRuntime(memory_items=3)
        batcher = make_batcher(runtime)
        out = await run_items(batcher, items(range(8)), alive())
        cap = batcher.max_batch_size
        await batcher.close()
        return runtime, out, cap

    runtime, out, cap = asyncio.run(scenario())
    assert [o[0] for o in out] == [2.0 * i for i in range(8)]  # nothing lost
    assert max(runtime.batches) <= 3 and sum(runtime.batches) == 8
    assert cap <= 2


def test_a_request_larger_than_the_free_queue_is_refused_whole():
    async def scenario():
        batcher = make_batcher(RecordingRuntime(), max_queue_size=4, max_queue_delay_ms=500)
        batcher.submit(items(range(2)), alive())
        with pytest.raises(QueueFull) as refused:
            batcher.submit(items(range(3)), alive())
        assert len(batcher.queue) == 2  # nothing of it was queued
        await batcher.close()
        return refused.value

    assert asyncio.run(scenario()).retry_after_s >= 1


def test_a_request_larger_than_the_whole_queue_is_refused_as_never_fitting():
    async def scenario():
        batcher = make_batcher(RecordingRuntime(), max_queue_size=4)
        with pytest.raises(RequestTooLarge):
            batcher.submit(items(range(5)), alive())
        await batcher.close()

    asyncio.run(scenario())


def test_a_batch_stops_at_its_cost_budget_as_well_as_its_item_cap():
    """Items that cost 0.2 s each under a 0.5 s budget go two at a time, though 8 would fit the item cap."""
    async def scenario():
        runtime = RecordingRuntime()
        cost = GraphCost(per_unit_s=0.2, overhead_s=0.0, bytes_per_unit=0, reference_pixels=None)
        batcher = make_batcher(runtime, cost=cost, max_batch_seconds=0.5, max_queue_delay_ms=50)
        await run_items(batcher, items(range(6)), alive())
        await batcher.close()
        return runtime

    assert asyncio.run(scenario()).batches == [2, 2, 2]


def test_a_one_item_request_behind_two_large_ones_goes_in_the_next_batch_and_each_request_keeps_its_order():
    """It waited for all 48 items queued ahead of it (six batches), as a benign client of a
    StyleGAN waited 6-16 s behind two clients' 64-image requests."""
    async def scenario():
        runtime = RecordingRuntime(delay_s=0.02)
        batcher = make_batcher(runtime, max_queue_delay_ms=0)
        first = asyncio.ensure_future(run_items(batcher, items(range(100, 124)), alive()))
        second = asyncio.ensure_future(run_items(batcher, items(range(200, 224)), alive()))
        await asyncio.sleep(0.005)  # the first batch is computing
        lone = await run_items(batcher, items([7]), alive())
        await asyncio.gather(first, second)
        await batcher.close()
        return runtime, lone

    runtime, lone = asyncio.run(scenario())
    assert lone[0][0] == 14.0
    assert 7.0 in runtime.contents[1] and runtime.batches[1] == 8
    for start in (100, 200):  # each request's items are computed in order, none lost or repeated
        assert [v for batch in runtime.contents for v in batch if start <= v < start + 100] == list(range(start, start + 24))


def test_a_batch_with_room_for_one_item_takes_the_least_served_request_first_but_never_starves_one_at_risk():
    """Cost caps of one item a batch (a large StyleGAN on a CPU): a newcomer goes before the older
    requests' next items, unless an older request's remaining compute, twice over, no longer fits
    before its deadline: then its items go first."""
    async def scenario(timeout_s: float):
        runtime = RecordingRuntime(delay_s=0.05)
        cost = GraphCost(per_unit_s=0.05, overhead_s=0.0, bytes_per_unit=0, reference_pixels=None)
        batcher = make_batcher(runtime, max_queue_delay_ms=0, max_batch_size=1, cost=cost)
        first = asyncio.ensure_future(run_items(batcher, items(range(100, 106)), alive(timeout_s)))
        await asyncio.sleep(0.075)  # 100 computed, 101 computing
        second = asyncio.ensure_future(run_items(batcher, items(range(200, 203)), alive()))
        await asyncio.sleep(0.05)  # 200 computing
        lone = asyncio.ensure_future(run_items(batcher, items([7]), alive()))
        await asyncio.gather(first, second, lone)
        await batcher.close()
        return [batch[0] for batch in runtime.contents]

    shared = asyncio.run(scenario(timeout_s=5.0))
    assert shared[:4] == [100.0, 101.0, 200.0, 7.0] and sorted(shared) == sorted([*range(100, 106), *range(200, 203), 7.0])
    # 0.45 s: after two items, 0.35 s left for 0.2 s of compute, under twice over: 102 goes before the
    # newcomer, and all six finish in time (gather raised DeadlineExceeded otherwise)
    at_risk = asyncio.run(scenario(timeout_s=0.45))
    assert at_risk[:3] == [100.0, 101.0, 102.0] and [v for v in at_risk if v >= 100 and v < 200] == list(range(100, 106))


def test_a_flood_of_one_item_requests_cannot_starve_a_large_one_past_its_deadline():
    """Newcomers go first only until the large request has waited half of its time: then all its
    items do, and it finishes in time."""
    async def scenario():
        runtime = RecordingRuntime(delay_s=0.05)
        batcher = make_batcher(runtime, max_queue_delay_ms=0, max_batch_size=1)
        large = asyncio.ensure_future(run_items(batcher, items(range(100, 104)), alive(1.0)))
        flood = []
        for i in range(30):  # one newcomer every 40 ms for 1.2 s: always one waiting
            flood.append(asyncio.ensure_future(run_items(batcher, items([i]), alive())))
            await asyncio.sleep(0.04)
        await asyncio.gather(large, *flood)  # DeadlineExceeded if the large request starved
        await batcher.close()
        return [batch[0] for batch in runtime.contents]

    computed = asyncio.run(scenario())
    last = computed.index(103.0)
    assert [v for v in computed[: last + 1] if v >= 100] == [100.0, 101.0, 102.0, 103.0] and last < 20


def test_each_finished_item_takes_its_share_of_its_requests_admitted_backlog_off_the_lane():
    async def scenario():
        runtime = RecordingRuntime(delay_s=0.05)
        cost = GraphCost(per_unit_s=0.1, overhead_s=0.0, bytes_per_unit=0, reference_pixels=None)
        batcher = make_batcher(runtime, cost=cost, max_queue_delay_ms=0, max_batch_size=1)
        request = alive()
        request.lane_seconds = 0.3  # what admission counted for it
        batcher.lane.add_backlog(0.3)
        futures = batcher.submit(items(range(3)), request)
        seen = []
        for future in futures:
            await future
            await asyncio.sleep(0.01)
            seen.append(round(batcher.lane.backlog_s, 6))
        await batcher.close()
        return seen

    assert asyncio.run(scenario()) == [pytest.approx(0.2), pytest.approx(0.1), pytest.approx(0.0)]


def test_a_request_handed_to_a_replacements_batcher_settles_the_lane_it_was_admitted_on():
    """A reload hands a waiting request's items to the replacement's batcher (another lane): its
    shares came off the new lane, which admission then saw emptier than it was (another request's
    backlog there went uncounted), and stayed on the old one."""
    async def scenario():
        cost = GraphCost(per_unit_s=0.1, overhead_s=0.0, bytes_per_unit=0, reference_pixels=None)
        replacement = make_batcher(RecordingRuntime(), cost=cost, max_queue_delay_ms=0)
        admitted_on = Lane("m-replaced", 1)
        request = alive()
        request.lane, request.lane_seconds = admitted_on, 0.3
        admitted_on.add_backlog(0.3)
        replacement.lane.add_backlog(0.5)  # another request's, admitted on the replacement
        await run_items(replacement, items(range(3)), request)
        await replacement.close()
        admitted_on.shutdown()
        return admitted_on.backlog_s, replacement.lane.backlog_s

    old, new = asyncio.run(scenario())
    assert old == pytest.approx(0.0) and new == pytest.approx(0.5)


def test_models_on_their_own_lanes_compute_at_the_same_time():
    """A slow model's batch does not hold up another model's: each lane has its own thread."""
    async def scenario():
        slow, fast = RecordingRuntime(delay_s=0.5), RecordingRuntime()
        slow_batcher = DynamicBatcher(BatchKey("slow", 1, "op"), slow.run, Lane("slow", 1), ServiceMetrics(), 8, 0, 64)
        fast_batcher = DynamicBatcher(BatchKey("fast", 1, "op"), fast.run, Lane("fast", 1), ServiceMetrics(), 8, 0, 64)
        slow_task = asyncio.ensure_future(run_items(slow_batcher, items([1]), alive()))
        await asyncio.sleep(0.05)  # the slow batch is running
        started = time.monotonic()
        await run_items(fast_batcher, items([2]), alive())
        waited = time.monotonic() - started
        await slow_task
        await asyncio.gather(slow_batcher.close(), fast_batcher.close())
        return waited

    assert asyncio.run(scenario()) < 0.25


def test_a_job_knows_how_much_longer_the_other_jobs_on_its_device_made_it_take():
    """The stretch a batch's cost is judged with (GraphCost.observe): ~2 for a job beside another
    that asks for the whole device, ~1 alone or beside one that fits the cores with it."""
    async def stretches(shares: list[float], seconds: float) -> list[float]:
        device = SharedDevice()
        lanes = [Lane(f"l{i}", 1, device, share) for i, share in enumerate(shares)]
        done = await asyncio.gather(*(lane.run_timed(time.sleep, seconds) for lane in lanes))
        for lane in lanes:
            lane.shutdown()
        return [stretch for _, stretch in done]

    assert all(1.8 < stretch < 2.05 for stretch in asyncio.run(stretches([1.0, 1.0], 0.4)))
    assert all(0.95 < stretch < 1.05 for stretch in asyncio.run(stretches([1.0], 0.2)))
    assert all(0.95 < stretch < 1.05 for stretch in asyncio.run(stretches([0.5, 0.5], 0.2)))
    with_three = asyncio.run(stretches([1.0, 1.0, 1.0], 0.4))
    assert all(2.6 < stretch < 3.05 for stretch in with_three)


def test_expired_items_are_dropped_before_compute():
    async def scenario():
        runtime = RecordingRuntime()
        batcher = make_batcher(runtime, max_queue_delay_ms=200)
        with pytest.raises(DeadlineExceeded):
            await run_items(batcher, items([1, 2]), alive(0.05))
        await run_items(batcher, items([3]), alive())
        await batcher.close()
        return runtime

    assert asyncio.run(scenario()).batches == [1]


def test_close_finishes_accepted_items_then_refuses_new_ones():
    async def scenario():
        runtime = RecordingRuntime(delay_s=0.05)
        batcher = make_batcher(runtime, max_batch_size=2, max_queue_delay_ms=0)
        pending = asyncio.ensure_future(run_items(batcher, items(range(6)), alive()))
        await asyncio.sleep(0)
        await batcher.close()
        with pytest.raises(ShuttingDown):
            batcher.submit(items([9]), alive())
        return await pending

    assert [o[0] for o in asyncio.run(scenario())] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_a_failing_model_fails_its_batch_but_not_the_worker():
    class Flaky(RecordingRuntime):
        def run(self, inputs):
            if inputs["x"][0, 0] < 0:
                raise ValueError("bad batch")
            return super().run(inputs)

    async def scenario():
        runtime = Flaky()
        batcher = make_batcher(runtime, max_queue_delay_ms=0)
        with pytest.raises(ValueError):
            await run_items(batcher, items([-1]), alive())
        ok = await run_items(batcher, items([4]), alive())
        await batcher.close()
        return ok

    assert asyncio.run(scenario())[0][0] == 8.0


def test_batches_stay_within_the_units_warm_up_found_to_fit_the_device():
    async def scenario():
        runtime = RecordingRuntime()
        cost = GraphCost(per_unit_s=0.0001, overhead_s=0.0, bytes_per_unit=0, reference_pixels=None, max_batch_units=3.0)
        batcher = make_batcher(runtime, max_batch_size=8, max_queue_delay_ms=50, cost=cost)
        await asyncio.gather(*(run_items(batcher, items([i]), alive()) for i in range(8)))
        await batcher.close()
        return runtime.batches

    batches = asyncio.run(scenario())
    assert sum(batches) == 8 and max(batches) <= 3, batches


def test_a_lanes_steady_demand_counts_what_it_computed_of_slight_requests_only(monkeypatch):
    """Slight requests (pushes admission never refuses) are what other lanes cannot see coming,
    so a lane counts them: when their items are computed, not when admitted. Counted at admission,
    a probe's 89-byte PNGs that never decode (refused inside their work) at 15 a second kept every
    224² upscale beside them refused on 4 % of a core. Heavier requests are left out (bookings guard
    against them), and what a lane counts is held to a full window, so a burst fades as fast as a
    lane busy throughout."""
    import service.lanes

    monkeypatch.setattr(service.lanes, "STEADY_WINDOW_S", 0.5)

    async def scenario() -> list[float]:
        batcher = make_batcher(RecordingRuntime(), cost=GraphCost(per_unit_s=0.05, overhead_s=0.0, bytes_per_unit=0, reference_pixels=None))
        slight, heavy, dropped = alive(), alive(), alive()
        slight.slight = dropped.slight = True
        dropped.cancelled = True  # its client left before its items ran
        await run_items(batcher, items(range(5)), slight)  # 5 x 0.05 s computed: half the lane's window
        seen = [batcher.lane.steady_demand()]
        await run_items(batcher, items([9]), heavy)
        with pytest.raises(DeadlineExceeded):
            await run_items(batcher, items([7]), dropped)
        seen.append(batcher.lane.steady_demand())
        await run_items(batcher, items(range(40)), slight)  # 2 s in a moment: held to the window's 0.5
        seen.append(batcher.lane.steady_demand())
        await asyncio.sleep(1.5)
        seen.append(batcher.lane.steady_demand())
        await batcher.close()
        return seen

    after_five, after_others, after_burst, later = asyncio.run(scenario())
    assert after_five == pytest.approx(0.5, abs=0.05)
    assert after_others == pytest.approx(after_five, abs=0.05)  # the heavy and the dropped request added nothing
    assert after_burst == pytest.approx(1.0, abs=0.01)
    assert later < 0.06  # e^-3
