"""`ganserve bench`: starts the real server as users start it (with batching, and with batching
off as the baseline), drives it with the load generator, measures the ceiling with the same
runtime, and prints one table with the ratios. Results also go to a JSON file."""
from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.ceiling import measure_ceiling
from bench.load import LoadResult, run_load
from bench.server import launched_server
from service.repository import scan_repository

console = Console()


@contextlib.contextmanager
def server(repository: Path, **settings):
    with launched_server(repository, log_level="warning", **settings) as (_, url):
        yield url


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = ""
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} cores ({cpu}){gpu}, Python {platform.python_version()}"


def run_bench(repository: Path, model: str, runtime: str, concurrencies: list[int], duration_s: float, big_request: int,
              max_batch_size: int, max_queue_delay_ms: float, threads: int, out: Path | None) -> dict:
    entries = [e for e in scan_repository(repository) if e.name == model]
    if not entries:
        raise SystemExit(f"no model {model!r} in {repository}")
    entry = max(entries, key=lambda e: e.version)
    device = "cuda" if runtime != "onnx" and _cuda() else "cpu"
    common = dict(runtime=runtime, intra_op_threads=threads, max_queue_size=100_000)
    configurations = [
        (f"natural batching (max_batch_size={max_batch_size}, delay 0)", dict(max_batch_size=max_batch_size, max_queue_delay_ms=0), True),
        (f"batching with {max_queue_delay_ms:g} ms delay", dict(max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms), False),
        ("no batching (max_batch_size=1)", dict(max_batch_size=1, max_queue_delay_ms=0), False),
    ]
    loads: list[LoadResult] = []
    for title, settings, with_big_requests in configurations:
        with server(repository, **settings, **common) as url:
            for c in concurrencies:
                loads.append(run_load(url, model, f"{title}, 1 image/request", {"seed": 1}, c, duration_s))
            if with_big_requests:
                loads.append(run_load(url, model, f"{title}, {big_request} images/request", {"seed": 1, "n": big_request}, 4, duration_s))
    ceilings = measure_ceiling(entry, runtime, device, threads, sorted({1, max_batch_size, big_request}))
    report = {"machine": machine(), "model": model, "runtime": runtime, "max_batch_size": max_batch_size, "max_queue_delay_ms": max_queue_delay_ms,
              "load": [r.to_dict() for r in loads], "ceiling": [c.to_dict() for c in ceilings]}
    print_report(report)
    console.print("the ratio column divides by the best forward+PNG ceiling; large requests encode one grid PNG, not one PNG per image")
    write_report(report, out)
    return report


def write_report(report: dict, out: Path | None) -> None:
    """The raw report as JSON, when a path is given."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))


def _cuda() -> bool:
    with contextlib.suppress(Exception):
        import torch

        return torch.cuda.is_available()
    return False


def print_report(report: dict) -> None:
    console.print(f"[bold]{report['model']}[/] on {report['machine']}, runtime {report['runtime']}, max_batch_size {report['max_batch_size']}, max_queue_delay_ms {report['max_queue_delay_ms']}")
    best_ceiling = max(c["forward_encode_images_per_s"] for c in report["ceiling"])
    table = Table(title="service (HTTP, real server)")
    for column in ("scenario", "conc.", "req/s", "img/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch", "queue/compute/encode ms", "img/s ÷ ceiling"):
        table.add_column(column, justify="right" if column != "scenario" else "left")
    for r in report["load"]:
        errors = sum(v for k, v in r["statuses"].items() if k != "200")
        stages = "/".join(f"{r['stage_ms'][s]:.1f}" for s in ("queue", "compute", "encode"))
        table.add_row(r["scenario"], str(r["concurrency"]), f"{r['requests_per_s']:.0f}", f"{r['images_per_s']:.0f}", f"{r['latency_ms']['p50']:.1f}",
                      f"{r['latency_ms']['p95']:.1f}", f"{r['latency_ms']['p99']:.1f}", str(errors), f"{r['mean_batch_items']:.1f}", stages,
                      f"{r['images_per_s'] / best_ceiling:.2f}")
    console.print(table)
    ceiling = Table(title="ceiling (same runtime, bare forward, no HTTP)")
    for column in ("batch", "device", "forward img/s", "forward + PNG img/s"):
        ceiling.add_column(column, justify="right")
    for c in report["ceiling"]:
        ceiling.add_row(str(c["batch_size"]), c["device"], f"{c['forward_images_per_s']:.0f}", f"{c['forward_encode_images_per_s']:.0f}")
    console.print(ceiling)
