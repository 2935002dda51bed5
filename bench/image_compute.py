"""`ganserve bench-image-compute`: the image-to-image requests' compute, this code against another
checkout (`--baseline-code`), the two servers in turns on the same models and uploads.

Cases: a 256² upscale (9 tiles of the shipped x4 ESRGAN-lite), one client on its upscale stream
sending 128² frames (4 tiles a frame; closed loop, so nothing is dropped and frames/s is what one
stream sustains), and a 1024² CycleGAN translate. Per case and code: the median and the largest
compute the answers' `Server-Timing` gives (frames/s and p50 for the stream), and the medians'
ratio (baseline over this code: above 1, this code is faster). A case whose path neither code
changed is the run's noise. The server's resident memory once ready and again after the cases
says what each code keeps for the speed (an arena holds its activations between runs).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.hugepages import time_case
from bench.runner import machine, write_report
from bench.server import launched_server
from bench.soak import png, rss_bytes
from bench.upscale import measure_stream

REQUEST_CASES = (("sr-rrdb-x4", "upscale", 256), ("cyclegan-thin2thick", "translate", 1024))
STREAM_CASE = ("sr-rrdb-x4", 128)


def one_turn(repository: Path, code: Path | None, requests: int, stream_s: float, threads: int,
             request_cases: tuple[tuple[str, str, int], ...], stream_case: tuple[str, int]) -> dict[str, dict[str, list[float]]]:
    """Every case through one server: compute seconds of each request, and the stream's figures."""
    models = sorted({model for model, _, _ in request_cases} | {stream_case[0]})
    figures: dict[str, dict[str, list[float]]] = {}
    with launched_server(repository, code=code, models=models, intra_op_threads=threads, request_timeout_s=120,
                         max_translate_pixels=4096 * 4096) as (process, url):
        figures["resident MiB"] = {"ready": [rss_bytes(process.pid) / 2**20]}
        for model, operation, side in request_cases:
            compute, _ = time_case(url, model, operation, side, requests)
            figures[f"{model} {operation} {side}²"] = {"compute_s": compute}
        model, side = stream_case
        stream = measure_stream(url, model, png(side, side), "jpeg", stream_s)
        figures[f"{model} stream {side}²"] = {"frames_per_s": [stream["frames_per_s"]], "p50_ms": [stream["p50_ms"]]}
        figures["resident MiB"]["after"] = [rss_bytes(process.pid) / 2**20]
    return figures



def run_image_compute_bench(repository: Path, baseline_code: Path, rounds: int, requests: int, stream_s: float, out: Path | None,
                            threads: int = 2, request_cases: tuple[tuple[str, str, int], ...] = REQUEST_CASES,
                            stream_case: tuple[str, int] = STREAM_CASE) -> dict:
    """`request_cases`: (model, operation, side) posted; `stream_case`: (model, frame side)."""
    codes: dict[str, Path | None] = {"this code": None, "baseline": baseline_code}
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for _ in range(rounds):  # in turns, so both codes see the same spells of the machine
        for label, code in codes.items():
            for case, figures in one_turn(repository, code, requests, stream_s, threads, request_cases, stream_case).items():
                cell = cells.setdefault((case, label), {})
                for key, values in figures.items():
                    cell.setdefault(key, []).extend(values)
    rows = []
    for case in dict.fromkeys(case for case, _ in cells):
        now, base = cells[(case, "this code")], cells[(case, "baseline")]
        if case == "resident MiB":
            row = {"case": case, **{f"{key}_{code}": statistics.median(cell[key]) for code, cell in (("now", now), ("baseline", base)) for key in ("ready", "after")}}
        elif "compute_s" in now:
            row = {"case": case, "compute_now_s": statistics.median(now["compute_s"]), "compute_baseline_s": statistics.median(base["compute_s"]),
                   "compute_max_now_s": max(now["compute_s"]), "compute_max_baseline_s": max(base["compute_s"]),
                   "compute_now_all_s": [round(v, 4) for v in now["compute_s"]], "compute_baseline_all_s": [round(v, 4) for v in base["compute_s"]]}
            row["speedup"] = row["compute_baseline_s"] / row["compute_now_s"]
        else:
            row = {"case": case, "frames_per_s_now": statistics.median(now["frames_per_s"]), "frames_per_s_baseline": statistics.median(base["frames_per_s"]),
                   "p50_ms_now": statistics.median(now["p50_ms"]), "p50_ms_baseline": statistics.median(base["p50_ms"])}
            row["speedup"] = row["frames_per_s_now"] / row["frames_per_s_baseline"]
        if "speedup" not in row:
            rows.append({key: round(value, 1) if isinstance(value, float) else value for key, value in row.items()})
            continue
        rows.append({key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()})
    report = {"machine": machine(), "baseline_code": str(baseline_code), "rounds": rounds, "requests": requests, "stream_s": stream_s,
              "intra_op_threads": threads, "rows": rows}
    print_image_compute_report(report)
    if out is not None:
        write_report(report, out)
    return report


def print_image_compute_report(report: dict) -> None:
    table = Table(title=f"image-to-image compute, this code / baseline ({report['baseline_code']}), {report['rounds']} rounds, "
                        f"{report['intra_op_threads']} intra-op threads — {report['machine']}")
    for column in ("case", "this code", "baseline", "speedup"):
        table.add_column(column)
    for row in report["rows"]:
        if row["case"] == "resident MiB":
            table.add_row("resident MiB: ready → after the cases", f"{row['ready_now']:.0f} → {row['after_now']:.0f}",
                          f"{row['ready_baseline']:.0f} → {row['after_baseline']:.0f}", "")
            continue
        if "compute_now_s" in row:
            now = f"{row['compute_now_s']:.3f} s ({row['compute_max_now_s']:.3f})"
            base = f"{row['compute_baseline_s']:.3f} s ({row['compute_max_baseline_s']:.3f})"
        else:
            now = f"{row['frames_per_s_now']:.2f} frames/s, p50 {row['p50_ms_now']:.0f} ms"
            base = f"{row['frames_per_s_baseline']:.2f} frames/s, p50 {row['p50_ms_baseline']:.0f} ms"
        table.add_row(row["case"], now, base, f"{row['speedup']:.2f}x")
    Console(width=200).print(table)
