"""Admission's 503s say why, with a Retry-After that means something: the work queued before a
request, a model that has run slower than measured lately, or a deadline the upload used up."""
from __future__ import annotations

import pytest

from service.admission import ModelLimits, RequestCost, admit
from service.costs import GraphCost
from service.errors import ApiError
from service.lanes import Lane
from service.memory import MemoryBudget
from service.registry import LoadedModel
from service.repository import scan_repository


@pytest.fixture
def upx4(repository):
    entry = next(e for e in scan_repository(repository) if e.name == "upx4")
    lane = Lane("admission-test", 1)
    model = LoadedModel(entry, lane=lane, costs={"model": GraphCost(per_unit_s=1.0, overhead_s=0.0, bytes_per_unit=0, reference_pixels=96 * 96)},
                        limits=ModelLimits(compute_seconds=24.0))
    yield model
    lane.shutdown()


def refusal(model: LoadedModel, seconds: float, remaining_s: float = 30.0) -> ApiError:
    with pytest.raises(ApiError) as refused:
        admit(model, RequestCost(seconds, 0), remaining_s, MemoryBudget(10**9), recheck_s=30.0)
    return refused.value


def test_work_queued_before_a_request_is_what_its_retry_after_waits_out(upx4):
    upx4.lane.add_backlog(10.0)
    refused = refusal(upx4, 20.0)
    assert refused.status == 503 and "10.0 s of work queued" in refused.message
    assert refused.headers["Retry-After"] == "6"  # 10 + 20 - 0.8 x 30: then it fits
    upx4.lane.remove_backlog(10.0)
    assert admit(upx4, RequestCost(20.0, 0), 30.0, MemoryBudget(10**9)) == 20.0


def test_a_model_slower_than_measured_lately_says_so_and_retries_after_the_idle_re_measure(upx4):
    """On an idle lane the queue is no reason: a probe saw '0.0 s of work queued … retry in 15 s',
    which no wait changes, for an upscale the limits allowed."""
    upx4.costs["model"].correction = 1.7
    refused = refusal(upx4, 20.0)
    assert refused.status == 503 and "1.7x slower than measured lately" in refused.message and "queued" not in refused.message
    assert refused.headers["Retry-After"] == "30"  # when an idle server times it again (service/remeasure.py)
    assert admit(upx4, RequestCost(10.0, 0), 30.0, MemoryBudget(10**9)) == pytest.approx(17.0)  # smaller ones still fit


def test_a_deadline_the_upload_used_up_is_named(upx4):
    refused = refusal(upx4, 20.0, remaining_s=12.0)
    assert refused.status == 503 and "its deadline leaves 9.6 s" in refused.message and refused.headers["Retry-After"] == "1"
    assert refusal(upx4, 25.0).status == 413  # past the limit: never, whatever the moment
