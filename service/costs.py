"""What a forward pass costs, measured at warm-up and kept honest by every batch since.

A graph's cost is linear in its *units*: one unit is one item at the reference shape (a
generator's image; an image-to-image graph's warm-up tile or image, so a translate input of
four times the pixels is four units). At warm-up each graph runs at its batch sizes: the first
run of each size gives the peak memory it added (read off the process's peak RSS), later runs
its time. From then on every batch's observed time corrects the estimate (an EWMA of
observed / estimated), so admission's "can this finish before its deadline" stays truthful when
the machine is busier than it was at start-up. A warm-up that ran while the machine was busy
measured too slow; the idle server times the same shapes again (`CostProbe`,
service/remeasure.py) and adopts a fit only where it is faster (`relax`).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from service.memory import measure_peak
from service.runtimes import OutOfMemory

# bytes a measurement may miss (allocator rounding, a copy the warm-up run did not make)
MEMORY_MARGIN = 1.25
FALLBACK_BYTES_PER_VALUE = 16  # where the peak cannot be read: 4 B floats, about 4 live copies
# a fit is scaled down to what batches show once this many have run at under this share of it
BATCHES_RELAX_MIN, BATCHES_RELAX_BELOW = 32, 0.8
# how soon a correction no batch has renewed goes halfway back to where the idle lane last put it
CORRECTION_HALF_LIFE_S = 30.0
# A fresh process's first runs of a graph can be slow for seconds: sr-rrdb-x4's tile took
# 0.60, 0.43, 0.21 s in turn after its first run (in 2 of 8 one-process starts here; a `--workers`
# engine once 0.57, 0.40, 0.26, then 0.21), the extra time mostly the kernel's (0.29 against 0.09 s
# of system time a run, for the same page faults). Timed as it ran, the smallest shape's median was
# 1.6-2.8x the model's speed, the limits that tight until the idle re-measure, and the larger
# shapes left unwarmed (their time judged past `max_batch_seconds`). So the smallest shape is run
# once untimed, then timed until its last `repeats` runs agree within SETTLED_SPREAD (at most
# SETTLING_RUNS times `repeats` runs).
SETTLED_SPREAD = 1.25
SETTLING_RUNS = 3
K = TypeVar("K")


@dataclass
class GraphCost:
    per_unit_s: float  # seconds one more unit adds to a batch
    overhead_s: float  # seconds of a batch regardless of its size
    bytes_per_unit: int  # peak memory one unit adds while it computes
    reference_pixels: int | None  # dynamic-size graphs: pixels of one unit; None: every item is one unit
    correction: float = 1.0  # observed / estimated over recent batches
    warmed: tuple[float, ...] = ()  # the shapes (in units: batch sizes for fixed-size graphs) run at warm-up
    relaxed: int = 0  # times an idle re-measure found it faster and replaced the fit (service/remeasure.py)
    relaxed_by_batches: int = 0  # times the batches served ran faster than the fit for long enough to replace it
    batches_since_fit: int = 0  # batches observed since the fit was measured or last replaced
    max_batch_units: float | None = None  # a larger warm-up shape ran out of device memory: batches stay at or under this
    recalibrated_to: float | None = None  # the correction an idle re-measure last set (`recalibrate`)
    observed_at: float | None = None  # when a batch last moved the correction (monotonic; None: never, it holds as set)
    item_bytes: int = 0  # where `in_arena`: one tile's own arrays, with the margin (`ModelRegistry.measure`)
    # the runtime runs this graph's tile batches in an arena it holds resident (ONNX Runtime on a CPU, one lane
    # thread: service/runtimes.py `run_in_chunks`), which the resident baseline counts: a tile adds its own arrays only
    in_arena: bool = False
    # items larger than this many units are past every item size warm-up ran (an upscale graph's whole image, sent by
    # v2 infer: warm-up ran tiles only), and their time is scaled by `size_factor`; None: not scaled
    largest_warmed_item: float | None = None
    large_item_exponent: float = 1.0  # the prior for those: (units / largest_warmed_item) ** (this - 1) more per unit
    # per size class of such items (floor(log2(units / largest_warmed_item))): their time per unit over the fit's, as
    # their batches showed it (`observe`), apart from the correction every batch shares
    size_factors: dict[int, float] = field(default_factory=dict)

    def current_correction(self, now: float | None = None) -> float:
        """The correction as evidence of *lately*: it goes back toward where the idle lane last
        put it (1, or `recalibrated_to`) with a half-life of CORRECTION_HALF_LIFE_S while no batch
        renews it. Held as it was, one slow spell refused a model's every request "slower than
        measured lately" while no batch of it could run to say otherwise: an upscaler was locked
        out for 3 minutes on an almost idle server, a trickle of another model's requests keeping
        the idle re-measure away (a hostile probe). A model still slow shows it again on its
        next batch (the correction turns pessimistic at half weight)."""
        if self.observed_at is None:
            return self.correction
        age = max(0.0, (time.monotonic() if now is None else now) - self.observed_at)
        return self.resting_correction + (self.correction - self.resting_correction) * 0.5 ** (age / CORRECTION_HALF_LIFE_S)

    @property
    def resting_correction(self) -> float:
        """Where the correction goes back to while no batch renews it: what the idle lane last timed."""
        return self.recalibrated_to if self.recalibrated_to is not None else 1.0

    def seconds_until_correction(self, at_most: float) -> float:
        """How long until the correction has gone back to `at_most` (inf if it never will)."""
        current, rest = self.current_correction(), self.resting_correction
        if current <= at_most:
            return 0.0
        if self.observed_at is None or at_most <= rest:
            return math.inf
        return CORRECTION_HALF_LIFE_S * math.log2((current - rest) / (at_most - rest))

    def units(self, inputs: dict[str, np.ndarray]) -> float:
        """An item's units: 1, or its pixels over the reference for dynamic-size graphs."""
        if self.reference_pixels is None:
            return 1.0
        image = next(a for a in inputs.values() if a.ndim == 3)  # [C, H, W]
        return image.shape[1] * image.shape[2] / self.reference_pixels

    def units_for_pixels(self, pixels: int) -> float:
        return 1.0 if self.reference_pixels is None else pixels / self.reference_pixels

    def size_factor(self, item_units: float) -> float:
        """How much more a unit costs in an item of `item_units` than the fit says: 1 up to the
        largest item warm-up ran. Past it, what batches of items of its size class showed, else
        the largest of the prior (`large_item_exponent`) and what smaller classes showed (an
        image is not taken to be cheaper per pixel than a smaller one). A whole image through an
        upscale graph, timed at tiles only, ran 1.03-1.06x the tile's time per pixel up to 448²
        and 1.30x at 640², 1.56x at 816² (ONNX Runtime, two CPU threads): at the tile's rate an
        816² image was admitted at 17 s and took 27 s, a 504 under load (docs/benchmarks.md)."""
        if self.largest_warmed_item is None or item_units <= self.largest_warmed_item:
            return 1.0
        ratio = item_units / self.largest_warmed_item
        size_class = math.floor(math.log2(ratio))
        if (shown := self.size_factors.get(size_class)) is not None:
            return shown
        smaller = [factor for known, factor in self.size_factors.items() if known < size_class]
        return max([ratio ** (self.large_item_exponent - 1.0), *smaller])

    def batch_seconds(self, units: float, corrected: bool = True, item_units: float = 1.0) -> float:
        """A batch of `units` in all, of items of `item_units` each (a batch takes one shape)."""
        return (self.overhead_s + self.per_unit_s * units * self.size_factor(item_units)) * (self.current_correction() if corrected else 1.0)

    def item_seconds(self, units: float) -> float:
        """What an item adds to its lane's backlog (the batch overhead is shared, so not counted)."""
        return self.per_unit_s * units * self.size_factor(units) * self.current_correction()

    def capped_batch_size(self, max_batch_size: int) -> int:
        """The item cap, lowered to what warm-up found to fit the device's memory (one-unit items)."""
        if self.max_batch_units is None:
            return max_batch_size
        return max(1, min(max_batch_size, math.floor(self.max_batch_units)))

    def batch_items(self, max_batch_size: int, max_batch_seconds: float) -> int:
        """How many one-unit items a batch takes under the caps (the batcher's rule)."""
        max_batch_size = self.capped_batch_size(max_batch_size)
        if self.per_unit_s <= 0:
            return max_batch_size
        return max(1, min(max_batch_size, math.floor((max_batch_seconds - self.overhead_s) / self.per_unit_s)))

    def bytes_for(self, units: float) -> int:
        return math.ceil(self.bytes_per_unit * units)

    def tile_bytes(self, tiles: float) -> int:
        """What `tiles` upscale tiles add while their batch computes: their own arrays where the
        batch runs in the resident arena (a 96² tile of sr-rrdb-x4: ~5 MB, against the ~120 MB of
        activations counted per tile before, which made a 10 s batch's share of ~50 tiles refuse
        every upscale), else `bytes_for`."""
        return math.ceil(self.item_bytes * tiles) if self.in_arena else self.bytes_for(tiles)

    def observe(self, units: float, elapsed_s: float, smallest_item_units: float = 1.0, stretch: float = 1.0) -> None:
        """A batch of `units` in all took `elapsed_s`: the correction moves toward observed over
        estimated. `stretch` is how much longer other lanes' jobs on the device made it take
        (`Lane.run_timed`): admission counts their work beside a request's own, so here it is
        taken off — but never past what the fit says, so that contention the sharing model
        overstates can explain a batch's slowness away and never make the model look faster than
        measured (that would relax admission on the idle server). A batch with an item under one
        unit is no evidence about the fit and is skipped: below the reference shape warm-up
        measured, a forward's fixed costs dominate
        and the line through the warmed shapes does not hold (an image-to-image graph's v2
        request may send a 16² image to a model whose unit is a 96² tile: 32 batches of them,
        faster per pixel, once scaled sr's fit down until it advertised upscales that ran 30 s
        to a 504; others, slower than the overhead-free fit of one warmed shape, pushed the
        correction to 1.7 and had in-limit upscales refused 503 on an idle lane)."""
        if smallest_item_units < 1.0 - 1e-9:
            return
        if self.largest_warmed_item is not None and smallest_item_units > self.largest_warmed_item:
            self.observe_size(units, elapsed_s, smallest_item_units, stretch)
            return
        estimated = self.batch_seconds(units, corrected=False)
        self.batches_since_fit += 1
        if estimated > 0:
            ratio = observed_ratio(elapsed_s / estimated, stretch)
            now = time.monotonic()
            current = self.current_correction(now)
            weight = 0.5 if ratio > current else 0.2  # quick to turn pessimistic, slow to trust good news
            self.correction, self.observed_at = (1 - weight) * current + weight * ratio, now

    def observe_size(self, units: float, elapsed_s: float, item_units: float, stretch: float) -> None:
        """A batch of items larger than any warm-up ran: it moves their size class's factor, not
        the correction the other batches share (one 816² image through an upscale graph would
        otherwise have had every tile estimated 1.3x slow for a while). Taken as the batch's time
        over the fit's, less the correction of now (how busy the machine is), at the correction's
        weights: quick to turn pessimistic, slow to trust good news; never under 1."""
        fitted = self.overhead_s + self.per_unit_s * units
        if fitted <= 0:
            return
        size_class = math.floor(math.log2(item_units / self.largest_warmed_item))
        shown = max(1.0, observed_ratio(elapsed_s / fitted, stretch) / self.current_correction())
        current = self.size_factor(item_units)
        weight = 0.5 if shown > current else 0.2
        self.size_factors[size_class] = round((1 - weight) * current + weight * shown, 4)

    def relax(self, per_unit_s: float, overhead_s: float, margin: float = 0.9) -> bool:
        """Adopts a later fit where it is no slower at the smallest warmed shape nor per unit (so
        at no size from there up) and faster than `margin` of the current one at a warmed shape;
        answers whether it did.

        Only ever faster: the fit is what a batch costs on an idle lane, the figure the limits
        (413, permanent) are derived from, and a measurement can only be slowed by contention. So
        a request accepted once is never refused as too large later. Per unit, not only at the
        warmed shapes: the limits extrapolate the fit far past them (an upscale's 29 tiles from
        warm-up's 1 and 2), and a fit with less overhead but more per unit, faster at both warmed
        shapes, once took sr's limit from 416 to 336 px. The correction (observed over
        estimated) is rescaled to the new fit and capped at 1: the idle lane has just measured the
        fit, so batches that ran slower than it (on the busy machine) no longer count, while
        batches that ran faster still than it still do."""
        if not self.adopt(per_unit_s, overhead_s, margin):
            return False
        self.relaxed += 1
        return True

    def relax_from_batches(self, below: float = BATCHES_RELAX_BELOW, min_batches: int = BATCHES_RELAX_MIN) -> bool:
        """The fit scaled by what the batches served have shown, where for at least `min_batches`
        they ran at under `below` of it (the correction, slow to trust good news). For a server
        that warmed while the machine was busy and has never been idle long enough to be timed
        again (`relax`): its traffic's own batches are the measurement. Scaled as a whole, the
        new fit is faster at every size, so the same rule holds: limits only ever loosen. A
        batch's time includes its wait for the lane and the copy of its outputs to the host, so
        the correction errs slow, never fast."""
        correction = self.current_correction()
        if self.batches_since_fit < min_batches or correction > below:
            return False
        if not self.adopt(self.per_unit_s * correction, self.overhead_s * correction, margin=1.0):
            return False
        self.relaxed_by_batches += 1
        return True

    def recalibrate(self, per_unit_s: float, overhead_s: float) -> None:
        """The correction set to what an idle lane has just measured against the fit (a
        re-measure that did not replace it: `relax` answered False). It is the truth of now:
        without it, the correction of a busy spell outlives the spell on a server with no
        traffic to move it, and a request the limits allow is refused 503 on an idle lane
        until traffic comes."""
        units = self.warmed[-1] if self.warmed else 1.0
        fitted = self.batch_seconds(units, corrected=False)
        if fitted > 0:
            self.correction = self.recalibrated_to = min(50.0, max(0.2, (overhead_s + per_unit_s * units) / fitted))

    @property
    def slowed_since_timed(self) -> bool:
        """Batches have run slower than the fit since an idle lane last timed it: worth timing
        again at the next idle spell (a machine that stays slower while idle is not re-timed for it)."""
        return self.current_correction() > max(1.0, self.recalibrated_to or 1.0)

    def adopt(self, per_unit_s: float, overhead_s: float, margin: float) -> bool:
        ends = (self.warmed[0], self.warmed[-1]) if self.warmed else (1.0,)
        before = [self.batch_seconds(units, corrected=False) for units in ends]
        after = [overhead_s + per_unit_s * units for units in ends]
        if per_unit_s > self.per_unit_s or any(a > b for a, b in zip(after, before)) or not any(a < margin * b for a, b in zip(after, before)):
            return False
        self.correction = min(1.0, self.current_correction() * before[-1] / after[-1])
        self.per_unit_s, self.overhead_s = per_unit_s, overhead_s
        self.batches_since_fit = 0
        return True

    def describe(self) -> dict:
        return {"seconds_per_unit": round(self.per_unit_s, 6), "batch_overhead_seconds": round(self.overhead_s, 6),
                "bytes_per_unit": self.bytes_per_unit, "unit_pixels": self.reference_pixels, "observed_over_measured": round(self.current_correction(), 3),
                "warmed_units": list(self.warmed), "relaxed_when_idle": self.relaxed, "relaxed_by_batches": self.relaxed_by_batches,
                "max_batch_units": self.max_batch_units, "item_bytes": self.item_bytes, "tiles_in_arena": self.in_arena,
                "largest_warmed_item": self.largest_warmed_item, "large_item_exponent": self.large_item_exponent,
                "size_factors": {str(2 ** size_class): factor for size_class, factor in sorted(self.size_factors.items())}}


def observed_ratio(observed: float, stretch: float) -> float:
    """Observed over estimated, with what other lanes' jobs added (`stretch`) taken off, but never
    to under 1 where it was over (`GraphCost.observe`); bounded to 0.2-50."""
    return min(50.0, max(0.2, max(min(1.0, observed), observed / max(1.0, stretch))))


@dataclass(frozen=True)
class CostProbe:
    """What timing a graph again needs: its run, how to build a shape's inputs, and the warmed
    shapes its fit rests on (the smallest, and the largest where a second one was warmed)."""

    run: Callable[[dict[str, np.ndarray]], np.ndarray]
    make_inputs: Callable[[object], dict[str, np.ndarray]]
    points: tuple[tuple[object, float], ...]  # (shape key, units)
    repeats: int

    def order(self) -> list[int]:
        """The points' indices in the order they are timed: `repeats` rounds of every point, so
        that both ends of the fit see the same moments of a machine whose load changes (timed
        one after the other under contention, a CycleGAN's batch of one came out slowed more
        than its batch of four: a fit with less time per unit than the quiet machine's)."""
        return [index for _ in range(self.repeats) for index in range(len(self.points))]

    def fit_runs(self, seconds: list[float]) -> tuple[float, float]:
        """`fit` through each point's median over runs timed in `order()`."""
        by_point: list[list[float]] = [[] for _ in self.points]
        for index, elapsed in zip(self.order(), seconds):
            by_point[index].append(elapsed)
        return self.fit([statistics.median(times) for times in by_point])

    def fit(self, seconds: list[float]) -> tuple[float, float]:
        """(seconds per unit, batch overhead) through the points' measured times (one per point):
        the smallest shape's and, where there is one, the largest's."""
        (_, small_units), t_small = self.points[0], seconds[0]
        if len(self.points) == 1:
            return t_small / small_units, 0.0
        (_, large_units), t_large = self.points[-1], seconds[-1]
        # timing noise must not make a unit free: at least 5 % of the large shape's mean
        per_unit = max((t_large - t_small) / (large_units - small_units), 0.05 * t_large / large_units)
        return per_unit, max(0.0, t_small - per_unit * small_units)


def fallback_bytes(inputs: dict[str, np.ndarray], output: np.ndarray) -> int:
    return FALLBACK_BYTES_PER_VALUE * (sum(a.size for a in inputs.values()) + output.size)


def measure_cost(run: Callable[[dict[str, np.ndarray]], np.ndarray], make_inputs: Callable[[K], dict[str, np.ndarray]],
                 shapes: list[tuple[K, float]], reference_pixels: int | None, max_batch_seconds: float = math.inf,
                 repeats: int = 3, runs_per_shape: int = 1,
                 prepare: Callable[[dict[str, np.ndarray]], object] | None = None) -> tuple[GraphCost, CostProbe]:
    """Warms `run` at the shapes the batcher will form (`make_inputs(key)` builds a shape of
    `units` units) and fits the linear cost between the smallest and the largest.

    The smallest shape runs first; larger ones only where its time says they fit
    `max_batch_seconds` (the batcher never forms bigger batches, and warming a 64-image batch of
    a 256² StyleGAN2 would cost a CPU minutes of start-up). Each shape's first run gives the peak
    memory it added; an allocator that keeps an arena has then already grown for the smallest
    shape, so a larger shape's growth is divided by the units it added, not all of its units.
    Where a larger shape ran, the memory per unit is that growth alone: the smallest shape's
    first run is also the graph's first run ever, and what it adds is mostly paid once
    (TorchScript's profiling runs, thread pools, the runtime's lazily loaded kernels: measured
    24.6 MiB "per image" for the 32² cDCGAN in TorchScript, against about 1 MiB from the 64-image run),
    which charged to every unit made a 64-image request need 1.5 GiB and refused it (413) where
    the memory budget is shared by `--workers` fronts. A graph warmed at one shape only keeps
    that shape's figure: the only one measured, and too high rather than too low.
    `runs_per_shape` > 1 runs every warmed shape that often (TorchScript on a GPU re-optimises a
    graph over its first calls at each new shape: no request should pay for that). `prepare`
    runs each shape once before its memory is measured: a runtime that captures a graph per shape
    (service/graph_capture.py) does so there, and the compiler's own memory is not charged to
    the model's items.

    A larger shape that runs out of device memory (`OutOfMemory`) is dropped, and so is every
    larger one: the graph is served at the shapes that fit, its batches capped there
    (`max_batch_units`), instead of failing to load (a 1024² generator's batch of 64 on a small
    GPU). Out of memory at the smallest shape fails the load: nothing fits."""
    shapes = sorted(shapes, key=lambda shape: shape[1])
    (small, small_units) = shapes[0]
    per_unit_bytes: list[float] = []  # one per first run: the smallest shape's, then the larger ones'

    def first_run(key: K, units: float, added_units: float) -> None:
        inputs = make_inputs(key)
        if prepare is not None:
            prepare(inputs)
        output, added = measure_peak(lambda: run(inputs))
        for _ in range(runs_per_shape - 1):
            run(inputs)
        added = added if added is not None else fallback_bytes(inputs, output)
        own = sum(a.nbytes for a in inputs.values()) + output.nbytes  # an item's own arrays: never less than these
        per_unit_bytes.append(max(added / max(added_units, 1e-9), own / units))

    def timed(key: K) -> float:
        inputs = make_inputs(key)
        run(inputs)  # untimed: a shape's second run was still up to 2.8x slow (SETTLED_SPREAD)
        times = [time_run(run, inputs) for _ in range(repeats)]
        while len(times) < SETTLING_RUNS * repeats and max(times[-repeats:]) > SETTLED_SPREAD * min(times[-repeats:]):
            times.append(time_run(run, inputs))
        return statistics.median(times[-repeats:])

    first_run(small, small_units, small_units)
    t_small = timed(small)
    fitting = [(key, units) for key, units in shapes[1:] if t_small / small_units * units <= max_batch_seconds]
    max_batch_units = None
    while fitting:  # largest first: later ones reuse what it allocated
        key, units = fitting[-1]
        try:
            first_run(key, units, units - small_units)
            break
        except OutOfMemory:
            fitting.pop()
            max_batch_units = fitting[-1][1] if fitting else small_units
    for key, units in reversed(fitting[:-1]):
        first_run(key, units, units - small_units)
    warmed = (small_units, *(units for _, units in fitting))
    bytes_per_unit = math.ceil(max(per_unit_bytes[1:] or per_unit_bytes) * MEMORY_MARGIN)
    probe = CostProbe(run, make_inputs, ((small, small_units), *fitting[-1:]), repeats)
    if fitting:  # the two ends timed again, in turns
        inputs = [make_inputs(key) for key, _ in probe.points]
        per_unit, overhead = probe.fit_runs([time_run(run, inputs[index]) for index in probe.order()])
    else:
        per_unit, overhead = probe.fit([t_small])
    return GraphCost(per_unit, overhead, bytes_per_unit, reference_pixels, warmed=warmed, max_batch_units=max_batch_units), probe


def time_run(run: Callable[[dict[str, np.ndarray]], np.ndarray], inputs: dict[str, np.ndarray]) -> float:
    started = time.perf_counter()
    run(inputs)
    return time.perf_counter() - started
