"""Prometheus metrics with DESIGN's names. Histograms, not summaries, so p99 aggregates across
replicas. The registry belongs to the app (held by its lifespan), not to the process.

With `serve --workers N` every process of the server writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, set by the supervisor before the
children import it) and any front's /metrics answers the sum over all of them: requests counted
by the fronts, queues and batches by the engine. Gauges say how processes combine (`livesum`:
summed over the live processes; per-stream gauges keep one series per process)."""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from functools import lru_cache

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LABELS = ("model", "version", "operation")
STATE_REFRESH_S = 1.0  # how stale a process's memory gauges may be in a scrape another process answered
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ListedVersionsOnly:
    """A collector passing on another's samples except those labelled with a model version not in
    `listed` (samples without both labels pass)."""

    def __init__(self, inner: MultiProcessCollector, listed: set[tuple[str, str]]) -> None:
        self.inner, self.listed = inner, listed

    def collect(self):
        for family in self.inner.collect():
            family.samples = [sample for sample in family.samples
                              if "model" not in sample.labels or "version" not in sample.labels
                              or (sample.labels["model"], sample.labels["version"]) in self.listed]
            yield family


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram("ganserve_request_duration_seconds", "Whole request, arrival to response body", LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("ganserve_queue_duration_seconds", "Time an item waited in its batch queue", LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.compute_duration = Histogram("ganserve_compute_duration_seconds", "One batched forward pass", LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.encode_duration = Histogram("ganserve_encode_duration_seconds", "Encoding a response's images", LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_items = Histogram("ganserve_batch_items", "Items per forward pass", LABELS, buckets=BATCH_BUCKETS, registry=r)
        self.queue_items = Gauge("ganserve_queue_items", "Items waiting in the batch queue", LABELS, registry=r, multiprocess_mode="livesum")
        self.in_flight = Gauge("ganserve_requests_in_flight", "Requests admitted whose work (queue and compute) is not done yet", LABELS, registry=r,
                               multiprocess_mode="livesum")
        self.requests = Counter("ganserve_requests_total", "Requests by final HTTP status", LABELS + ("status",), registry=r)
        self.rejected = Counter("ganserve_rejected_total", "Requests or items refused or dropped", LABELS + ("reason",), registry=r)
        self.cost_remeasures = Counter("ganserve_cost_remeasures_total", "Idle re-timings of a model (relaxed: a faster fit and looser limits adopted; "
                                       "kept; interrupted: a request arrived; relaxed_by_batches: the fit scaled to the batches served, no re-timing)", ("model", "version", "outcome"), registry=r)
        self.padded_items = Counter("ganserve_padded_items_total", "Copies added to batches to reach a warmed batch size", LABELS, registry=r)
        # upscale streams: frames by outcome, latency per frame, and each open stream's own fps and
        # p50/p99, named by the stream's slot (series removed when it closes; at most max_streams slots)
        self.stream_frames = Counter("ganserve_stream_frames_total", "Stream frames by outcome (answered, dropped, error)", ("model", "version", "outcome"), registry=r)
        self.stream_frame_duration = Histogram("ganserve_stream_frame_seconds", "A stream frame from arrival to its answer", ("model", "version"), buckets=LATENCY_BUCKETS, registry=r)
        self.streams_open = Gauge("ganserve_streams_open", "Open upscale streams", ("model",), registry=r, multiprocess_mode="livesum")
        self.stream_fps = Gauge("ganserve_stream_fps", "Frames answered per second by one open stream (the spacing of its answers over the last 5 s)", ("model", "stream"), registry=r, multiprocess_mode="liveall")
        self.stream_latency = Gauge("ganserve_stream_latency_seconds", "One open stream's frame latency over its last 256 frames", ("model", "stream", "quantile"), registry=r, multiprocess_mode="liveall")
        # the memory budget (service/memory.py): what admitted requests may hold, and what they hold
        # now (bodies, batches, answers not yet read by their clients). Under --workers the budget is
        # the server's, shared by its processes, and every process reports the same two figures:
        # the scrape shows the most recent of them (at most STATE_REFRESH_S old), one series
        self.memory_budget = Gauge("ganserve_memory_budget_bytes", "Bytes admitted requests may hold at once (the budget less what the server's processes hold resident)",
                                   registry=r, multiprocess_mode="livemostrecent")
        self.memory_reserved = Gauge("ganserve_memory_reserved_bytes", "Bytes admitted requests hold now, unread answers included",
                                     registry=r, multiprocess_mode="livemostrecent")
        self.encoder_backlog = Gauge("ganserve_encoder_backlog_seconds", "One encoder thread's seconds of the answers admitted and not yet encoded (summed over processes)",
                                     registry=r, multiprocess_mode="livesum")
        self.other_processes = Gauge("ganserve_other_processes_cores", "Cores' worth of work other processes wanted on this server's CPUs lately (admission counts it)",
                                     registry=r, multiprocess_mode="livemostrecent")
        self.longest_compute = Gauge("ganserve_longest_running_batch_seconds", "How long the longest batch computing now has run (any model; past "
                                     "GANSERVE_STUCK_COMPUTE_S its lane is stuck and /health/live answers 503)", registry=r, multiprocess_mode="livemax")
        self.gpu_memory = Gauge("ganserve_gpu_memory_bytes", "GPU memory allocated by this process", ("device",), registry=r, multiprocess_mode="liveall")

    def versioned(self) -> list[tuple[Counter | Gauge | Histogram, tuple[str, ...]]]:
        """Every metric labelled by model and version, with its label names in order."""
        with_status, with_reason, with_outcome = LABELS + ("status",), LABELS + ("reason",), ("model", "version", "outcome")
        return [(self.request_duration, LABELS), (self.queue_duration, LABELS), (self.compute_duration, LABELS),
                (self.encode_duration, LABELS), (self.batch_items, LABELS), (self.queue_items, LABELS), (self.in_flight, LABELS),
                (self.requests, with_status), (self.rejected, with_reason), (self.padded_items, LABELS),
                (self.cost_remeasures, with_outcome), (self.stream_frames, with_outcome), (self.stream_frame_duration, ("model", "version"))]

    def forget_version(self, model: str, version: str) -> int:
        """Removes the series of a version the server no longer serves (retired by a reload or
        the version policy): each new version added ~230 series for good, 2,225 after nine
        versions. Not under `--workers`, whose multiprocess files cannot drop a series (there
        `exposition` leaves them out). Answers how many label sets were removed."""
        if self.multiprocess():
            return 0
        removed = 0
        for metric, names in self.versioned():
            label_sets = {tuple(sample.labels[name] for name in names)
                          for family in metric.collect() for sample in family.samples
                          if sample.labels.get("model") == model and sample.labels.get("version") == version}
            for label_set in label_sets:
                metric.remove(*label_set)
                removed += 1
        self.bound.cache_clear()  # its children of the removed label sets would write where no scrape looks
        return removed

    def record_process_state(self, capacity: int, used: int, device: str, encoding_s: float = 0.0, other_cores: float = 0.0,
                             longest_compute_s: float = 0.0) -> None:
        """The memory budget, what admitted requests hold, the encoder pool's backlog and this process's GPU memory: read
        where they live, so set at every scrape and, for the processes a scrape does not reach
        (a `--workers` engine, the fronts that did not answer it), every `STATE_REFRESH_S` by
        `refresh_process_state` (before, an engine's series read 0 and an unscraped front's was stale)."""
        self.memory_budget.set(capacity)
        self.memory_reserved.set(used)
        self.encoder_backlog.set(encoding_s)
        self.other_processes.set(other_cores)
        self.longest_compute.set(longest_compute_s)
        if device == "cuda":
            import torch

            self.gpu_memory.labels("cuda:0").set(torch.cuda.memory_allocated())

    @staticmethod
    def multiprocess() -> bool:
        """Whether samples live in PROMETHEUS_MULTIPROC_DIR's files (`serve --workers N`): there a
        series cannot be removed (prometheus-client warns on every try), only overwritten."""
        return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

    def exposition(self, listed: set[tuple[str, str]]) -> tuple[bytes, str]:
        """The scrape: this app's registry, or every process's samples in multiprocess mode, there
        without the series of versions no longer listed (`listed`: (model, version) pairs), which
        its files cannot drop (`forget_version`): they grew by ~230 a version retired by reloads."""
        if self.multiprocess():
            combined = CollectorRegistry()
            combined.register(ListedVersionsOnly(MultiProcessCollector(None), listed))
            return generate_latest(combined), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    @lru_cache(maxsize=None)
    def bound(self, model: str, version: str, operation: str) -> "BoundMetrics":
        """The children for one label set, looked up once (`.labels()` costs a lock and a dict per call)."""
        labels = (model, version, operation)
        return BoundMetrics(
            self.request_duration.labels(*labels), self.queue_duration.labels(*labels), self.compute_duration.labels(*labels),
            self.encode_duration.labels(*labels), self.batch_items.labels(*labels), self.queue_items.labels(*labels),
            lambda status: self.requests.labels(*labels, status), lambda reason: self.rejected.labels(*labels, reason),
            self.padded_items.labels(*labels), self.in_flight.labels(*labels),
        )


@dataclass(frozen=True)
class BoundMetrics:
    request_duration: Histogram
    queue_duration: Histogram
    compute_duration: Histogram
    encode_duration: Histogram
    batch_items: Histogram
    queue_items: Gauge
    requests: object  # status -> Counter child
    rejected: object  # reason -> Counter child
    padded_items: Counter
    in_flight: Gauge


async def refresh_process_state(registry) -> None:
    """Keeps this process's memory gauges current until cancelled (the app's lifespan runs it in
    every process; `registry` is the lifespan's ModelRegistry)."""
    while True:
        record_registry_state(registry)
        await asyncio.sleep(STATE_REFRESH_S)


def record_registry_state(registry) -> None:
    """`record_process_state` from what `registry` (a ModelRegistry) reads now."""
    registry.metrics.record_process_state(registry.memory.capacity, registry.memory.used, registry.device, registry.encoding.seconds,
                                          registry.shared_device.other_cores(), registry.longest_running_batch_s())
