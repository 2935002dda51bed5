"""An async httpx load generator: `concurrency` clients post the same kind of request in a loop
for `duration_s`, then the latency distribution, throughput, errors and the server's own mean
batch size (from /metrics) are reported."""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np


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
    stage_ms: dict[str, float] = field(default_factory=dict)  # mean queue/compute/encode per request

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


def scrape(url: str) -> dict[str, float]:
    """Sums of every Prometheus sample by metric name (all labels together)."""
    totals: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("ganserve_") and " " in line:
            name = line.split("{")[0].split(" ")[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


async def client_loop(client: httpx.AsyncClient, path: str, request: dict, stop_at: float, latencies: list[float], statuses: dict[str, int]) -> None:
    """`request`: keyword arguments of httpx's post (json=…, or content=… with headers)."""
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            response = await client.post(path, **request)
            status = str(response.status_code)
        except httpx.HTTPError as error:
            status = type(error).__name__
        latencies.append(time.perf_counter() - started)
        statuses[status] = statuses.get(status, 0) + 1


async def drive(url: str, path: str, request: dict, concurrency: int, duration_s: float) -> tuple[list[float], dict[str, int], float]:
    # one client (one keep-alive connection) per simulated user: a single shared httpx pool
    # serialises on its own lock at high concurrency and measures itself instead of the server
    clients = [httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1), timeout=60) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(client.post(path, **request) for client in clients))  # connect before timing
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, path, request, started + duration_s, latencies, statuses) for client in clients))
        return latencies, statuses, time.perf_counter() - started
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


def run_load(url: str, model: str, scenario: str, body: dict, concurrency: int, duration_s: float, path: str | None = None, request: dict | None = None) -> LoadResult:
    """Drives `generate` with the JSON `body`, or `path` with raw httpx `request` arguments."""
    before = scrape(url)
    latencies, statuses, elapsed = asyncio.run(drive(url, path or f"/v1/models/{model}/generate", request or {"json": body}, concurrency, duration_s))
    after = scrape(url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    requests = max(delta.get("ganserve_request_duration_seconds_count", 0.0), 1.0)
    lat = np.asarray(latencies) * 1000
    return LoadResult(
        scenario=scenario, concurrency=concurrency, images_per_request=body.get("n", 1), duration_s=elapsed, requests=len(latencies), statuses=statuses,
        latency_ms={q: float(np.percentile(lat, p)) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))} | {"max": float(lat.max())},
        mean_batch_items=delta.get("ganserve_batch_items_sum", 0.0) / max(delta.get("ganserve_batch_items_count", 0.0), 1.0),
        stage_ms={stage: 1000 * delta.get(f"ganserve_{stage}_duration_seconds_sum", 0.0) / requests for stage in ("queue", "compute", "encode", "request")},
    )
