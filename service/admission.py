"""Admission control: a request's cost is known before it is queued, and what cannot finish is
refused up front instead of timing out thirty seconds later.

- **Limits per model**, derived at load from the measured cost (service/costs.py), and again
  when an idle re-measure finds the model faster (service/remeasure.py; they never tighten): the
  largest image-to-image input whose compute fits the deadline on an idle lane and whose memory
  fits half the budget. Uploads are checked against them from their header, before decoding.
- **Deadline**: a request whose estimated compute, after the backlog already on its model's lane,
  would end past its deadline gets 503 with a Retry-After of when the lane will have room; one
  that could not finish even on an idle lane gets a permanent 413.
- **The lanes beside it**: other models compute on the same cores (or GPU), so the work queued on
  their lanes stretches a request's own, and its own stretches theirs. Its estimate adds the
  others' work that will run beside it (processor sharing: each other lane's, up to as long as
  its own lane's), and it is refused while it would push a request already admitted beside it
  past that request's deadline (`crowded_out`). A 256² upscale admitted at an estimated 9 s
  once took 26 s beside two busy models, where each lane was judged alone. A stream of small
  requests to another model leaves almost nothing queued at any moment yet computes all along,
  and each of them is too slight a push to be refused for the requests it stretches, so each
  other lane's steady demand (`Lane.steady_demand`: the slight requests it computed lately) is
  taken to go on meanwhile (`steady_share`): a 640² image admitted at 13 s beside such
  streams ran 2.7x that and got 504.
- **Memory**: a request reserves what it will hold at its peak from the process budget for its
  whole life; what does not fit now gets 503, what never fits 413.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service import lanes
from service.costs import GraphCost
from service.encoder_backlog import EncoderBacklog
from service.errors import ApiError
from service.host_load import usable_cpus
from service.imaging import DECODE_BYTES_PER_PIXEL
from service.lanes import Booking, Claim, LaneView
from service.memory import ClaimedByAnother, MemoryBudget, OverBudget
from service.settings import Settings
from service.tiling import plan_tiles

if TYPE_CHECKING:
    from service.model_config import ServingConfig
    from service.registry import LoadedModel

COMPUTE_SHARE_OF_DEADLINE = 0.8  # the rest of a deadline is for decoding, queueing and encoding
PROTECTED_SHARE_OF_DEADLINE = 0.9  # how far requests admitted later beside it may push an admitted request's compute
SLIGHT_PUSH = 0.01  # a push of at most this share of the time a booked request has left, or of the request's own deadline, is never refused
CLAIM_GRACE_S = 1.0  # how long room promised with a Retry-After waits for the request to come back
BARRIER_PENALTY = 1.5  # what a runtime of several threads loses per share of the device it is short of (`slowdown`)
TIMEOUT_SPARE = 1.25  # the timeout a 413 names has this much more than the request needed as it was refused ...
# ... and this long besides: a request's hops to the lane and back, and a 2-core host's scheduling, which no estimate holds
# (a DCGAN image named 1.9 ms was 504 or refused as "slower than measured" 15 times in 15; from 5 ms on, all 200 in a probe)
TIMEOUT_FLOOR_S = 0.005
OTHER_LOAD_RETRY_S = 2  # a refusal for other processes' load: when to look again (the reading moves every half second)
REQUEST_SHARE_OF_MEMORY = 0.5  # one request may hold at most this share of the budget
LIMITS_MEMORY_MARGIN = 0.03  # and at most what the loaded models leave of it, less this share
# The limits list (and 413 past) this share less compute than a deadline leaves it, so that what
# they list is served on an idle machine: listed at the deadline's whole compute share, the
# largest listed upscale (81 tiles, 23.7 s of 24.0) was refused 503 every time on an idle server
# (a hostile probe), by the correction its idle re-measure kept (1.019) or the upload's seconds.
LIMITS_COMPUTE_MARGIN = 0.05
FLOAT = 4


@dataclass(frozen=True)
class ModelLimits:
    """What one request to this model may ask for on this machine."""

    compute_seconds: float  # estimated compute one request may need on an idle lane
    max_input_pixels: int | None = None  # image-to-image inputs
    max_tiles: int | None = None  # upscale: tiles per image
    # translate: inputs are padded (or resized) to this multiple before `max_input_pixels` is checked,
    # so the largest side listed is a multiple of it (listed as the pixels' square root, a 1326²
    # upload was refused 413 as 1328² padded)
    side_multiple: int = 1

    @property
    def max_input_side(self) -> int | None:
        """The largest square input taken: its padded size within `max_input_pixels`."""
        if not self.max_input_pixels:
            return None
        return math.isqrt(self.max_input_pixels) // self.side_multiple * self.side_multiple

    def describe(self) -> dict:
        return {"compute_seconds": round(self.compute_seconds, 3), "max_input_pixels": self.max_input_pixels,
                "max_input_side": self.max_input_side, "max_tiles": self.max_tiles}


def servable_rows(model, settings) -> int:
    """The most images (v2: rows) one request to this model can be served: the settings'
    `max_images_per_request`, and no more than its compute limit covers (a 256² StyleGAN on 2
    cores: about 5). `GET /v1/models/{name}` lists it (`max_images`), and v2's `/config` as
    `max_batch_size`: clients could not learn it, and found it by 413s."""
    rows = settings.max_images_per_request
    cost, limits = model.costs.get("model"), model.limits
    if cost is None or limits is None:
        return rows
    batch_size = model.config.max_batch_size if model.config else settings.max_batch_size
    # the compute of n rows grows with n: the largest n within the limit
    return max(1, largest_within(lambda n: compute_seconds(cost, [1.0] * n, batch_size) <= limits.compute_seconds, rows))


def translate_bytes_per_pixel(channels: int) -> int:
    """What a translate request holds per input pixel besides the batch: the decoded RGB image,
    the float input and its padded copy, the float output and its crop, the uint8 output and
    the encoded bytes (at worst as large)."""
    return 3 + FLOAT * channels * 4 + 2 * channels


def upscale_bytes_per_pixel(channels: int, scale: int) -> int:
    """An upscale request per input pixel: decoded RGB, the float input and its padded copy, the
    float canvas, the uint8 output and the encoded bytes, the last three scale² times over."""
    return 3 + 2 * FLOAT * channels + scale * scale * (FLOAT * channels + 2 * channels)


def tile_count(height: int, width: int, config: "ServingConfig") -> int:
    grid = plan_tiles(height, width, config.upscale_tile, config.upscale_overlap)
    return grid.rows * grid.cols


def largest_within(fits: Callable[[int], bool], high: int = 1 << 16) -> int:
    """The largest n in [0, high] with fits(n), by bisection (fits is monotone: true up to some n,
    false after; 0 when nothing fits): an upscale's largest side, a v2 request's most rows."""
    low = 0
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def request_memory_bytes(memory_budget: int, capacity: int) -> int:
    """The most one request may hold: REQUEST_SHARE_OF_MEMORY of GANSERVE_MEMORY_BUDGET, and never
    more than the budget leaves once the models (under `--workers`, every process) are resident
    (`MemoryBudget.capacity`). From the whole budget alone, the limits listed sizes admission
    could never fit: a CI run's translate at 0.9 of the listed side needed 2246 MiB where 2223 were
    left, 413. LIMITS_MEMORY_MARGIN below what is left: the resident figure moves a little with
    each reading, and the limits follow it only past a step (`ModelRegistry.derive_all_limits`)."""
    return int(min(REQUEST_SHARE_OF_MEMORY * memory_budget, (1.0 - LIMITS_MEMORY_MARGIN) * capacity))


def derive_limits(model: "LoadedModel", settings: Settings, request_memory: int) -> ModelLimits:
    """The largest input a model takes (`request_memory`: the most one request may hold,
    `request_memory_bytes`) and the compute seconds a request may need."""
    config, cost, entry = model.config, model.costs.get("model"), model.entry
    seconds = (1.0 - LIMITS_COMPUTE_MARGIN) * COMPUTE_SHARE_OF_DEADLINE * settings.request_timeout_s * config.lane_threads
    if entry.kind not in ("translation", "super_resolution"):
        return ModelLimits(seconds)
    memory = request_memory
    # what the routes count per pixel (service/routes/image2image.py, upscaling.py): the decoded upload too
    channels = max(entry.spec["in_channels"], entry.spec["channels"])
    if entry.kind == "translation":
        per_pixel, multiple = DECODE_BYTES_PER_PIXEL + translate_bytes_per_pixel(channels), entry.spec.get("size_multiple", 1)
        if cost is None:
            return ModelLimits(seconds, min(config.max_input_pixels, int(memory // per_pixel)), side_multiple=multiple)
        linear = max(0, int((seconds - cost.overhead_s) / cost.per_unit_s * cost.reference_pixels))
        # past the warmed sizes an image may be slower per pixel (`GraphCost.size_factor`, as its batches showed)
        by_time = largest_within(lambda pixels: compute_seconds(cost, [cost.units_for_pixels(pixels)], 1) <= seconds, min(linear, config.max_input_pixels))
        by_memory = memory / (per_pixel + cost.bytes_per_unit / cost.reference_pixels)
        return ModelLimits(seconds, max(0, int(min(config.max_input_pixels, by_time, by_memory))), side_multiple=multiple)
    per_pixel = DECODE_BYTES_PER_PIXEL + upscale_bytes_per_pixel(channels, entry.spec["scale"])
    if cost is None:
        return ModelLimits(seconds, min(config.max_input_pixels, int(memory // per_pixel)))
    max_tiles = max(0, math.floor((seconds - cost.overhead_s) / cost.per_unit_s))
    batch_bytes = cost.tile_bytes(cost.batch_items(config.max_batch_size, config.max_batch_seconds))

    def fits(side: int) -> bool:
        return (side * side <= config.max_input_pixels and tile_count(side, side, config) <= max_tiles
                and side * side * per_pixel + batch_bytes <= memory)

    side = largest_within(fits)
    return ModelLimits(seconds, side * side, max_tiles)


@dataclass(frozen=True)
class RequestCost:
    """A request's estimate: compute seconds on its model's lane (uncorrected, as measured) and
    the bytes it holds at its peak."""

    seconds: float
    bytes: int
    encode_seconds: float = 0.0  # one encoder thread's seconds for its answer (`EncoderTable.seconds`)
    encode_format: str = ""
    smaller: str = "send fewer or smaller images"  # what the client can change when it is too expensive (an interpolation's frames)


def batch_share_bytes(cost: GraphCost | None, units: list[float], max_batch_size: int, max_batch_seconds: float, tiles: bool = False) -> int:
    """The batch memory a request's items may add: at most a batch's worth of them compute at once
    (`tiles`: the items are an upscale's tiles, `GraphCost.tile_bytes`)."""
    if cost is None or not units:
        return 0
    in_batch = sum(sorted(units, reverse=True)[:cost.batch_items(max_batch_size, max_batch_seconds)])
    return cost.tile_bytes(in_batch) if tiles else cost.bytes_for(in_batch)


def compute_seconds(cost: GraphCost | None, units: list[float], max_batch_size: int) -> float:
    """Seconds of compute for these items in batches of at most max_batch_size (uncorrected)."""
    if cost is None or not units:
        return 0.0
    batches = math.ceil(len(units) / max_batch_size)
    return batches * cost.overhead_s + cost.per_unit_s * sum(u * cost.size_factor(u) for u in units)


def crowding(lane: LaneView, other: LaneView) -> float:
    """How much of a second each second of `other`'s work adds to `lane`'s while both compute (and
    the other way round): 1 for two lanes that each ask for the whole device, 0 for two whose
    runtimes' threads fit the cores together (`Lane.share`, per job, times the lane's threads)."""
    demand = min(1.0, lane.share * lane.threads) + min(1.0, other.share * other.threads)
    return min(1.0, max(0.0, demand - 1.0))


def slowdown(lane: LaneView, other_share: float, cpus: int | None = None) -> float:
    """How much longer a lane's work takes while other processes want `other_share` of the device
    (`SharedDevice.other_share`): the kernel shares the cores by threads, so where the lane's
    asked share (all of it for a runtime on every core) and theirs add up to more than the
    device, a one-thread runtime takes that sum, and a runtime of several threads loses more per
    share it is short of (BARRIER_PENALTY): its threads wait for each other at every layer, so
    one slowed thread slows them all. Measured on 2 cores, sr-rrdb-x4 beside 1, 2, 3 spinning
    processes: 1.73x, 2.6x, 2.5-3.3x its time alone on both cores (here 1.75, 2.5, 3.25);
    1.0, 1.55, 2.0x on one core (here 1.0, 1.5, 2.0)."""
    asked = min(1.0, lane.share * lane.threads)
    short = asked + other_share - 1.0  # the share of the device the lane goes without
    if short <= 0.0:  # the usual case, on every admission: no affinity call
        return 1.0
    threads = asked * (cpus if cpus is not None else len(usable_cpus()))
    return 1.0 + short * (BARRIER_PENALTY if threads > 1.5 else 1.0)


def is_slight(lane_seconds: float, threads: int, remaining_s: float) -> bool:
    """Whether a request of `lane_seconds` is a push too slight for `crowded_out` to refuse
    (under SLIGHT_PUSH of its deadline): what its lane computes of it counts in the lane's steady
    demand (`RequestState.slight`, `Lane.count_slight`), as the other lanes' requests cannot see
    it coming otherwise."""
    return lane_seconds / threads <= SLIGHT_PUSH * remaining_s


def steady_share(demands: Sequence[tuple[float, float]]) -> float:
    """The share of the device a lane's work gets while other lanes' steady demand goes on:
    `demands` holds each other lane's (steady demand, crowding). The device is shared max-min
    fairly (processor sharing): a lane asking for less than the level gets what it asks, the rest
    get the level, as the new work does; the level is where the shares fill the device. One lane
    asking 0.3: 0.7 left; one never idle: half; two never idle: a third."""
    asking = sorted((demand, share) for demand, share in demands if demand > 0.0 and share > 0.0)
    given, capped = 0.0, sum(share for _, share in asking)
    level = 1.0 / (1.0 + capped)
    for demand, share in asking:  # ascending: each one under the level takes only what it asks, raising the level
        if demand >= level:
            break
        given, capped = given + demand * share, capped - share
        level = (1.0 - given) / (1.0 + capped)
    return level


def beside_s(lane: LaneView, own_s: float, others: Sequence[LaneView], steady: bool = True, fade: float = 1.0) -> float:
    """The seconds the other lanes' work adds to `own_s` seconds of `lane`'s own, each lane's
    the larger of
    - what is queued on it, as far as it overlaps (up to `own_s`), and
    - what its steady demand goes on asking meanwhile: over the `own_s / level` the work takes at
      the `steady_share` level, its share of the device, min(demand, level), for each second;
    times their crowding. A stream of small DCGAN or StyleGAN requests has almost no backlog.
    `steady=False`: what is queued alone (a booking's end: the streams push it as they come);
    `fade`: the demands as they will have faded by then, if the streams pause (`streams_ease_s`)."""
    if not others:
        return 0.0
    if not steady:
        return sum(min(other.expected_wait_s(), own_s) * crowding(lane, other) for other in others)
    seen = [(other.expected_wait_s(), other.steady_demand() * fade, crowding(lane, other)) for other in others]
    level = steady_share([(demand, share) for _, demand, share in seen])
    return sum(share * max(min(queued, own_s), min(demand, level) * own_s / level) for queued, demand, share in seen if share)


def streams_ease_s(fits: Callable[[float], bool]) -> float:
    """The seconds until `fits(fade)` holds as the other lanes' steady demand fades (by
    exp(-t / STEADY_WINDOW_S), were their streams to pause now): the Retry-After of a request only
    the streams keep out. One computed at the queue's pace (1-2 s) was refused again 11 times in 11
    while the streams went on, and after a burst for 9 s more (a probe)."""
    low, high = 0.0, 4 * lanes.STEADY_WINDOW_S
    if not fits(math.exp(-high / lanes.STEADY_WINDOW_S)):
        return high
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (low, middle) if fits(math.exp(-middle / lanes.STEADY_WINDOW_S)) else (middle, high)
    return high


def pushed_by(booking: Booking, share: float, start_in: float, alone_s: float, now: float) -> float:
    """How much later `alone_s` seconds of work on another lane, starting `start_in` seconds from
    now, make the booked request end: the part of it that runs before that request's end."""
    return max(0.0, min(alone_s, booking.finish - now - start_in)) * share


def crowded_out(lane: LaneView, start_in: float, alone_s: float, others: Sequence[LaneView], now: float, remaining_s: float = math.inf) -> float:
    """0 when `alone_s` more seconds on `lane`, starting after its queue (`start_in`), leave every
    request admitted beside it within its deadline; else the seconds until the last one of those
    it would not ends (when it has room). A slight push (SLIGHT_PUSH of the time a booking has
    left, or of the request's own `remaining_s`) is let through: a DCGAN image's millisecond
    beside upscales booked to their limit was refused 503 in `ganserve bench-contention`, where
    DCGAN beside busy heavy lanes is what lanes are for (and with the booking's share alone, 7 in
    750 were refused by a booking near its latest, a re-probe). Its push is still booked, so a
    flood of them shows in the heavy ones' bookings. A booking past its latest is not protected:
    nothing refused now brings it back in time."""
    wait = 0.0
    for other in others:
        share = crowding(lane, other)
        if share:
            for booking in other.bookings:
                if booking.latest <= now:
                    continue
                pushed = pushed_by(booking, share, start_in, alone_s, now)
                slight = SLIGHT_PUSH * max(booking.latest - now, remaining_s)
                if pushed > slight and booking.finish + pushed > booking.latest:
                    wait = max(wait, booking.finish - now)
    return wait


def held_back_by(share: float, booked_lanes: Sequence[LaneView], other_share: float, host_share: float, now: float) -> dict[Booking, float]:
    """The requests booked on `booked_lanes` that host work asking `share` of the device from now
    on (a projection job about to start: seconds to minutes, so for the rest of each of them)
    would push past their deadlines, each with the seconds until it ends; none, and it may start.
    It stretches what is left of a booked request's compute by the slowdown it adds to its lane
    (`slowdown`, beside the other processes' and the host work's already counted, or the host work
    the request was judged beside where that was more: one admitted while the job's share was
    promised was judged beside the job, `Booking.host_share`). Started at
    once, a job beside an upscale admitted before it (sr-rrdb-x4 on both cores, estimated at
    2.3-2.4 s of a 5-second deadline) made it compute 3.3-4.1 s, 1.4-1.7x its estimate: in time
    there, past it for a larger one. Bookings are copied first: this runs on the jobs' thread and
    the event loop adds and removes them (a set copied in one C call, under the GIL). A slight
    push is let through, as in `crowded_out`."""
    endangered: dict[Booking, float] = {}
    for lane in booked_lanes:
        after = slowdown(lane, other_share + host_share + share)
        for booking in tuple(lane.bookings):
            before = slowdown(lane, other_share + max(host_share, booking.host_share))
            if booking.latest <= now or after <= before:
                continue
            pushed = max(0.0, booking.finish - now) * (after / before - 1.0)
            if pushed > SLIGHT_PUSH * (booking.latest - now) and booking.finish + pushed > booking.latest:
                endangered[booking] = booking.finish - now
    return endangered


def claimed_beside(finish_in: float, others: Sequence[LaneView], now: float) -> Claim | None:
    """A claim of another lane (room promised to a request it refused for crowding) that work
    ending `finish_in` seconds from now would still be running at."""
    return next((other.claim for other in others if other.claim is not None and other.claim.lapses > now
                 and other.claim.opens < now + finish_in), None)


def book(lane: LaneView, start_in: float, alone_s: float, others: Sequence[LaneView], finish_in: float, latest_in: float, now: float,
         host_share: float = 0.0) -> Booking:
    """Admits a request on `lane`: the requests booked beside it are pushed later by its work, and
    its own booking is returned (the caller takes it off `lane.bookings` when the request ends).
    `host_share`: the host work it was judged beside (`Booking.host_share`)."""
    for other in others:
        share = crowding(lane, other)
        if share:
            for booking in other.bookings:
                booking.finish += pushed_by(booking, share, start_in, alone_s, now)
    booking = Booking(now + finish_in, now + latest_in, host_share)
    lane.bookings.add(booking)
    return booking


def admit(model: "LoadedModel", request_cost: RequestCost, remaining_s: float, budget: MemoryBudget, recheck_s: float = 30.0,
          encoding: EncoderBacklog | None = None, timeout_s: float = math.inf, counted: list[int] | None = None,
          beside: Sequence[LaneView] = (), booked: list[Booking] | None = None, other_share: float = 0.0,
          holder: int | None = None, timing: dict[str, float] | None = None, host_share: float = 0.0,
          protected_s: float | None = None) -> float:
    """Refuses what cannot finish in time or fit in memory; otherwise reserves the request's
    bytes and returns the lane seconds it will take (the caller adds them to the lane's backlog
    at once, so the requests admitted in one burst see each other, and releases both when the
    request ends). `recheck_s`: when the model's speed is measured again on an idle server
    (`GANSERVE_REMEASURE_IDLE_S`), the Retry-After of a request refused because the model has
    run slower than measured lately rather than for the work queued before it. With `encoding`
    (the process's encoder pool), its answer's encoding must also fit, after its compute, behind
    the encodings admitted before it (`EncoderBacklog.check`); its seconds are added there (the
    microseconds counted appended to `counted`), and the caller takes them off once the answer is
    encoded. `holder` (`memory.memory_holder`): who the request is, for the room a memory
    refusal claims for it (`reserve_memory`). `beside`: the other lanes on the device
    (`ModelRegistry.lanes_beside`), whose queued work is added to its estimate and whose admitted requests it may not push past their
    deadlines; its booking is appended to `booked` (the caller takes it off its lane at the end).
    `other_share`: the share of the device other processes held lately (`SharedDevice.other_share`):
    everything it waits for and computes takes `slowdown` times longer; `host_share`, this process's
    own work outside the lanes (a projection job, `SharedDevice.host_share`), likewise. `timing` (the request's
    Server-Timing stages) gets `beside`: the seconds the other lanes' work was counted to add.
    `protected_s`: the time left of the server's deadline, where the client asked for a shorter
    one (`remaining_s`, v2's `timeout`): what its booking protects against requests admitted
    later beside it, and what its own push is slight against. A client's timeout limits its own
    request and is no claim on the device: as a booking's latest, a cheap request booked to its
    1 s timeout refused a 5 s request to another model (it would push the cheap one past its
    second; tests/service/test_admission.py), so a stream of them could keep heavy work out."""
    protected_s = remaining_s if protected_s is None else max(remaining_s, protected_s)
    limit = model.limits.compute_seconds if model.limits else math.inf
    if request_cost.seconds > limit:
        raise ApiError(413, f"this request needs about {request_cost.seconds:.1f} s of compute on {model.entry.name!r}; "
                            f"a request may need at most {limit:.1f} s here: {request_cost.smaller}", code="too_expensive")
    lane, now = model.lane, time.monotonic()
    cost = model.costs.get("model")
    correction = cost.current_correction() if cost is not None else 1.0
    wait, alone = lane.expected_wait_s(), request_cost.seconds * correction / lane.threads
    own = wait + alone
    crowd, queued = beside_s(lane, own, beside), beside_s(lane, own, beside, steady=False)  # queued: what the streams beside leave out
    slowed = slowdown(lane, other_share + host_share)
    wait, alone, crowd, queued = wait * slowed, alone * slowed, crowd * slowed, queued * slowed
    budget_s = remaining_s * COMPUTE_SHARE_OF_DEADLINE  # the rest is decoding, encoding and the estimate's error
    if wait + alone + crowd > budget_s:
        if wait + alone + queued <= budget_s:  # what is queued fits: the streams beside do not
            retry = max(1, math.ceil(streams_ease_s(lambda fade: wait + alone + beside_s(lane, own, beside, fade=fade) * slowed <= budget_s)))
            raise ApiError(503, f"this request's {alone:.1f} s of compute on {model.entry.name!r} would take about {alone + crowd:.1f} s beside the "
                                f"streams of requests other models on the same device have kept computing lately: past its deadline; retry in "
                                f"{retry} s, when their demand will have eased enough if they pause (while they go on at this pace, it will "
                                f"not fit)", code="overloaded", headers={"Retry-After": str(retry)})
        if alone <= budget_s:  # the work queued before it, here and beside: it has room once that is done
            raise behind_the_queue(model.entry.name, wait, alone, budget_s, crowd, other_share if slowed > 1.0 else 0.0,
                                   host_share if slowed > 1.0 else 0.0)
        if request_cost.seconds * correction / lane.threads <= budget_s:  # it would fit but for the other processes (or a job)
            retry = OTHER_LOAD_RETRY_S
            cpus = len(usable_cpus())
            why = (f"{load_beside(other_share, host_share, cpus)} of this machine's {cpus} cores, so this request's compute on "
                   f"{model.entry.name!r} would take about {alone:.1f} s")
        elif request_cost.seconds / lane.threads <= budget_s:  # not the queue: its batches have run slower than measured
            # until the correction has gone back far enough (it fades while no batch renews it), or the idle re-measure
            fits_at = max(0.0, budget_s - wait - crowd) / slowed * lane.threads / request_cost.seconds
            retry = max(1, math.ceil(min(recheck_s, cost.seconds_until_correction(fits_at) if cost is not None else math.inf)))
            why = f"{model.entry.name!r} has run {slower_by(correction)} than measured lately (about {alone:.1f} s of compute for this request)"
        else:  # the upload took the deadline's room
            retry = 1
            why = f"this request needs about {alone:.1f} s of compute and its deadline leaves {budget_s:.1f} s"
        raise ApiError(503, f"{why}; this request would finish after its deadline: retry in {retry} s", code="overloaded",
                       headers={"Retry-After": str(retry)})
    if crowded := crowded_out(lane, wait, alone, beside, now, protected_s):
        retry = max(1, math.ceil(crowded))
        if lane.claim is None or lane.claim.lapses <= now:  # the room after them is this lane's, when its client comes back
            lane.claim = Claim(now + retry, now + retry + CLAIM_GRACE_S)
        raise ApiError(503, f"this request's {alone:.1f} s of compute on {model.entry.name!r} would make requests admitted to other "
                            f"models on the same device miss their deadlines: retry in {retry} s", code="overloaded",
                       headers={"Retry-After": str(retry)})
    if alone > SLIGHT_PUSH * protected_s and (claim := claimed_beside(wait + alone + crowd, beside, now)):
        retry = max(1, math.ceil(claim.lapses - now))
        raise ApiError(503, f"the device's room from {max(0.0, claim.opens - now):.1f} s from now is promised to another model's request, refused "
                            f"earlier to keep the requests admitted beside it in time: retry in {retry} s", code="overloaded",
                       headers={"Retry-After": str(retry)})
    reserve_memory(budget, request_cost.bytes, retry_after_s=wait, holder=holder,  # first: its 413 (never fits) before any 503
                   holds_s=wait + alone + crowd + request_cost.encode_seconds)
    if encoding is not None:
        hint = f" as {request_cost.encode_format}" if request_cost.encode_format else ""
        slow_retry = max(1, math.ceil(recheck_s)) if wait == 0 and correction > 1.0 else None
        try:
            encoding.check(request_cost.encode_seconds, request_cost.seconds / lane.threads, wait + alone, remaining_s, timeout_s, hint, slow_retry)
        except ApiError:
            budget.release(request_cost.bytes)
            raise
        micros = encoding.add(request_cost.encode_seconds)
        if counted is not None:
            counted.append(micros)
    lane.claim = None  # the room promised to this lane, if any, is taken
    if booked is not None:  # booked to end after what is queued beside it: the streams' requests push it as they come (`book`)
        booked.append(book(lane, wait, alone, beside, wait + alone + queued, protected_s * PROTECTED_SHARE_OF_DEADLINE, now, host_share))
    if timing is not None and crowd > 0.0:
        timing["beside"] = crowd
    return request_cost.seconds * correction


def refuse_past_client_timeout(model: "LoadedModel", request_cost: RequestCost, timeout_s: float, remaining_s: float,
                               other_share: float = 0.0) -> None:
    """413 for a request whose compute alone, at its model's measured speed on an idle lane, takes
    more of what its client's own timeout (v2's `timeout`, shorter than the server's) leaves at
    admission (`remaining_s`) than a deadline leaves for compute. What reaching admission took
    (reading and parsing the body) comes again with a retry, so none serves it: admission's 503
    said "retry in 1 s", and where parsing had used the whole timeout, a 504 blamed the body.
    The answer names a timeout that does: the compute at the model's speed lately and the cores'
    load now (`other_share`), plus what reaching admission took, `TIMEOUT_SPARE` more and
    `TIMEOUT_FLOOR_S` (the figure without them was refused 503 when sent: a hostile probe)."""
    lane = model.lane
    alone = request_cost.seconds / lane.threads
    budget = max(0.0, remaining_s) * COMPUTE_SHARE_OF_DEADLINE
    if alone <= budget:
        return
    cost = model.costs.get("model")
    lately = alone * (cost.current_correction() if cost is not None else 1.0) * slowdown(lane, other_share)
    reaching = max(0.0, timeout_s - remaining_s)
    enough_us = math.ceil(((lately / COMPUTE_SHARE_OF_DEADLINE + reaching) * TIMEOUT_SPARE + TIMEOUT_FLOOR_S) * 1e6)
    raise ApiError(413, f"this request needs about {1000 * alone:.1f} ms of compute on {model.entry.name!r}; its timeout of "
                        f"{round(timeout_s * 1e6)} µs leaves {1000 * budget:.1f} ms for it once the request has reached admission "
                        f"({1000 * reaching:.1f} ms after it arrived): send a timeout of at least {enough_us} µs (or none: the server's "
                        f"deadline), or fewer rows or smaller images", code="too_expensive")


def slower_by(correction: float) -> str:
    """How much slower a correction says a model runs, as a refusal says it: "2 % slower" (a probe
    read "1.0x slower" for 1.019), "1.7x slower" from twice as slow down."""
    return f"{correction:.1f}x slower" if correction >= 1.5 else f"{max(1, round(100 * (correction - 1)))} % slower"


def load_beside(other_share: float, host_share: float, cpus: int, participle: bool = False) -> str:
    """Who wants the cores besides the lanes, and how much, for a refusal's message: other
    processes (`other_share`), this server's projection job (`host_share`), or both
    ("... want about 1.4", or with `participle` "... wanting about 1.4")."""
    if other_share >= 0.05 and host_share > 0:
        who, verb = "a projection job on this server and other processes", "want"
    elif host_share > 0:
        who, verb = "a projection job on this server", "wants"
    else:
        who, verb = "other processes", "want"
    return f"{who} {'wanting' if participle else verb} about {(other_share + host_share) * cpus:.1f}"


def behind_the_queue(name: str, wait_s: float, alone_s: float, budget_s: float, beside_s: float = 0.0, other_share: float = 0.0,
                     host_share: float = 0.0) -> ApiError:
    """The 503 of a request that would finish after its deadline for the work queued before it,
    on its own lane and (`beside_s`, what it adds) on the other models' lanes, all of it slowed by
    other processes holding `other_share` of the device and this server's job `host_share`."""
    retry = max(1, math.ceil(wait_s + alone_s + beside_s - budget_s))
    others = f", and other models on the same device about {beside_s:.1f} s more beside it" if beside_s >= 0.05 else ""
    cpus = len(usable_cpus())
    if other_share >= 0.05 or host_share > 0:
        others += f", with {load_beside(other_share, host_share, cpus, participle=True)} of the {cpus} cores"
    return ApiError(503, f"{name!r} has about {wait_s:.1f} s of work queued{others}; this request would finish after its deadline: "
                         f"retry in {retry} s", code="overloaded", headers={"Retry-After": str(retry)})


def recheck_in_the_engine(name: str, wait_s: float, alone_s: float, remaining_s: float, beside_s: float = 0.0, other_share: float = 0.0,
                          host_share: float = 0.0) -> None:
    """A `--workers` engine's last look at a request a front admitted, before its items are
    queued: the engine's lane backlog is every front's admitted work, exactly, where a front saw
    it as of the last snapshot (0.5 s old). Two fronts that each admitted a request taking most
    of a deadline in the same half second both queued it, and the second answered 504 at its
    deadline, 30 s later, where one process answers 503 at once (a hostile probe). Only work
    queued before it refuses it here, on its lane or beside it (`beside_s`, what the other lanes'
    work adds): with none, the front's admission stands. `other_share` and `host_share` (where
    they slowed the figures) are named in the refusal: a probe was told "about 0.0 s of work
    queued … retry in 13 s" where the load of other processes made the difference."""
    budget_s = remaining_s * COMPUTE_SHARE_OF_DEADLINE
    if wait_s + beside_s > 0 and wait_s + alone_s + beside_s > budget_s:
        raise behind_the_queue(name, wait_s, alone_s, budget_s, beside_s, other_share, host_share)


def engine_booking(lane: LaneView, lane_seconds: float, deadline: float, device: "lanes.SharedDevice", host_share: float) -> Booking:
    """A `--workers` engine's booking of a request a front admitted, on the engine's own lane
    (queued after what is there now, slowed as the device is shared now): what the engine's
    projection job is held back by (`held_back_by`). The fronts' bookings are on their mirrors.
    `host_share`: the host work the front's admission counted (the engine's, as of its last
    snapshot): a job's share promised in the engine since then was not."""
    now = time.monotonic()
    slowed = slowdown(lane, device.other_share() + device.host_share())
    return Booking(now + (lane.expected_wait_s() + lane_seconds / lane.threads) * slowed,
                   now + max(0.0, deadline - now) * PROTECTED_SHARE_OF_DEADLINE, host_share)


def reserve_memory(budget: MemoryBudget, nbytes: int, retry_after_s: float = 1.0, holder: int | None = None,
                   holds_s: float = math.inf) -> None:
    """Reserves `nbytes`, or refuses: 413 when they could never fit, 503 while others hold the
    budget. A `holder`'s 503 claims the room from its Retry-After until a second past it
    (renewed while it comes back when told and is refused again: service/memory.py
    `MemoryClaim`), and a request of another holder that would still hold that room then
    (`holds_s`: its estimated wait, compute and encoding) is refused: a large request refused
    while small ones held the budget was refused again and again, the room it waited for taken
    each time by requests that arrived after it (a hostile probe: a translate refused 6 times in
    a row after obeying Retry-After; `ganserve bench-claims`: 31 of 31)."""
    try:
        budget.try_reserve(nbytes, holder, holds_s)
    except ClaimedByAnother as error:
        retry = max(1, math.ceil(error.lapses_in_s()))
        raise ApiError(503, f"{error.claim.nbytes / 2**20:.0f} MiB of the {error.free / 2**20:.0f} MiB of the memory budget free now is "
                            f"promised to a request refused earlier for want of it, and this request needs {error.wanted / 2**20:.0f} MiB "
                            f"for longer than that room is free: retry in {retry} s", code="overloaded", headers={"Retry-After": str(retry)})
    except OverBudget as error:
        if error.permanent:
            raise ApiError(413, f"this request needs about {error.wanted / 2**20:.0f} MiB; the server's memory budget for "
                                f"requests is {error.capacity / 2**20:.0f} MiB (GANSERVE_MEMORY_BUDGET less what the loaded models hold)",
                           code="too_expensive")
        retry = max(1, math.ceil(retry_after_s))
        if holder is not None:
            budget.claim(nbytes, holder, retry, CLAIM_GRACE_S)
        raise ApiError(503, f"the server's memory budget is taken by requests in flight ({error}); retry in {retry} s",
                       code="overloaded", headers={"Retry-After": str(retry)})
