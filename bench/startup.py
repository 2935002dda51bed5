"""`ganserve bench-startup`: how long `ganserve serve` takes to become ready, and the CPU it spends.

A start is paid at every deploy, every restart after a stuck lane or a crash, every replica Ray
adds under load, and about a hundred times in the test suite. Servers of the same repository
start one after the other, this code and, with `--baseline-code`, another checkout in turns (so
both meet the same spells of the machine); per start: the seconds from launch until
/health/ready answers 200, and the CPU seconds the process (with its children: `--workers`
fronts and engine) used until then.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.runner import machine, write_report
from bench.server import launched_server
from service.host_load import sibling_cpu_seconds


def one_start(repository: Path, code: Path | None, workers: int) -> dict:
    extra = {"workers": workers} if workers > 1 else {}
    started = time.perf_counter()
    with launched_server(repository, code=code, log_level="warning", **extra) as (process, _):
        ready_s = time.perf_counter() - started
        cpu_s = sibling_cpu_seconds(process.pid, own_pid=0)  # the process, its children (engine, fronts) and any it reaped
    return {"ready_s": round(ready_s, 2), "cpu_s": round(cpu_s, 2)}


def run_startup_bench(repository: Path, starts: int, workers: list[int], baseline_code: Path | None, out: Path | None) -> dict:
    codes: dict[str, Path | None] = {"this code": None, **({"baseline": baseline_code} if baseline_code else {})}
    runs: dict[tuple[str, int], list[dict]] = {(label, n): [] for n in workers for label in codes}
    for _ in range(starts):  # the codes in turns
        for n in workers:
            for label, code in codes.items():
                runs[(label, n)].append(one_start(repository, code, n))
    rows = []
    for (label, n), measured in runs.items():
        row = {"server": f"{label}, workers {n}", "starts": measured,
               "median_ready_s": statistics.median(run["ready_s"] for run in measured),
               "median_cpu_s": statistics.median(run["cpu_s"] for run in measured)}
        if label == "this code" and ("baseline", n) in runs:
            base = runs[("baseline", n)]
            row["ready_over_baseline"] = round(row["median_ready_s"] / statistics.median(run["ready_s"] for run in base), 3)
            row["cpu_over_baseline"] = round(row["median_cpu_s"] / statistics.median(run["cpu_s"] for run in base), 3)
        rows.append(row)
    report = {"machine": machine(), "repository": str(repository), "baseline_code": str(baseline_code) if baseline_code else None, "servers": rows}
    table = Table(title=f"`ganserve serve` of {repository}: launch to ready — {report['machine']}")
    for column in ("server", "starts", "ready s (each)", "median ready s", "median CPU s", "÷ baseline (ready / CPU)"):
        table.add_column(column)
    for row in rows:
        ratio = f"{row['ready_over_baseline']:.2f} / {row['cpu_over_baseline']:.2f}" if "ready_over_baseline" in row else ""
        table.add_row(row["server"], str(len(row["starts"])), ", ".join(str(run["ready_s"]) for run in row["starts"]),
                      f"{row['median_ready_s']:.2f}", f"{row['median_cpu_s']:.2f}", ratio)
    Console().print(table)
    write_report(report, out)
    return report
