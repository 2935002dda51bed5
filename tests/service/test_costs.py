"""What warm-up measures a graph's batches to cost (service/costs.py), on real allocations read
off the process's peak resident memory."""
from __future__ import annotations

import numpy as np
import pytest

from service.costs import CostProbe, measure_cost
from service.memory import measure_peak, return_freed_memory_to_the_os

MIB = 2**20


def graph_paying_once(first_run_mib: int, per_item_mib: int):
    """A graph whose first run ever keeps `first_run_mib` for good (a runtime's lazily loaded
    kernels, TorchScript's profiling runs) and whose every run holds `per_item_mib` an item while
    it computes."""
    kept: list[np.ndarray] = []

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        if not kept:
            kept.append(np.ones(first_run_mib * MIB // 8))
        work = np.ones((len(inputs["z"]), per_item_mib * MIB // 8))
        return work[:, :4].astype(np.float32)

    return run


def batch_of(size: int) -> dict[str, np.ndarray]:
    return {"z": np.zeros((size, 8), np.float32)}


@pytest.fixture(autouse=True)
def allocator_as_the_server_sets_it():
    """The server sends every buffer of 1 MiB or more to mmap (service/memory.py); without that,
    glibc serves them from heap pages an earlier free left resident, and no run adds anything."""
    if measure_peak(lambda: None)[1] is None:
        pytest.skip("the peak resident memory cannot be reset here (not Linux)")
    return_freed_memory_to_the_os()


def test_what_a_graphs_first_run_keeps_is_not_charged_to_every_unit():
    """64 MiB paid once and 1 MiB an item: a 64-image request costs ~64 MiB, not 64 x 65 (which
    refused it, 413, where `--workers` fronts share the budget)."""
    cost, _ = measure_cost(graph_paying_once(64, 1), batch_of, [(1, 1.0), (8, 8.0)], None, repeats=1)
    assert cost.warmed == (1.0, 8.0)
    assert 1 * MIB <= cost.bytes_per_unit <= 2 * MIB, cost.bytes_per_unit / MIB


def test_a_graph_warmed_at_one_shape_keeps_that_shapes_whole_figure():
    """Nothing to tell what was paid once from what each run needs: too high, never too low."""
    cost, _ = measure_cost(graph_paying_once(64, 1), batch_of, [(1, 1.0)], None, repeats=1)
    assert cost.bytes_per_unit >= 65 * MIB


def test_an_items_own_arrays_are_the_least_it_is_charged():
    """A run whose buffers the allocator already holds adds no resident memory; its inputs and
    output still exist while it computes."""
    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return np.zeros((len(inputs["z"]), 3, 64, 64), np.float32)

    cost, _ = measure_cost(run, lambda size: {"z": np.zeros((size, 512), np.float32)}, [(1, 1.0), (4, 4.0)], None, repeats=1)
    assert cost.bytes_per_unit >= 3 * 64 * 64 * 4 + 512 * 4


def test_both_ends_of_a_fit_are_timed_in_turns():
    """A machine whose load fades while a graph is timed slows both ends of its fit alike, so
    the fit keeps its shape (timed one end after the other, the batch of one took the busy
    moments: a batch overhead and a third of the time per unit, optimistic for large requests)."""
    probe = CostProbe(run=lambda inputs: inputs["z"], make_inputs=batch_of, points=((1, 1.0), (4, 4.0)), repeats=3)
    assert probe.order() == [0, 1, 0, 1, 0, 1]
    fading = [3, 3, 2, 2, 1, 1]
    seconds = [probe.points[index][1] * 0.01 * load for index, load in zip(probe.order(), fading)]
    per_unit, overhead = probe.fit_runs(seconds)
    assert per_unit == pytest.approx(0.02) and overhead == pytest.approx(0.0)


def test_a_warm_up_shape_that_runs_out_of_device_memory_caps_the_batches_instead_of_failing_the_model():
    """A 1024² generator's batch of 64 on a small GPU: warm-up keeps the shapes that fit."""
    from service.runtimes import OutOfMemory

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        if len(inputs["z"]) > 8:
            raise OutOfMemory(f"CUDA out of memory: a batch of {len(inputs['z'])}")
        return inputs["z"] * 2

    cost, probe = measure_cost(run, batch_of, [(b, float(b)) for b in (1, 2, 4, 8, 16, 32, 64)], None, repeats=1)
    assert cost.warmed == (1.0, 2.0, 4.0, 8.0) and cost.max_batch_units == 8.0
    assert probe.points[-1] == (8, 8.0)  # the fit rests on the largest shape that ran
    assert cost.batch_items(64, 10.0) == 8 and cost.describe()["max_batch_units"] == 8.0
    with pytest.raises(OutOfMemory):  # not even one fits: the model fails to load, with the reason
        measure_cost(lambda inputs: run({"z": np.zeros((16, 8))}), batch_of, [(1, 1.0), (2, 2.0)], None, repeats=1)


def test_a_graphs_slow_first_runs_are_not_taken_for_its_speed():
    """A fresh process's first runs of a shape can take 2-3x the graph's time (sr-rrdb-x4's tile:
    0.60, 0.43, then 0.21 s, in 2 of 8 starts): timed as they came, the median
    set the model's limits 2-3x tight and left its larger batches unwarmed until the idle
    re-measure. Warm-up runs the shape once more untimed, then until its runs agree."""
    import time

    slow_first = [0.08, 0.08, 0.06, 0.04]  # the first run (memory), then still settling

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        time.sleep(slow_first.pop(0) if slow_first else 0.02)
        return inputs["z"]

    cost, _ = measure_cost(run, batch_of, [(1, 1.0)], None, repeats=3)
    assert cost.per_unit_s == pytest.approx(0.02, rel=0.3), cost.per_unit_s


def test_a_whole_image_through_a_tile_graph_is_estimated_by_what_its_size_showed_not_at_the_tiles_rate():
    """v2 infer sends an upscale graph whole images; warm-up timed tiles only, and a whole image
    ran slower per pixel the larger it was (1.56x at 72 tiles' pixels on a CPU): admitted at the
    tile's rate, an 816² image estimated at 17 s took 27 s, a 504 under load. Its time now grows
    by a prior for sizes not yet seen, and by what batches of its size class showed once one ran;
    that leaves the tiles' correction alone, and what an item holds still grows with its pixels."""
    from service.admission import batch_share_bytes, compute_seconds
    from service.costs import GraphCost
    from service.registry import WHOLE_IMAGE_EXPONENT_CPU

    cost = GraphCost(per_unit_s=0.25, overhead_s=0.0, bytes_per_unit=100_000_000, reference_pixels=96 * 96)
    big, mid = cost.units_for_pixels(816 * 816), cost.units_for_pixels(448 * 448)
    assert cost.size_factor(big) == 1.0  # a graph warmed at every size it serves: as before
    cost.largest_warmed_item, cost.large_item_exponent = 1.0, WHOLE_IMAGE_EXPONENT_CPU
    assert cost.size_factor(0.25) == cost.size_factor(1.0) == 1.0  # a tile, or less: as measured
    assert 1.3 < cost.size_factor(big) < 1.4 and cost.size_factor(mid) < cost.size_factor(big)  # the prior
    assert compute_seconds(cost, [big], 4) == pytest.approx(0.25 * big * cost.size_factor(big))
    assert cost.item_seconds(big) == pytest.approx(0.25 * big * cost.size_factor(big))

    cost.observe(big, 0.25 * big * 1.56, big)  # an 816² image took 1.56x the tile's rate
    cost.observe(big, 0.25 * big * 1.56, big)
    assert 1.48 < cost.size_factor(big) <= 1.56 and cost.current_correction() == 1.0  # tiles keep their estimate
    prior = cost.size_factor(mid)
    for _ in range(8):  # 448² images, 1.04x: good news is trusted slowly
        cost.observe(mid, 0.25 * mid * 1.04, mid)
    assert 1.04 <= cost.size_factor(mid) < 1.1 < prior
    assert cost.size_factor(cost.units_for_pixels(1024 * 1024)) >= cost.size_factor(big)  # larger than any seen: not cheaper
    cost.observe(1.0, 0.25, 1.0)  # a tile batch still moves the correction
    assert cost.describe()["size_factors"] == {"16": cost.size_factors[4], "64": cost.size_factors[6]}
    assert batch_share_bytes(cost, [big], 4, 10.0) == cost.bytes_for(big)  # memory: by pixels


def test_a_translate_larger_than_warm_up_ran_is_limited_by_what_its_size_showed():
    """CycleGAN's fit runs up to 512²; a 2048² translate, the largest listed, took 1.3-1.5x its
    estimate (docs/benchmarks.md), and the correction it pushed up made every small translate
    look slow for a while. Now its size class keeps its own factor, the small ones keep theirs,
    and the listed largest input shrinks to what the factors say fits the compute limit."""
    from types import SimpleNamespace

    from service.admission import derive_limits
    from service.costs import GraphCost
    from service.settings import Settings

    cost = GraphCost(per_unit_s=0.0035, overhead_s=0.005, bytes_per_unit=1_000_000, reference_pixels=64 * 64, warmed=(1.0, 4.0, 64.0))
    cost.largest_warmed_item = 64.0
    model = SimpleNamespace(config=SimpleNamespace(lane_threads=1, max_input_pixels=4096 * 4096), costs={"model": cost},
                            entry=SimpleNamespace(kind="translation", spec={"in_channels": 3, "channels": 3, "size_multiple": 4}))
    settings = Settings(request_timeout_s=5.0)  # 4 s of compute
    before = derive_limits(model, settings, 2**40).max_input_pixels
    big = cost.units_for_pixels(2048 * 2048)
    cost.observe(big, 0.005 + 0.0035 * big * 1.5, big)  # a 2048² translate took 1.5x the fit
    after = derive_limits(model, settings, 2**40).max_input_pixels
    assert cost.current_correction() == 1.0 and cost.size_factor(cost.units_for_pixels(512 * 512)) == 1.0
    assert after < 2048 * 2048 <= before  # 2048² no longer listed (a size class starts there: smaller ones keep the fit)
    assert cost.batch_seconds(cost.units_for_pixels(after), item_units=cost.units_for_pixels(after)) <= 4.0
