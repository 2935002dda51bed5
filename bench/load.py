"""An async load generator (bench/http_client.py): `concurrency` clients post the same kind of request in a loop
for `duration_s`, then the latency distribution, throughput, errors and the server's own mean
batch size (from /metrics) are reported."""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx
import numpy as np

from bench.http_client import KeepAliveConnection, request_bytes
from bench.server import cpu_seconds_by_part


@dataclass
class LoadResult:
    scenario: str
    concurrency: int
    images_per_request: int
    duration_s: float
    requests: int
    statuses: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p95, p99, max
    mean_batch_items: float = 0.0
    # per request: compute and encode, and queue summed over the request's items (items wait side
    # by side, so for a 64-image request that sum is no wall time: `item_queue_ms` is)
    stage_ms: dict[str, float] = field(default_factory=dict)
    item_queue_ms: float = 0.0  # an item's mean wait in its batcher's queue
    server_cpu_ms_per_request: float = 0.0  # the server process's CPU time (all its threads) per request
    server_cpu_ms_by_part: dict[str, float] = field(default_factory=dict)  # the same, by part (bench/server.py `cpu_seconds_by_part`)

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.duration_s

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request

    def to_dict(self) -> dict:
        return asdict(self) | {"requests_per_s": self.requests_per_s, "images_per_s": self.images_per_s}


def served_precision(url: str, model: str) -> str:
    """The precision the server serves `model` in (`precision: auto` chooses at load): what a
    figure is of, and what the bare-forward ceiling must run in."""
    versions = httpx.get(f"{url}/v1/models/{model}", timeout=10).json()["versions"]
    return versions[-1].get("served_precision", "fp32")


def scrape(url: str) -> dict[str, float]:
    """Sums of every Prometheus sample by metric name (all labels together)."""
    totals: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("ganserve_") and " " in line:
            name = line.split("{")[0].split(" ")[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


async def client_loop(connection: KeepAliveConnection, raw: bytes, stop_at: float, latencies: list[float], statuses: dict[str, int]) -> None:
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            status = str((await connection.send(raw))[0])
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            status = type(error).__name__
        latencies.append(time.perf_counter() - started)
        statuses[status] = statuses.get(status, 0) + 1


async def drive(url: str, path: str, request: dict, concurrency: int, duration_s: float) -> tuple[list[float], dict[str, int], float]:
    """`concurrency` clients, one keep-alive connection each (a shared pool serialises on its own
    lock at high concurrency and measures itself instead of the server)."""
    raw = request_bytes(urlsplit(url).netloc, path, request)
    connections = [KeepAliveConnection(url) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(connection.send(raw) for connection in connections))  # connect before timing
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(connection, raw, started + duration_s, latencies, statuses) for connection in connections))
        return latencies, statuses, time.perf_counter() - started
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))


def cpu_seconds(pid: int | None) -> dict[str, float]:
    """User + system CPU seconds of a server by part (bench/server.py `cpu_seconds_by_part`; their
    sum is the whole server's, `serve --workers N`'s engine and fronts included); empty when unknown."""
    return {} if pid is None else cpu_seconds_by_part(pid)


@dataclass
class Tally:
    """What rounds of one scenario add up to: every latency, status, second, CPU second and
    metric delta (summed, so rounds interleaved with other servers' make one result)."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # by part of the server
    deltas: dict[str, float] = field(default_factory=dict)

    def add(self, latencies: list[float], statuses: dict[str, int], elapsed_s: float, cpu_s: dict[str, float], deltas: dict[str, float]) -> None:
        self.latencies += latencies
        for status, count in statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        self.elapsed_s += elapsed_s
        for part, seconds in cpu_s.items():
            self.cpu_s[part] = self.cpu_s.get(part, 0.0) + seconds
        for name, value in deltas.items():
            self.deltas[name] = self.deltas.get(name, 0.0) + value


@dataclass(frozen=True)
class Target:
    """One server a scenario drives: where, what, and how it is measured."""

    scenario: str
    url: str
    body: dict
    path: str
    request: dict
    pid: int | None = None  # the server process, whose CPU time per request is reported
    metrics: bool = True  # False for a server without /metrics (the naive baseline)


def target(url: str, model: str, scenario: str, body: dict, path: str | None = None, request: dict | None = None,
           pid: int | None = None, metrics: bool = True) -> Target:
    """Drives `generate` with the JSON `body`, or `path` with httpx-style `request` arguments
    (`content=`, `headers=`)."""
    return Target(scenario, url, body, path or f"/v1/models/{model}/generate", request or {"json": body}, pid, metrics)


def measure_round(t: Target, concurrency: int, duration_s: float, tally: Tally) -> None:
    before = scrape(t.url) if t.metrics else {}
    cpu_before = cpu_seconds(t.pid)
    latencies, statuses, elapsed = asyncio.run(drive(t.url, t.path, t.request, concurrency, duration_s))
    cpu = {part: seconds - cpu_before.get(part, 0.0) for part, seconds in cpu_seconds(t.pid).items()}
    after = scrape(t.url) if t.metrics else {}
    tally.add(latencies, statuses, elapsed, cpu, {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after})


def summarise(t: Target, concurrency: int, tally: Tally) -> LoadResult:
    delta = tally.deltas
    requests = max(delta.get("ganserve_request_duration_seconds_count", 0.0), 1.0)
    lat = np.asarray(tally.latencies) * 1000
    return LoadResult(
        scenario=t.scenario, concurrency=concurrency, images_per_request=t.body.get("n", 1), duration_s=tally.elapsed_s, requests=len(tally.latencies),
        statuses=tally.statuses,
        latency_ms={q: float(np.percentile(lat, p)) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))} | {"max": float(lat.max())},
        mean_batch_items=delta.get("ganserve_batch_items_sum", 0.0) / max(delta.get("ganserve_batch_items_count", 0.0), 1.0),
        stage_ms={stage: 1000 * delta.get(f"ganserve_{stage}_duration_seconds_sum", 0.0) / requests for stage in ("queue", "compute", "encode", "request")},
        item_queue_ms=1000 * delta.get("ganserve_queue_duration_seconds_sum", 0.0) / max(delta.get("ganserve_queue_duration_seconds_count", 0.0), 1.0),
        server_cpu_ms_per_request=1000 * sum(tally.cpu_s.values()) / max(len(tally.latencies), 1) if t.pid is not None else 0.0,
        server_cpu_ms_by_part={part: 1000 * seconds / max(len(tally.latencies), 1) for part, seconds in tally.cpu_s.items()},
    )


def run_interleaved(targets: list[Target], concurrency: int, duration_s: float, rounds: int) -> list[LoadResult]:
    """Each target for `duration_s` in all, in `rounds` turns taken one after another (A B C A B
    C ...): a drift of the machine (another tenant, a warming cache) lands on every server alike
    instead of on whichever ran last, so their ratios hold within one run."""
    tallies = [Tally() for _ in targets]
    for _ in range(rounds):
        for t, tally in zip(targets, tallies):
            measure_round(t, concurrency, duration_s / rounds, tally)
    return [summarise(t, concurrency, tally) for t, tally in zip(targets, tallies)]


def run_load(url: str, model: str, scenario: str, body: dict, concurrency: int, duration_s: float, path: str | None = None, request: dict | None = None,
             pid: int | None = None, metrics: bool = True) -> LoadResult:
    """One server, one scenario, one round (`target` says what the arguments mean)."""
    return run_interleaved([target(url, model, scenario, body, path, request, pid, metrics)], concurrency, duration_s, 1)[0]
