"""Limits measured at a busy warm-up relax once the server is idle (service/remeasure.py): the
rule on a cost, and a server that warmed while other processes loaded the CPU, then was left alone."""
from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from bench.limits import start_loops, stop
from bench.server import wait_ready
from service.costs import GraphCost
from tests.serving import running_server

pytestmark = pytest.mark.quiet_host  # it times a model on an idle server, which another worker's tests keep busy


def test_a_faster_fit_is_adopted_and_a_slower_one_never():
    cost = GraphCost(per_unit_s=0.3, overhead_s=0.01, bytes_per_unit=0, reference_pixels=None, warmed=(1.0, 2.0))
    assert not cost.relax(0.6, 0.0)  # slower: a busier moment never tightens the limits
    assert not cost.relax(0.29, 0.01)  # within the 10 % margin: noise, not news
    assert not cost.relax(0.1, 0.5)  # faster per unit but slower at one warmed shape
    assert not cost.relax(0.31, 0.0)  # faster at both warmed shapes but not per unit: limits past them would tighten
    assert cost.relax(0.1, 0.01)
    assert (cost.per_unit_s, cost.overhead_s, cost.relaxed) == (0.1, 0.01, 1)
    assert cost.correction == 1.0  # no batches since warm-up: the new fit stands as measured


def test_the_correction_keeps_what_faster_batches_taught_but_drops_what_slower_ones_did():
    faster = GraphCost(per_unit_s=0.4, overhead_s=0.0, bytes_per_unit=0, reference_pixels=None, warmed=(1.0, 2.0), correction=0.25)
    assert faster.relax(0.2, 0.0)
    assert faster.correction == 0.5  # batches ran at 0.1 s a unit: still half the new fit
    slower = GraphCost(per_unit_s=0.4, overhead_s=0.0, bytes_per_unit=0, reference_pixels=None, warmed=(1.0, 2.0), correction=2.0)
    assert slower.relax(0.2, 0.0)
    assert slower.correction == 1.0


def test_batches_of_items_under_one_unit_teach_the_correction_nothing():
    cost = GraphCost(per_unit_s=0.5, overhead_s=0.0, bytes_per_unit=0, reference_pixels=96 * 96, warmed=(1.0,))
    tiny = 16 * 16 / (96 * 96)
    for _ in range(40):  # 16² images at a fifth of the line's estimate, then at five times it
        cost.observe(4 * tiny, 0.2 * 0.5 * 4 * tiny, smallest_item_units=tiny)
        cost.observe(4 * tiny, 5 * 0.5 * 4 * tiny, smallest_item_units=tiny)
    assert (cost.correction, cost.batches_since_fit) == (1.0, 0) and not cost.relax_from_batches()
    cost.observe(2.0 + tiny, 5.0, smallest_item_units=tiny)  # one small item in a batch of tiles is enough to skip it
    assert cost.correction == 1.0
    for _ in range(40):  # tiles, at half the fit
        cost.observe(2.0, 0.5, smallest_item_units=1.0)
    assert cost.correction < 0.8 and cost.relax_from_batches() and cost.per_unit_s < 0.5 * 0.8


def test_a_batch_slowed_by_other_models_work_beside_it_is_not_taken_for_the_models_own_slowness():
    """Admission adds the other lanes' work to a request's estimate (service/admission.py), so a
    batch that took twice its fit beside one other job asking for the whole device is on time.
    The stretch explains slowness away but never makes a batch look faster than it ran."""
    cost = GraphCost(per_unit_s=0.5, overhead_s=0.0, bytes_per_unit=0, reference_pixels=None, warmed=(1.0,))
    cost.observe(2.0, 2.0, stretch=2.0)
    assert cost.correction == 1.0
    cost.observe(2.0, 3.0, stretch=2.0)  # 3x its fit where sharing explains 2x: half as slow again as its own
    assert cost.correction == pytest.approx(0.5 * 1.0 + 0.5 * 1.5)
    faster = GraphCost(per_unit_s=0.5, overhead_s=0.0, bytes_per_unit=0, reference_pixels=None, warmed=(1.0,))
    faster.observe(2.0, 0.5, stretch=2.0)  # half its fit: counted as half, not a quarter
    assert faster.correction == pytest.approx(0.8 + 0.2 * 0.5)


def test_an_idle_re_measure_that_keeps_the_fit_sets_the_correction_to_what_it_timed():
    """A busy spell's correction must not outlive it: an idle lane's timing replaces it."""
    cost = GraphCost(per_unit_s=0.3, overhead_s=0.01, bytes_per_unit=0, reference_pixels=None, warmed=(1.0, 4.0), correction=1.7)
    assert not cost.relax(0.3, 0.01)  # the idle lane runs at the fit: nothing to relax
    assert cost.slowed_since_timed  # timed at the next idle spell, whatever the back-off
    cost.recalibrate(0.3, 0.01)
    assert cost.correction == 1.0 and not cost.slowed_since_timed
    cost.recalibrate(0.45, 0.015)  # still slower than the fit while idle (another tenant): that is the truth of now
    assert abs(cost.correction - 1.5) < 1e-9
    assert not cost.slowed_since_timed  # a machine slower while idle is not timed at every idle spell for it
    cost.observe(1.0, 0.9)  # but batches slower still since are
    assert cost.slowed_since_timed


def square_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def wait_until_loading(server) -> None:
    """Until the process that loads the models (the server, or its `--workers` engine) has
    imported and begun (its log says which encoders it measured, the step before the models)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "encoders:" in server.process.log_path.read_text(errors="replace"):
            return
        assert server.process.poll() is None, "the server died"
        time.sleep(0.02)
    raise TimeoutError("never began loading")


def upx4_costs(client) -> tuple[dict, dict]:
    version = client.get("/v1/models/upx4").json()["versions"][0]
    return version["limits"], version["costs"]["model"]


@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "engine and two fronts"])
def test_an_upscale_refused_after_a_busy_warm_up_is_served_once_the_idle_server_has_timed_its_model_again(repository, workers):
    """Three busy loops per core while the server warms: its tiles time several times slower and
    the largest upload it accepts shrinks with them. Once the loops stop and the server has been
    idle for a second, it times upx4 again, adopts the faster fit, and an image it refused as over
    its limit is upscaled. With `--workers 2` the engine re-measures and the fronts, which refuse
    a 413 before anything reaches the engine, take its new limits from its snapshots."""
    with running_server(repository, wait=False, models=["upx4"], remeasure_idle_s=1, request_timeout_s=2, workers=workers) as server, server.client() as client:
        wait_until_loading(server)  # imported: the loops start as it loads and warms
        loops = start_loops(3 * (os.cpu_count() or 1))
        try:
            wait_ready(server.url, server.process, server.process.log_path)
            busy_limits, busy_cost = upx4_costs(client)
            side = busy_limits["max_input_side"] + 1
            refused = client.post("/v1/models/upx4/upscale", content=square_png(side), headers={"content-type": "image/png"})
            assert refused.status_code == 413, refused.text
            stop(loops)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # a re-measure may already have relaxed it while the loops ran (lanes idle, machine busy)
                idle_limits, idle_cost = upx4_costs(client)
                if idle_cost["relaxed_when_idle"] > busy_cost["relaxed_when_idle"]:
                    break
                time.sleep(0.25)
            assert idle_cost["relaxed_when_idle"] > busy_cost["relaxed_when_idle"], (busy_cost, idle_cost)
            assert idle_cost["seconds_per_unit"] < 0.7 * busy_cost["seconds_per_unit"], (busy_cost, idle_cost)
            assert idle_limits["max_input_side"] > busy_limits["max_input_side"], (busy_limits, idle_limits)
            served = client.post("/v1/models/upx4/upscale", content=square_png(side), headers={"content-type": "image/png"})
            assert served.status_code == 200, served.text
            assert Image.open(io.BytesIO(served.content)).size == (4 * side, 4 * side)
            assert server.metric("ganserve_cost_remeasures_total", model="upx4", outcome="relaxed") >= 1
        finally:
            stop(loops)


def test_a_fit_is_scaled_to_batches_that_ran_faster_than_it_and_only_faster():
    cost = GraphCost(per_unit_s=0.4, overhead_s=0.02, bytes_per_unit=0, reference_pixels=None, warmed=(1.0, 2.0))
    for _ in range(31):
        cost.observe(1.0, 0.105)  # a quarter of the fit
    assert not cost.relax_from_batches()  # too few batches yet
    cost.observe(1.0, 0.105)
    assert cost.correction < 0.3
    correction = cost.correction
    assert cost.relax_from_batches()
    # the correction fades toward 1 while no batch renews it, on between the reading and the relaxation
    # (a full run read 0.10023827 against 0.10023902 s): compared within what a slow moment lets it fade
    assert cost.per_unit_s == pytest.approx(0.4 * correction, rel=1e-3) and cost.overhead_s == pytest.approx(0.02 * correction, rel=1e-3)
    assert (cost.relaxed_by_batches, cost.relaxed, cost.correction, cost.batches_since_fit) == (1, 0, 1.0, 0)
    slower = GraphCost(per_unit_s=0.4, overhead_s=0.02, bytes_per_unit=0, reference_pixels=None, warmed=(1.0, 2.0))
    for _ in range(100):
        slower.observe(1.0, 0.9)  # a busy machine: admission's correction, never the limits
    assert not slower.relax_from_batches() and slower.per_unit_s == 0.4


def test_a_server_never_idle_long_enough_to_be_timed_again_relaxes_from_the_batches_it_serves(repository):
    """The same busy warm-up, but the idle re-measure never comes (`remeasure_idle_s` an hour): a
    steady trickle of one-tile upscales runs far faster than the busy fit, and once 32 batches
    have shown it the fit is scaled to them; the image refused as over the limit is then served."""
    with running_server(repository, wait=False, models=["upx4"], remeasure_idle_s=3600, request_timeout_s=2) as server, server.client() as client:
        wait_until_loading(server)
        loops = start_loops(3 * (os.cpu_count() or 1))
        try:
            wait_ready(server.url, server.process, server.process.log_path)
            busy_limits, busy_cost = upx4_costs(client)
        finally:
            stop(loops)
        side = busy_limits["max_input_side"] + 1
        assert client.post("/v1/models/upx4/upscale", content=square_png(side), headers={"content-type": "image/png"}).status_code == 413
        # 16² images through v2 are batches of a shape warm-up never measured (0.028 of a 96² tile): no
        # evidence about the fit either way (a probe's 40 of them once relaxed sr's limits past what its tiles can do)
        tiny = {"inputs": [{"name": "image", "shape": [4, 3, 16, 16], "datatype": "FP32", "data": [0.5] * (4 * 3 * 16 * 16)}]}
        for _ in range(40):
            assert client.post("/v2/models/upx4/infer", json=tiny).status_code == 200
        time.sleep(1.5)  # the relaxation is checked every second
        limits, cost = upx4_costs(client)
        assert (cost["observed_over_measured"], cost["relaxed_by_batches"], limits) == (busy_cost["observed_over_measured"], 0, busy_limits), cost
        tile = square_png(96)  # the warm-up tile: one unit
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert client.post("/v1/models/upx4/upscale", content=tile, headers={"content-type": "image/png"}).status_code == 200
            limits, cost = upx4_costs(client)
            if cost["relaxed_by_batches"]:
                break
        assert cost["relaxed_by_batches"] == 1 and cost["relaxed_when_idle"] == 0, (busy_cost, cost)
        assert cost["seconds_per_unit"] < 0.7 * busy_cost["seconds_per_unit"], (busy_cost, cost)
        assert limits["max_input_side"] > busy_limits["max_input_side"], (busy_limits, limits)
        served = client.post("/v1/models/upx4/upscale", content=square_png(side), headers={"content-type": "image/png"})
        assert served.status_code == 200, served.text
        assert server.metric("ganserve_cost_remeasures_total", model="upx4", outcome="relaxed_by_batches") == 1
