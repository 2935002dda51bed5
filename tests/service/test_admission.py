"""Admission's 503s say why, with a Retry-After that means something: the work queued before a
request, a model that has run slower than measured lately, or a deadline the upload used up; and
an answer's encoding is admitted with it, behind the encodings admitted before it."""
from __future__ import annotations

import io
import socket
import time

import numpy as np
import pytest
from PIL import Image

from service.admission import ModelLimits, RequestCost, admit
from service.costs import GraphCost
from service.encoder_backlog import EncoderBacklog
from service.errors import ApiError
from service.lanes import Lane
from service.memory import MemoryBudget
from service.registry import LoadedModel
from service.repository import scan_repository


def png_bytes(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


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


@pytest.fixture
def beside(upx4):
    """A second model, on its own lane, on the same device as upx4's."""
    lane = Lane("admission-test-beside", 1)
    yield LoadedModel(upx4.entry, lane=lane, costs={"model": GraphCost(per_unit_s=1.0, overhead_s=0.0, bytes_per_unit=0, reference_pixels=96 * 96)},
                      limits=ModelLimits(compute_seconds=24.0))
    lane.shutdown()


def test_work_queued_on_other_models_lanes_counts_as_far_as_it_runs_beside_a_request(upx4, beside):
    """The cores are shared: an upscale admitted at an estimated 9 s on its own lane once took
    26 s beside two busy models. Another lane's work stretches a request's own for as long as
    both run (processor sharing), and the Retry-After waits that out too."""
    beside.lane.add_backlog(16.0)
    with pytest.raises(ApiError) as refused:
        admit(upx4, RequestCost(14.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane])
    assert refused.value.status == 503 and "other models on the same device about 14.0 s more" in refused.value.message
    assert refused.value.headers["Retry-After"] == "4"  # 14 + 14 beside - 0.8 x 30
    assert admit(upx4, RequestCost(10.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane]) == 10.0  # 10 + 10 beside fits
    upx4.lane.share = beside.lane.share = 0.5  # runtimes each on half the cores: they do not slow each other
    assert admit(upx4, RequestCost(14.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane]) == 14.0


def test_a_request_that_would_push_one_admitted_beside_it_past_its_deadline_waits_for_it(upx4, beside):
    """Admitting a request slows the requests already admitted to other models: 20 s admitted
    beside, which may end 27 s from now (0.9 of its deadline), has room for 7 s of other work
    beside it, not 10."""
    booked = []
    assert admit(beside, RequestCost(20.0, 0), 30.0, MemoryBudget(10**9), beside=[upx4.lane], booked=booked) == 20.0
    beside.lane.add_backlog(20.0)  # as the pipeline does
    with pytest.raises(ApiError) as refused:  # its own estimate fits: 10 + 10 beside
        admit(upx4, RequestCost(10.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane])
    assert refused.value.status == 503 and "would make requests admitted to other models on the same device miss their deadlines" in refused.value.message
    assert refused.value.headers["Retry-After"] == "20"  # when the request it would push ends
    mine = []
    assert admit(upx4, RequestCost(5.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane], booked=mine) == 5.0
    assert booked[0].finish - mine[0].finish == pytest.approx(20 + 5 - (5 + 5), abs=0.01)  # pushed 5 s later; its own ends after 5 + 5
    booked[0].finish += 1.9  # 26.9 s from now: 0.1 s of room left
    with pytest.raises(ApiError):
        admit(upx4, RequestCost(0.5, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane])
    assert admit(upx4, RequestCost(0.25, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane]) == 0.25  # under 1 % of its 27 s: slight
    booked[0].latest = time.monotonic() + 0.5  # near its latest, a share of what it has left is next to nothing ...
    assert admit(upx4, RequestCost(0.25, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane]) == 0.25  # ... 1 % of 30 s still is slight
    booked[0].latest = time.monotonic() - 0.1  # past it: nothing refused now brings it back in time
    assert admit(upx4, RequestCost(10.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane]) == 10.0
    beside.lane.bookings.difference_update(booked)  # ended: nothing of it to protect
    beside.lane.remove_backlog(20.0)
    assert admit(upx4, RequestCost(10.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane]) == 10.0


def test_a_clients_short_timeout_limits_its_own_request_and_claims_no_room_beside_it(upx4, beside):
    """A v2 client's `timeout` is its request's deadline (`remaining_s`), not a claim on the
    device: its booking is protected for the server's deadline (`protected_s`), as any request's.
    Booked to its own 1 s, a cheap request to one model refused a 5 s one to another model (it
    would push the cheap one past its second), and a stream of them refused every heavy request."""
    with pytest.raises(ApiError) as refused:  # its own deadline does bound it
        admit(beside, RequestCost(2.0, 0), 1.0, MemoryBudget(10**9), beside=[upx4.lane], protected_s=30.0)
    assert refused.value.status == 503
    for protected_s, heavy_admitted in ((None, False), (30.0, True)):
        booked = []
        assert admit(beside, RequestCost(0.5, 0), 1.0, MemoryBudget(10**9), beside=[upx4.lane], booked=booked, protected_s=protected_s) == 0.5
        beside.lane.add_backlog(0.5)
        try:
            assert admit(upx4, RequestCost(5.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane]) == 5.0
            admitted = True
        except ApiError as error:
            assert "miss their deadlines" in error.message
            admitted = False
        assert admitted == heavy_admitted, protected_s
        beside.lane.bookings.difference_update(booked)
        beside.lane.remove_backlog(0.5)
        upx4.lane.bookings.clear()


def test_the_room_after_the_requests_a_refusal_protected_is_kept_for_the_refused_model(upx4, beside):
    """Refused to keep an upscale in time, a translate came back at its Retry-After to find the
    next upscale admitted in its place, every time: 11 translates answered to 28 upscales in
    `ganserve bench-contention`. The refusal now claims the room after the request it protected,
    for the refused model, until a second past its Retry-After."""
    booked = []
    admit(beside, RequestCost(20.0, 0), 30.0, MemoryBudget(10**9), beside=[upx4.lane], booked=booked)
    beside.lane.add_backlog(20.0)
    with pytest.raises(ApiError) as refused:  # 10 s beside it would end it 30 s from now, past 27
        admit(upx4, RequestCost(10.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane])
    assert refused.value.headers["Retry-After"] == "20" and upx4.lane.claim is not None
    beside.lane.bookings.difference_update(booked)  # it ended early
    beside.lane.remove_backlog(20.0)
    assert admit(beside, RequestCost(19.0, 0), 30.0, MemoryBudget(10**9), beside=[upx4.lane]) == 19.0  # over before the claimed room
    with pytest.raises(ApiError) as kept:  # 22 s would run into it
        admit(beside, RequestCost(22.0, 0), 30.0, MemoryBudget(10**9), beside=[upx4.lane])
    assert "promised to another model's request" in kept.value.message and kept.value.headers["Retry-After"] == "21"
    assert admit(beside, RequestCost(0.2, 0), 30.0, MemoryBudget(10**9), beside=[upx4.lane]) == 0.2  # a slight one still goes
    assert admit(upx4, RequestCost(10.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane]) == 10.0  # the refused model's turn
    assert upx4.lane.claim is None
    assert admit(beside, RequestCost(10.0, 0), 30.0, MemoryBudget(10**9), beside=[upx4.lane]) == 10.0


def test_the_device_left_beside_other_lanes_steady_demand_is_shared_max_min_fairly():
    """A lane asking less than its fair share takes what it asks; the others split the rest."""
    from service.admission import steady_share

    assert steady_share([]) == 1.0
    assert steady_share([(0.3, 1.0)]) == pytest.approx(0.7)
    assert steady_share([(1.0, 1.0)]) == pytest.approx(0.5)  # never idle: half each
    assert steady_share([(0.5, 1.0)]) == pytest.approx(0.5)  # (what such a lane reads while it shares with one other)
    assert steady_share([(1.0, 1.0), (1.0, 1.0)]) == pytest.approx(1 / 3)
    assert steady_share([(0.2, 1.0), (1.0, 1.0)]) == pytest.approx(0.4)  # 0.2 + 0.4 + 0.4
    assert steady_share([(1.0, 0.0), (0.9, 0.5)]) == pytest.approx(2 / 3)  # threads that fit the cores together crowd less


def test_other_models_steady_streams_count_for_as_long_as_a_request_computes(upx4, beside):
    """Probed: beside four clients streaming StyleGAN and small translates, a 640² image admitted at
    13.3 s took 2.7x that and got 504: the streams' backlog is near zero at any moment, yet they
    compute all along. A lane never idle takes half the device while a request computes beside it."""
    beside.lane.count_slight(2.6)  # slight requests worth 0.65 of the last 4 s ...
    assert beside.lane.steady_demand() > 0.6 and beside.lane.expected_wait_s() == 0.0  # ... with nothing queued now
    level = 0.5  # the stream asks more than half: each gets half
    timing: dict[str, float] = {}
    assert admit(upx4, RequestCost(10.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane], timing=timing) == 10.0
    assert timing["beside"] == pytest.approx(10.0 / level - 10.0, rel=0.01)  # Server-Timing's beside: what the stream adds
    with pytest.raises(ApiError) as refused:  # 14 s takes about 28 beside it: past 0.8 x 30
        admit(upx4, RequestCost(14.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane])
    assert refused.value.status == 503 and "would take about 28.0 s beside the streams of requests other models" in refused.value.message
    # were the stream to pause, 14 s fits once its demand has faded to 10 / 24 (14 + 14 d / (1 - d) <= 24): after 4 s x ln(0.65 / 0.417)
    assert refused.value.headers["Retry-After"] == "2" and "while they go on at this pace, it will not fit" in refused.value.message
    beside.lane.add_backlog(12.0)  # a queue beside it that alone keeps it out (14 + 12 > 24): the queue's refusal
    with pytest.raises(ApiError) as queued:
        admit(upx4, RequestCost(14.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane])
    assert "other models on the same device about 14.0 s more" in queued.value.message
    beside.lane.remove_backlog(12.0)
    upx4.lane.share = beside.lane.share = 0.5  # runtimes each on half the cores: the stream does not slow it
    assert admit(upx4, RequestCost(14.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane]) == 14.0


def test_a_booking_beside_a_stream_ends_after_what_is_queued_and_the_stream_pushes_it_as_it_comes(upx4, beside):
    """The stream's future requests are counted in the estimate, not in the booking: each one
    pushes the booking as it is admitted (`book`), so counting them there as well would refuse
    other models' requests for pushes that were counted twice."""
    beside.lane.count_slight(2.6)
    booked = []
    admit(upx4, RequestCost(10.0, 0), 30.0, MemoryBudget(10**9), beside=[beside.lane], booked=booked)
    assert booked[0].finish - time.monotonic() == pytest.approx(10.0, abs=0.05)


def test_a_workers_engine_refuses_what_the_work_beside_it_would_push_past_its_deadline():
    """The engine's last look at a request a front admitted (`--workers`) counts the other lanes'
    work beside it as one process does; with nothing queued anywhere, the front's word stands."""
    from service.admission import recheck_in_the_engine

    recheck_in_the_engine("upx4", 0.0, 20.0, 30.0)  # nothing queued: admitted by the front, not second-guessed
    with pytest.raises(ApiError) as refused:
        recheck_in_the_engine("upx4", 0.0, 14.0, 30.0, beside_s=14.0)
    assert refused.value.status == 503 and "other models on the same device about 14.0 s more" in refused.value.message
    assert refused.value.headers["Retry-After"] == "4"


def test_a_request_past_the_compute_limit_is_told_what_to_ask_less_of(upx4):
    """A style model's interpolation was told to "send fewer or smaller images": its images
    cannot be smaller, and what it can ask for less of is frames."""
    with pytest.raises(ApiError) as refused:
        admit(upx4, RequestCost(30.0, 0, smaller="ask for fewer frames (steps)"), 30.0, MemoryBudget(10**9))
    assert refused.value.status == 413 and refused.value.message.endswith("at most 24.0 s here: ask for fewer frames (steps)")


def test_the_largest_upscale_the_limits_list_is_admitted_on_an_idle_lane_beside_a_little_noise(upx4):
    """A hostile probe sent sr-rrdb-x4 its listed largest side, 736² (81 tiles at 0.293 s: 23.7 s
    of the 24.0 s a 30 s deadline leaves compute), to an idle server five times: 503 every time,
    "has run 1.0x slower than measured lately", retry in 30 s, for as long as it retried. The
    idle re-measure had kept a correction of 1.019, and the upload's seconds come off the
    deadline too: the listed limit had no room for either. The limits now list 95 % of that
    share: the listed largest side is admitted at a 1.03 correction after a 0.5 s upload, and a
    refusal for a small correction says it in per cent."""
    from service.admission import admit, derive_limits, tile_count
    from service.model_config import serving_config
    from service.settings import Settings

    settings = Settings(request_timeout_s=30.0)
    upx4.config = serving_config(upx4.entry, settings).model_copy(update={"upscale_tile": 96, "upscale_overlap": 8, "max_input_pixels": 4096 * 4096})
    cost = upx4.costs["model"] = GraphCost(per_unit_s=0.293, overhead_s=0.0, bytes_per_unit=0, reference_pixels=96 * 96)
    upx4.limits = limits = derive_limits(upx4, settings, 2**40)
    side = limits.max_input_side
    largest = cost.per_unit_s * tile_count(side, side, upx4.config)
    assert tile_count(side + 1, side + 1, upx4.config) > limits.max_tiles  # (the listed side is the largest)
    cost.correction = cost.recalibrated_to = 1.03  # what the idle lane last timed: it stays
    assert admit(upx4, RequestCost(largest, 0), 30.0 - 0.5, MemoryBudget(10**9)) == pytest.approx(largest * 1.03)
    upx4.lane.remove_backlog(largest * 1.03)
    cost.correction = cost.recalibrated_to = 1.3
    refused = refusal(upx4, largest, 29.5)
    assert refused.status == 503 and "has run 30 % slower than measured lately" in refused.message, refused.message


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


def test_a_slowness_no_batch_renews_fades_and_the_retry_after_says_when_the_request_fits(upx4):
    """One slow spell put an upscaler's correction at 6.8 and refused its every request "retry
    in 30 s" for 3 minutes on an almost idle server: no batch of it could run to say otherwise,
    and another model's trickle kept the idle re-measure away (a hostile probe). The correction
    a batch set goes halfway back every 30 s while no batch renews it."""
    cost = upx4.costs["model"]
    cost.correction, cost.observed_at = 1.7, time.monotonic()  # as a batch just left it
    with pytest.raises(ApiError) as refused:
        admit(upx4, RequestCost(20.0, 0), 30.0, MemoryBudget(10**9), recheck_s=120.0)
    assert refused.value.status == 503 and "slower than measured lately" in refused.value.message
    assert refused.value.headers["Retry-After"] == "55"  # 30 s x log2(0.7 / 0.2): 20 s x 1.2 fits 24 s
    cost.observed_at -= 60  # two half-lives later: 1 + 0.7 / 4
    assert admit(upx4, RequestCost(20.0, 0), 30.0, MemoryBudget(10**9)) == pytest.approx(20 * 1.175, rel=1e-3)  # (it fades on meanwhile: a CI run took 0.4 ms here)


def test_a_deadline_the_upload_used_up_is_named(upx4):
    refused = refusal(upx4, 20.0, remaining_s=12.0)
    assert refused.status == 503 and "its deadline leaves 9.6 s" in refused.message and refused.headers["Retry-After"] == "1"
    assert refusal(upx4, 25.0).status == 413  # past the limit: never, whatever the moment


def test_an_answer_that_could_not_be_encoded_within_a_whole_timeout_is_413_naming_its_format(upx4):
    """Its compute fits (10 s of the 24 s limit); its encoding after it (25 s) never could."""
    with pytest.raises(ApiError) as refused:
        admit(upx4, RequestCost(10.0, 0, encode_seconds=25.0, encode_format="png"), 30.0, MemoryBudget(10**9), encoding=EncoderBacklog(2), timeout_s=30.0)
    assert refused.value.status == 413 and "25.0 s to encode as png" in refused.value.message and "jpeg or npy" in refused.value.message


def test_encodings_queued_before_a_request_are_what_its_retry_after_waits_out(upx4):
    """The encoder pool is every model's: an answer admitted behind 30 s of others' encoding (two
    threads) would be encoded after its deadline, so it is refused now, not answered late."""
    encoding = EncoderBacklog(2)
    queued = encoding.add(60.0)
    with pytest.raises(ApiError) as refused:
        admit(upx4, RequestCost(2.0, 0, encode_seconds=5.0), 30.0, MemoryBudget(10**9), encoding=encoding, timeout_s=30.0)
    assert refused.value.status == 503 and "30.0 s of encoding queued" in refused.value.message
    assert refused.value.headers["Retry-After"] == "7"  # 2 + 30 + 5 - 30
    assert encoding.seconds == 60.0  # a refused request adds nothing
    encoding.remove_micros(queued)
    assert admit(upx4, RequestCost(2.0, 0, encode_seconds=5.0), 30.0, MemoryBudget(10**9), encoding=encoding, timeout_s=30.0) == 2.0
    assert encoding.seconds == 5.0  # until its answer is encoded


def test_a_request_the_memory_budget_refuses_leaves_nothing_in_the_encoder_backlog(upx4):
    encoding = EncoderBacklog(2)
    with pytest.raises(ApiError) as refused:
        admit(upx4, RequestCost(2.0, 2 * 10**9, encode_seconds=5.0), 30.0, MemoryBudget(10**9), encoding=encoding, timeout_s=30.0)
    assert refused.value.status == 413 and encoding.seconds == 0.0


def test_every_answer_leaves_the_encoder_backlog_once_encoded(server):
    """Through the real server: each kind of answer is counted in the encoder pool's backlog from
    admission until it is encoded, and nothing stays (a leak would refuse every answer, 503, once
    it reached a deadline's worth)."""
    with server.client() as client:
        answers = [client.post("/v1/models/digits/generate", json={"seed": 1, "n": 16}),
                   client.post("/v1/models/digits/generate", json={"seed": 1, "n": 4, "layout": "list", "format": "webp"}),
                   client.post("/v1/models/styles/interpolate", json={"seeds": [1, 2], "steps": 5}),
                   client.post("/v1/models/styles/style-mix", json={"row_seeds": [1, 2], "col_seeds": [3], "format": "jpeg"}),
                   client.post("/v1/models/upx4/upscale", content=png_bytes(48), headers={"content-type": "image/png"}),
                   client.post("/v1/models/edges/translate?format=jpeg", content=png_bytes(32), headers={"content-type": "image/png"})]
    assert [answer.status_code for answer in answers] == [200] * len(answers), [answer.text[:200] for answer in answers]
    assert server.metric("ganserve_encoder_backlog_seconds") == 0.0


def test_a_request_that_never_fits_the_memory_budget_is_413_before_any_encoding_503(upx4):
    """A hostile probe: after load had made the model run 2.3-3.3x slower than measured, a request
    needing more than the whole budget got the encoding check's 503 'retry in 1 s', for as long as
    the slowdown lasted, instead of its 413."""
    upx4.costs["model"].correction = 2.0
    with pytest.raises(ApiError) as refused:
        admit(upx4, RequestCost(10.0, 2 * 10**9, encode_seconds=12.0), 30.0, MemoryBudget(10**9), encoding=EncoderBacklog(2), timeout_s=30.0)
    assert refused.value.status == 413 and "MiB" in refused.value.message


def test_an_encoding_that_fits_only_at_the_measured_speed_names_the_slowdown_and_retries_after_the_re_measure(upx4):
    """Not the encoder pool's queue (it is empty): the model's recent slowdown leaves no room for
    the encoding, so it says so and retries when an idle server times the model again, as the
    lane's own check does; the memory it reserved is handed back."""
    upx4.costs["model"].correction = 2.0
    budget = MemoryBudget(10**9)
    with pytest.raises(ApiError) as refused:
        admit(upx4, RequestCost(10.0, 1000, encode_seconds=12.0), 30.0, budget, recheck_s=30.0, encoding=EncoderBacklog(2), timeout_s=30.0)
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "30"
    assert "20.0 s of compute (its model has run slower than measured lately) and 12.0 s of encoding" in refused.value.message
    assert budget.used == 0


def test_the_encoder_backlog_comes_back_to_exactly_zero_whatever_the_order():
    """Float sums added and taken off in another order left 1.1e-16 on the gauge for good."""
    encoding = EncoderBacklog(2)
    estimates = [0.1, 0.2, 0.3, 1e-7, 7.77, 0.000123]
    counted = [encoding.add(seconds) for seconds in estimates]
    for micros in reversed(counted):
        encoding.remove_micros(micros)
    assert encoding.seconds == 0.0


def test_admissions_refusals_are_counted_by_reason(repository):
    """A request refused by admission (413 past the compute a deadline allows, 503 behind the
    queue or the memory in flight) showed only in requests_total's status: a dashboard of
    `ganserve_rejected_total{reason}` saw nothing of them."""
    from tests.serving import running_server

    with running_server(repository, models=["styles"], request_timeout_s=0.005) as server, server.client() as client:
        refused = client.post("/v1/models/styles/generate", json={"n": 256})
        assert refused.status_code == 413 and "s of compute" in refused.json()["error"]["message"], refused.text
        assert "send fewer images (n or seeds)" in refused.json()["error"]["message"]
        assert server.metric("ganserve_rejected_total", model="styles", operation="generate", reason="too_expensive") == 1
        # a request whose deadline passed before admission (its body came late) is 504, where admission read the
        # negative time left as a wait to retry after (503 "retry in 1 s"); one too costly for any deadline stays 413
        from tests.service.test_hostile import read_until_closed

        body = b'{"seed": 1}'
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/models/styles/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                         b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body))
            time.sleep(0.2)  # 40 deadlines of this server
            sock.sendall(body)
            late = read_until_closed(sock, 10)
        assert late.startswith(b"HTTP/1.1 504") and b"deadline passed before it reached admission" in late, late[:400]
        assert server.metric("ganserve_rejected_total", model="styles", operation="generate", reason="overloaded") == 0
        assert server.metric("ganserve_rejected_total", model="styles", operation="generate", reason="deadline_before_admission") == 1
