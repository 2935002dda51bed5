"""`ganserve bench`: starts the real server as users start it (with batching, and with batching
off as the baseline) and the naive server, all at once, drives them in interleaved turns with the
load generator, measures the ceiling with the same runtime, and prints one table with the ratios.
Results also go to a JSON file."""
from __future__ import annotations

import contextlib
import sys
import json
import os
import platform
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.ceiling import measure_ceiling
from bench.load import LoadResult, Target, run_interleaved, served_precision, target
from bench.server import launched_naive, launched_server
from service.repository import scan_repository

console = Console(width=None if sys.stdout.isatty() else 200)  # piped to a file: wide enough for the tables


NAIVE = "naive FastAPI (one sess.run per request, no batching)"
NATURAL = "natural batching ("  # one process
WORKERS = "natural batching, "  # --workers N
UNCAPTURED = "uncaptured natural batching ("  # the baseline of a --graph-capture run
BASELINE_CODE = "baseline code: natural batching ("  # --baseline-code: the same server from another checkout


def rate(per_s: float) -> str:
    """A throughput for a table: whole numbers from 10/s up, two decimals below (a 256² StyleGAN on
    a CPU serves under 1 image/s, which whole numbers print as 0)."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2f}"


def naive_unsupported(entry, runtime: str) -> str | None:
    """Why the naive baseline cannot serve this model the same way (None: it can)."""
    if runtime != "onnx":
        return "the naive server runs ONNX Runtime only"
    if [t["name"] for t in entry.graph_spec("model")["inputs"]] != ["z"]:
        return "the naive server draws z only (unconditional models)"
    return None


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
              max_batch_size: int, max_queue_delay_ms: float, threads: int, out: Path | None, workers: int = 1, graph_capture: str = "none",
              rounds: int = 3, baseline_code: Path | None = None) -> dict:
    """`rounds`: every server is up for the whole run and each scenario's `duration_s` is spent in
    that many turns, interleaved with the other servers' (bench/load.py `run_interleaved`).
    `baseline_code`: another checkout whose natural-batching server joins the turns, so that a
    change is measured against the code before it in the same run."""
    entries = [e for e in scan_repository(repository) if e.name == model]
    if not entries:
        raise SystemExit(f"no model {model!r} in {repository}")
    entry = max(entries, key=lambda e: e.version)
    device = "cuda" if runtime != "onnx" and _cuda() else "cpu"
    # only the measured model: every server of the run is up at once, and the others would only hold memory and slow start-up
    common = dict(runtime=runtime, intra_op_threads=threads, max_queue_size=100_000, graph_capture=graph_capture, models=[model])
    configurations = [
        (f"natural batching (max_batch_size={max_batch_size}, delay 0)", dict(max_batch_size=max_batch_size, max_queue_delay_ms=0), True),
        (f"batching with {max_queue_delay_ms:g} ms delay", dict(max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms), False),
        ("no batching (max_batch_size=1)", dict(max_batch_size=1, max_queue_delay_ms=0), False),
    ]
    if workers > 1:
        configurations.append((f"natural batching, {workers} front processes + engine (--workers {workers})",
                               dict(max_batch_size=max_batch_size, max_queue_delay_ms=0, workers=workers), True))
    if graph_capture != "none":  # what the capture is worth, measured in the same run
        configurations.append((f"{UNCAPTURED}max_batch_size={max_batch_size}, delay 0, graph_capture none)",
                               dict(max_batch_size=max_batch_size, max_queue_delay_ms=0, graph_capture="none"), True))
    if baseline_code is not None:
        configurations.append((f"{BASELINE_CODE}{baseline_code}, max_batch_size={max_batch_size}, delay 0)",
                               dict(max_batch_size=max_batch_size, max_queue_delay_ms=0, code=baseline_code), True))
    naive_reason = naive_unsupported(entry, runtime)
    if naive_reason is not None:
        console.print(f"naive baseline skipped: {naive_reason}")
    loads: list[LoadResult] = []
    with contextlib.ExitStack() as servers:  # every server up at once, idle but for its turns
        single: list[Target] = []
        big: list[Target] = []
        precision = None
        for title, settings, with_big_requests in configurations:
            process, url = servers.enter_context(launched_server(repository, log_level="warning", **(common | settings)))
            precision = precision or served_precision(url, model)  # the first server's: they all load the model alike
            single.append(target(url, model, f"{title}, 1 image/request", {"seed": 1}, pid=process.pid))
            if with_big_requests:
                big.append(target(url, model, f"{title}, {big_request} images/request", {"seed": 1, "n": big_request}, pid=process.pid))
        if naive_reason is None:
            process, url = servers.enter_context(launched_naive(repository, model, threads))
            single.append(target(url, model, f"{NAIVE}, 1 image/request", {"seed": 1}, pid=process.pid, metrics=False))
        for c in concurrencies:
            loads += run_interleaved(single, c, duration_s, rounds)
        loads += run_interleaved(big, 4, duration_s, rounds)
    order = {t.scenario: i for i, t in enumerate(single + big)}
    loads.sort(key=lambda r: (order[r.scenario], r.concurrency))  # the tables read by configuration
    ceilings = measure_ceiling(entry, runtime, device, threads, sorted({1, max_batch_size, big_request}), precision=precision)
    report = {"machine": machine(), "model": model, "runtime": runtime, "precision": precision, "graph_capture": graph_capture, "max_batch_size": max_batch_size,
              "max_queue_delay_ms": max_queue_delay_ms,
              "baseline_code": str(baseline_code) if baseline_code else None,
              "load": [r.to_dict() for r in loads], "ceiling": [c.to_dict() for c in ceilings]}
    print_report(report)
    print_side_by_side(report)
    print_capture_gain(report)
    print_cpu_parts(report)
    console.print("img/s ÷ ceiling divides by the best forward+PNG ceiling; large requests encode one grid PNG, not one PNG per image")
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
    console.print(f"[bold]{report['model']}[/] on {report['machine']}, runtime {report['runtime']} ({report.get('precision') or 'fp32'}), "
                  f"max_batch_size {report['max_batch_size']}, max_queue_delay_ms {report['max_queue_delay_ms']}")
    best_ceiling = max(c["forward_encode_images_per_s"] for c in report["ceiling"])
    table = Table(title="service (HTTP, real server)")
    for column in ("scenario", "conc.", "req/s", "img/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch", "item queue/compute/encode ms", "img/s ÷ ceiling"):
        table.add_column(column, justify="right" if column != "scenario" else "left")
    for r in report["load"]:
        errors = sum(v for k, v in r["statuses"].items() if k != "200")
        stages = "/".join(f"{value:.1f}" for value in (r.get("item_queue_ms", r["stage_ms"]["queue"]), r["stage_ms"]["compute"], r["stage_ms"]["encode"]))
        timed = bool(r["mean_batch_items"])  # the naive server reports no batches and no stage times: shown as —, not 0.0
        table.add_row(r["scenario"], str(r["concurrency"]), rate(r['requests_per_s']), rate(r['images_per_s']), f"{r['latency_ms']['p50']:.1f}",
                      f"{r['latency_ms']['p95']:.1f}", f"{r['latency_ms']['p99']:.1f}", str(errors),
                      f"{r['mean_batch_items']:.1f}" if timed else "—", stages if timed else "—",
                      f"{r['images_per_s'] / best_ceiling:.2f}")
    console.print(table)
    ceiling = Table(title="ceiling (same runtime, bare forward, no HTTP)")
    for column in ("batch", "device", "forward img/s", "forward + PNG img/s", "host grid ms", "grid JPEG ms"):
        ceiling.add_column(column, justify="right")
    for c in report["ceiling"]:
        grid_ms, jpeg_ms = c.get("grid_ms"), c.get("grid_jpeg_ms")
        ceiling.add_row(str(c["batch_size"]), c["device"], rate(c['forward_images_per_s']), rate(c['forward_encode_images_per_s']),
                        "" if grid_ms is None else f"{grid_ms:.2f}", "" if jpeg_ms is None else f"{jpeg_ms:.2f}")
    console.print(ceiling)


def print_cpu_parts(report: dict) -> None:
    """Where each server's CPU went, per request, by part: the figure that says what a bigger
    host buys. One process is bound by its one event loop; under `--workers N` the fronts' loops
    add up over cores, and the engine's one loop (which forms every batch) caps the whole server
    at 1000 / its ms per request, on a host whose cores are as fast as this one's."""
    rows = [r for r in report["load"] if r.get("server_cpu_ms_by_part")]
    if not rows:
        return
    table = Table(title="server CPU per request, by part (ms; each process's main thread runs its event loop)")
    for column in ("scenario", "conc.", "req/s", "CPU ms/req by part", "ceiling of the engine's (or only) loop, req/s"):
        table.add_column(column, justify="right" if column != "scenario" else "left")
    for r in rows:
        parts = r["server_cpu_ms_by_part"]
        loop_ms = parts.get("engine event loop", parts.get("event loop", 0.0))  # the loop every request of the server passes through
        table.add_row(r["scenario"], str(r["concurrency"]), rate(r["requests_per_s"]),
                      " · ".join(f"{part} {ms:.2f}" for part, ms in parts.items() if ms >= 0.005),
                      rate(1000 / loop_ms) if loop_ms > 0 else "")
    console.print(table)


def print_capture_gain(report: dict) -> None:
    """Natural batching with graphs captured against the same server uncaptured, per scenario."""
    uncaptured = {(r["concurrency"], r["images_per_request"]): r for r in report["load"] if r["scenario"].startswith(UNCAPTURED)}
    if not uncaptured:
        return
    table = Table(title=f"graph_capture {report.get('graph_capture')} vs none (natural batching, same run)")
    for column in ("conc.", "images/request", "captured images/s", "uncaptured images/s", "ratio", "captured p99 ms", "uncaptured p99 ms"):
        table.add_column(column, justify="right")
    for r in report["load"]:
        base = uncaptured.get((r["concurrency"], r["images_per_request"]))
        if base is None or not r["scenario"].startswith(NATURAL):
            continue
        table.add_row(str(r["concurrency"]), str(r["images_per_request"]), rate(r['images_per_s']), rate(base['images_per_s']),
                      f"{r['images_per_s'] / max(base['images_per_s'], 1e-9):.2f}", f"{r['latency_ms']['p99']:.1f}", f"{base['latency_ms']['p99']:.1f}")
    console.print(table)


def print_side_by_side(report: dict) -> None:
    """ganserve (natural batching) against the naive server at each concurrency: throughput ratio
    and both p99s, from the same run."""
    single = [r for r in report["load"] if r["images_per_request"] == 1]
    naive = {r["concurrency"]: r for r in single if r["scenario"].startswith(NAIVE)}
    ours_by_concurrency = {r["concurrency"]: r for r in single if r["scenario"].startswith(NATURAL)}
    workers_by_concurrency = {r["concurrency"]: r for r in single if r["scenario"].startswith(WORKERS)}
    before_by_concurrency = {r["concurrency"]: r for r in single if r["scenario"].startswith(BASELINE_CODE)}
    if not naive:
        return
    table = Table(title="ganserve (natural batching) vs the naive server, same load generator, same run")
    columns = ["conc.", "ganserve req/s", "naive req/s", "ratio", "ganserve p99 ms", "naive p99 ms", "ganserve CPU ms/req", "naive CPU ms/req"]
    if workers_by_concurrency:
        columns += ["--workers req/s", "--workers ratio", "--workers p99 ms"]
    if before_by_concurrency:
        columns += ["baseline code req/s", "ganserve ÷ baseline code", "baseline code p99 ms"]
    for column in columns:
        table.add_column(column, justify="right")
    for c, base in sorted(naive.items()):
        ours = ours_by_concurrency.get(c)
        if ours is None:
            continue
        row = [str(c), rate(ours['requests_per_s']), rate(base['requests_per_s']), f"{ours['requests_per_s'] / max(base['requests_per_s'], 1e-9):.2f}",
               f"{ours['latency_ms']['p99']:.1f}", f"{base['latency_ms']['p99']:.1f}",
               f"{ours['server_cpu_ms_per_request']:.2f}", f"{base['server_cpu_ms_per_request']:.2f}"]
        if workers_by_concurrency and (many := workers_by_concurrency.get(c)):
            row += [rate(many['requests_per_s']), f"{many['requests_per_s'] / max(base['requests_per_s'], 1e-9):.2f}", f"{many['latency_ms']['p99']:.1f}"]
        if before_by_concurrency and (before := before_by_concurrency.get(c)):
            row += [rate(before['requests_per_s']), f"{ours['requests_per_s'] / max(before['requests_per_s'], 1e-9):.2f}", f"{before['latency_ms']['p99']:.1f}"]
        table.add_row(*row)
    console.print(table)
