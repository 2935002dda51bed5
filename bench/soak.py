"""`ganserve bench-soak`: the resource-safety figures, through the real server as users start it.

1. **isolation**: DCGAN generate latency alone (the baseline), then beside clients that keep the
   translate and upscale lanes saturated; the ratio of the two p99s is the cost of sharing the
   machine.
2. **soak**: `concurrency` clients for `duration` seconds of mixed traffic — every operation,
   with a share of hostile requests (huge counts, decompression bombs, over-limit uploads, bad
   tensors) — reporting statuses per operation, p50/p99 per operation and the server's RSS
   after warm-up and at the end (growth target < 10 %). Clients honour Retry-After on 429/503
   as well-behaved ones do; errors (500, 504, broken connections: target 0) are counted apart
   from those overload refusals.
3. **stalled readers** (`--stalled-readers N`, bench/stalled.py): N clients ask for big answers
   and never read them, on a server of its own under a small memory budget.
4. **connection hogs** (`--connection-hogs N`, bench/hogs.py): one client holds N silent sockets,
   re-opened as fast as they are closed, from a benign client's own address and from another.
"""
from __future__ import annotations

import asyncio
import io
import random
import struct
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.runner import machine, write_report
from bench.server import launched_server

console = Console()


def png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def smooth_png(side: int) -> bytes:
    """A side x side gradient: a PNG of a few hundred KB at any size (noise of 2048² passes the
    8 MiB body limit), for requests sized by their pixels."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A few dozen bytes whose header claims width x height."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


@dataclass(frozen=True)
class Request:
    operation: str  # the table's row
    method: str
    path: str
    options: dict
    hostile: bool = False


def traffic() -> list[tuple[float, Request]]:
    """(weight, request) of the soak's mix: 85 % ordinary work, 15 % hostile."""
    image = {"content": png(64, 64), "headers": {"content-type": "image/png"}}
    grey = {"content": png(48, 40, mode="L"), "headers": {"content-type": "image/png"}}
    z = {"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [0.1] * 64}
    v1 = "/v1/models"
    ordinary = [
        (30, Request("dcgan generate", "POST", f"{v1}/dcgan-digits/generate", {"json": {"seed": 1}})),
        (8, Request("cdcgan generate 16", "POST", f"{v1}/cdcgan-digits/generate", {"json": {"seed": 3, "n": 16, "class": 7}})),
        (8, Request("stylegan generate 4", "POST", f"{v1}/stylegan-shapes/generate", {"json": {"seed": 5, "n": 4, "truncation_psi": 0.7}})),
        (5, Request("style-mix 3x3", "POST", f"{v1}/stylegan-shapes/style-mix", {"json": {"row_seeds": [1, 2, 3], "col_seeds": [4, 5, 6], "layers": "coarse"}})),
        (5, Request("edit 5", "POST", f"{v1}/stylegan-shapes/edit", {"json": {"seed": 2, "direction": "size"}})),
        (4, Request("interpolate 8", "POST", f"{v1}/stylegan-shapes/interpolate", {"json": {"seeds": [1, 2], "steps": 8, "format": "png"}})),
        (10, Request("translate 48x40", "POST", f"{v1}/cyclegan-thin2thick/translate", grey)),
        (5, Request("upscale 64²", "POST", f"{v1}/sr-rrdb-x4/upscale?format=jpeg", image)),
        (5, Request("v2 infer", "POST", "/v2/models/dcgan-digits/infer", {"json": {"inputs": [z]}})),
        (5, Request("GET models", "GET", f"{v1}", {})),
    ]
    hostile = [
        Request("hostile", "POST", f"{v1}/dcgan-digits/generate", {"json": {"n": 10**25}}, True),
        Request("hostile", "POST", f"{v1}/cyclegan-thin2thick/translate", {"content": bomb_png(4000, 4000), "headers": {"content-type": "image/png"}}, True),
        Request("hostile", "POST", f"{v1}/cyclegan-thin2thick/translate", {"content": bomb_png(20000, 20000), "headers": {"content-type": "image/png"}}, True),
        Request("hostile", "POST", f"{v1}/sr-rrdb-x4/upscale", {"content": bomb_png(1024, 1024), "headers": {"content-type": "image/png"}}, True),
        Request("hostile", "POST", f"{v1}/dcgan-digits/generate", {"json": {"seed": 1}, "headers": {"accept": "image/gif"}}, True),
        Request("hostile", "POST", f"{v1}/stylegan-shapes/style-mix", {"json": {"row_seeds": [2**64], "col_seeds": [1]}}, True),
        Request("hostile", "POST", "/v2/models/cdcgan-digits/infer",
                {"json": {"inputs": [z, {"name": "label", "shape": [1], "datatype": "INT64", "data": [2**63]}]}}, True),
        Request("hostile", "POST", "/v2/models/sr-rrdb-x4/infer",
                {"json": {"inputs": [{"name": "image", "shape": [1, 3, 384, 384], "datatype": "FP32", "data": [0.0] * 16}]}}, True),
        Request("hostile", "POST", f"{v1}/cyclegan-thin2thick/translate", {"content": b"\x89PNG broken" * 20, "headers": {"content-type": "image/png"}}, True),
        Request("hostile", "POST", f"{v1}/dcgan-digits/generate", {"content": b"[" * 50_000, "headers": {"content-type": "application/json"}}, True),
    ]
    return ordinary + [(15 / len(hostile), request) for request in hostile]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Tally:
    statuses: dict[str, dict[str, int]]
    latencies: dict[str, list[float]]

    @classmethod
    def empty(cls) -> "Tally":
        return cls(defaultdict(lambda: defaultdict(int)), defaultdict(list))

    def add(self, operation: str, status: str, seconds: float) -> None:
        self.statuses[operation][status] += 1
        self.latencies[operation].append(seconds)

    def summary(self) -> dict:
        rows = {}
        for operation, latencies in sorted(self.latencies.items()):
            ms = np.asarray(latencies) * 1000
            rows[operation] = {"requests": len(latencies), "statuses": dict(self.statuses[operation]),
                               "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}
        return rows


async def client(url: str, choose, stop_at: float, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1), timeout=120) as http:
        while time.perf_counter() < stop_at:
            request: Request = choose()
            started = time.perf_counter()
            retry_after = 0.0
            try:
                response = await http.request(request.method, request.path, **request.options)
                status = str(response.status_code)
                if response.status_code in (429, 503):
                    retry_after = float(response.headers.get("retry-after", 0) or 0)
            except httpx.HTTPError as error:
                status = type(error).__name__
            tally.add(request.operation, status, time.perf_counter() - started)
            if retry_after:  # as a well-behaved client does
                await asyncio.sleep(min(retry_after, max(0.0, stop_at - time.perf_counter())))


async def drive(url: str, mix: list[tuple[float, Request]], concurrency: int, duration_s: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    weights, requests = zip(*mix)
    choose = lambda: rng.choices(requests, weights)[0]  # noqa: E731
    stop_at = time.perf_counter() + duration_s
    await asyncio.gather(*(client(url, choose, stop_at, tally) for _ in range(concurrency)))


def run_isolation(url: str, duration_s: float) -> dict:
    """DCGAN generate p50/p99 alone, then while 3 clients translate 768² and 2 upscale 192²."""
    generate = Request("dcgan generate", "POST", "/v1/models/dcgan-digits/generate", {"json": {"seed": 1}})
    heavy = [(3, Request("translate 768²", "POST", "/v1/models/cyclegan-thin2thick/translate",
                         {"content": png(768, 768, mode="L"), "headers": {"content-type": "image/png"}})),
             (2, Request("upscale 192²", "POST", "/v1/models/sr-rrdb-x4/upscale?format=jpeg",
                         {"content": png(192, 192), "headers": {"content-type": "image/png"}}))]

    async def scenario(with_heavy: bool) -> Tally:
        tally = Tally.empty()
        stop_at = time.perf_counter() + duration_s
        tasks = [client(url, lambda: generate, stop_at, tally) for _ in range(4)]
        if with_heavy:
            tasks += [client(url, (lambda r=request: r), stop_at, tally) for count, request in heavy for _ in range(count)]
        await asyncio.gather(*tasks)
        return tally

    alone = asyncio.run(scenario(False)).summary()
    shared = asyncio.run(scenario(True)).summary()
    return {"alone": alone, "beside_heavy": shared,
            "p99_ratio": shared["dcgan generate"]["p99_ms"] / alone["dcgan generate"]["p99_ms"]}


def run_soak(repository: Path, concurrency: int, duration_s: float, isolation_s: float, warmup_s: float, out: Path | None,
             stalled_readers: int = 0, stalled_budget: int = 2 * 2**30, stalled_send_timeout_s: float = 30.0,
             connection_hogs: int = 0, hog_seconds: float = 15.0, hog_max_connections: int = 512) -> dict:
    report = soak_report(repository, concurrency, duration_s, isolation_s, warmup_s)
    if stalled_readers:
        from bench.stalled import run_stalled_readers

        console.print(f"stalled readers: {stalled_readers} clients ask for ~9 MB answers and never read them "
                      f"({stalled_budget / 2**20:.0f} MiB budget, {stalled_send_timeout_s:g} s send timeout)")
        report["stalled_readers"] = run_stalled_readers(repository, stalled_readers, stalled_budget, stalled_send_timeout_s)
    if connection_hogs:
        from bench.hogs import run_connection_hogs

        console.print(f"connection hogs: {connection_hogs} silent sockets re-opened as closed, {hog_seconds:g} s from the benign "
                      f"client's address, then from another (GANSERVE_MAX_CONNECTIONS={hog_max_connections})")
        report["connection_hogs"] = run_connection_hogs(repository, connection_hogs, hog_seconds, hog_max_connections)
    print_report(report)
    write_report(report, out)
    return report


def soak_report(repository: Path, concurrency: int, duration_s: float, isolation_s: float, warmup_s: float) -> dict:
    with launched_server(repository, log_level="warning") as (process, url):
        console.print(f"isolation: {isolation_s:g} s of DCGAN generate alone, then beside saturated translate/upscale lanes")
        isolation = run_isolation(url, isolation_s)
        tally = Tally.empty()
        rss: list[tuple[float, int]] = []

        async def soak() -> None:
            traffic_task = asyncio.ensure_future(drive(url, traffic(), concurrency, duration_s, tally, seed=0))
            started = time.perf_counter()
            with Progress(console=console, transient=True) as progress:
                bar = progress.add_task(f"soak: {concurrency} clients, mixed traffic", total=duration_s)
                while not traffic_task.done():
                    rss.append((time.perf_counter() - started, rss_bytes(process.pid)))
                    progress.update(bar, completed=min(duration_s, time.perf_counter() - started))
                    await asyncio.sleep(1.0)
            await traffic_task

        asyncio.run(soak())
        after_warmup = next(value for t, value in rss if t >= warmup_s) if any(t >= warmup_s for t, _ in rss) else rss[0][1]
        summary = tally.summary()
        errors = {op: sum(n for s, n in row["statuses"].items() if not s.isdigit() or s in ("500", "502", "504")) for op, row in summary.items()}
        refused = {op: sum(n for s, n in row["statuses"].items() if s in ("429", "503")) for op, row in summary.items()}
        report = {"machine": machine(), "concurrency": concurrency, "duration_s": duration_s, "isolation": isolation, "operations": summary,
                  "errors": sum(errors.values()), "overload_refusals": sum(refused.values()), "process_alive": process.poll() is None,
                  "rss_after_warmup_mb": after_warmup / 2**20, "rss_end_mb": rss[-1][1] / 2**20, "rss_peak_mb": max(v for _, v in rss) / 2**20,
                  "rss_growth": rss[-1][1] / after_warmup - 1}
    return report


def print_report(report: dict) -> None:
    iso = report["isolation"]
    table = Table(title=f"isolation on {report['machine']}: DCGAN generate, 4 clients")
    for column in ("scenario", "requests", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right" if column != "scenario" else "left")
    for label, key in (("alone", "alone"), ("beside 3 x translate 768² + 2 x upscale 192²", "beside_heavy")):
        row = iso[key]["dcgan generate"]
        table.add_row(label, str(row["requests"]), f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}")
    console.print(table)
    console.print(f"p99 beside heavy work ÷ p99 alone: {iso['p99_ratio']:.2f}")
    table = Table(title=f"soak: {report['concurrency']} clients, {report['duration_s']:g} s of mixed traffic (15 % hostile)")
    for column in ("operation", "requests", "statuses", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right" if column != "operation" else "left")
    for operation, row in report["operations"].items():
        statuses = " ".join(f"{s}:{n}" for s, n in sorted(row["statuses"].items()))
        table.add_row(operation, str(row["requests"]), statuses, f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}")
    console.print(table)
    console.print(f"errors (500/504/broken): {report['errors']}; overload refusals (429/503 with Retry-After): {report['overload_refusals']}; server alive at the end: {report['process_alive']}; RSS after warm-up {report['rss_after_warmup_mb']:.0f} MB, "
                  f"at the end {report['rss_end_mb']:.0f} MB (growth {100 * report['rss_growth']:+.1f} %), peak {report['rss_peak_mb']:.0f} MB")
    if stalled := report.get("stalled_readers"):
        statuses = " ".join(f"{s}:{n}" for s, n in sorted(stalled["statuses"].items()))
        benign = " ".join(f"{s}:{n}" for s, n in sorted(stalled["benign_statuses"].items()))
        console.print(f"stalled readers: {stalled['readers']} answered {statuses}; held for them {stalled['held_mb']:.0f} MB of a "
                      f"{stalled['capacity_mb']:.0f} MB request budget (RSS {stalled['rss_idle_mb']:.0f} → peak {stalled['rss_peak_mb']:.0f} MB, "
                      f"budget {stalled['memory_budget_mb']:.0f} MB); meanwhile a benign generate got {benign} "
                      f"(p50 {stalled['benign_p50_ms']:.1f} ms); budget whole again after {stalled['budget_whole_after_s']:.1f} s")
    if hogs := report.get("connection_hogs"):
        table = Table(title=f"connection hogs: {hogs['sockets']} silent sockets against a cap of {hogs['max_connections']}, a benign generate every 50 ms")
        for column in ("hog's address", "benign served", "benign statuses", "p50 ms", "p99 ms", "hog connects/s", "RSS peak MB"):
            table.add_column(column, justify="right" if column != "hog's address" else "left")
        for phase, row in hogs["phases"].items():
            benign = row["benign"]
            statuses = " ".join(f"{s}:{n}" for s, n in sorted(benign["statuses"].items()))
            table.add_row(phase.replace("_", " "), f"{100 * benign['served']:.0f} %", statuses, f"{benign['p50_ms']:.1f}", f"{benign['p99_ms']:.1f}",
                          f"{row['hog_connects_per_s']:.0f}", f"{row['rss_peak_mb']:.0f}")
        console.print(table)
