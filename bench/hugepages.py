"""`ganserve bench-hugepages`: the image-to-image requests with and without transparent huge
pages for the buffers glibc maps (`GANSERVE_HUGE_PAGES`, service/memory.py).

The upscale and translate graphs run without ONNX Runtime's arena, so every run maps its
activations afresh and the kernel faults them in. Two servers, one setting each, in turns
(`rounds`), on the same models and uploads; each posts `requests` of every case one after
another and reads the compute its answer's `Server-Timing` gives. Per case and setting: the
median and the largest compute, the median wall time over every round, and the medians' ratio
(off over on). The largest is the kernel's compaction where memory is fragmented (THP `defrag`):
a huge page's first fault may wait for it.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.fairness import server_timing
from bench.runner import machine, write_report
from bench.server import launched_server
from bench.soak import png

CASES = (("sr-rrdb-x4", "upscale", 256), ("cyclegan-thin2thick", "translate", 1024))


def time_case(url: str, model: str, operation: str, side: int, requests: int) -> tuple[list[float], list[float]]:
    """(compute seconds, wall seconds) of `requests` posts of one side² upload, one at a time."""
    body, compute, wall = png(side, side), [], []
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(requests):
            started = time.perf_counter()
            answer = client.post(f"/v1/models/{model}/{operation}", content=body, headers={"content-type": "image/png"}, params={"format": "jpeg"})
            wall.append(time.perf_counter() - started)
            answer.raise_for_status()
            compute.append(server_timing(answer.headers["server-timing"], "compute") / 1000)
    return compute, wall


def run_hugepages_bench(repository: Path, rounds: int, requests: int, out: Path | None, threads: int = 2) -> dict:
    figures: dict[tuple[str, bool], dict[str, list[float]]] = {}
    models = [model for model, _, _ in CASES]
    for _ in range(rounds):
        for huge in (False, True):  # in turns, so both settings see the same spells of the machine
            with launched_server(repository, models=models, huge_pages=huge, intra_op_threads=threads, request_timeout_s=120,
                                 max_translate_pixels=4096 * 4096) as (_, url):
                for model, operation, side in CASES:
                    compute, wall = time_case(url, model, operation, side, requests)
                    cell = figures.setdefault((model, huge), {"compute": [], "wall": []})
                    cell["compute"] += compute
                    cell["wall"] += wall
    rows = []
    for model, operation, side in CASES:
        off, on = figures[(model, False)], figures[(model, True)]
        row = {"model": model, "operation": operation, "side": side,
               **{f"{key}_{name}_s": round(statistics.median(cell[key]), 4) for name, cell in (("off", off), ("on", on)) for key in ("compute", "wall")}}
        row["compute_off_over_on"] = round(row["compute_off_s"] / row["compute_on_s"], 3)
        row["compute_max_off_s"], row["compute_max_on_s"] = round(max(off["compute"]), 4), round(max(on["compute"]), 4)
        row["compute_off_all_s"], row["compute_on_all_s"] = [round(v, 4) for v in off["compute"]], [round(v, 4) for v in on["compute"]]
        rows.append(row)
    report = {"machine": machine(), "rounds": rounds, "requests": requests, "intra_op_threads": threads, "rows": rows}
    table = Table(title=f"huge pages off / on, {rounds} rounds x {requests} requests, {threads} intra-op threads — {report['machine']}")
    for column in ("request", "compute off s: median (max)", "compute on s: median (max)", "off / on", "wall off s", "wall on s"):
        table.add_column(column)
    for row in rows:
        table.add_row(f"{row['model']} {row['operation']} {row['side']}²", f"{row['compute_off_s']:.3f} ({row['compute_max_off_s']:.3f})",
                      f"{row['compute_on_s']:.3f} ({row['compute_max_on_s']:.3f})",
                      f"{row['compute_off_over_on']:.2f}", f"{row['wall_off_s']:.3f}", f"{row['wall_on_s']:.3f}")
    Console().print(table)
    if out is not None:
        write_report(report, out)
    return report
