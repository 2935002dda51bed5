"""`ganserve bench-warmup`: how far a quiet start's warm-up timing is from the model's speed.

A model's limits and admission's estimates stand on what warm-up timed. A fresh process's first
runs of a graph can be 2-3x slow for seconds (service/costs.py `SETTLED_SPREAD`), and a warm-up
that timed them set limits that tight until the idle re-measure. Here servers start one after
the other on a quiet machine, as users start them (one process and `--workers N`), this code and,
with `--baseline-code`, another checkout in turns; per start: the cost per unit the warm-up
fitted and the largest side it allowed, then the same once the idle server has re-timed the
model (`GANSERVE_REMEASURE_IDLE_S`: it adopts a faster fit, or keeps the warm-up's and sets the
running correction to what it timed). The warm-up's s/unit over the idle lane's timing is how
slow the warm-up's figure was (below 1: the warm-up timed it faster than the idle lane later did).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.limits import model_figures
from bench.load import scrape
from bench.runner import machine, write_report
from bench.server import launched_server


def one_start(repository: Path, name: str, workers: int, code: Path | None, idle_s: float, timeout_s: float, **settings) -> dict:
    """One server's warm-up figures, and the same after its first idle re-timing of `name`."""
    extra = {"workers": workers} if workers > 1 else {}
    with launched_server(repository, code=code, models=[name], remeasure_idle_s=idle_s, **extra, **settings) as (_, url):
        ready = model_figures(url, name)
        deadline = time.monotonic() + timeout_s
        while scrape(url).get("ganserve_cost_remeasures_total", 0.0) < 1 and time.monotonic() < deadline:  # (the only model served)
            time.sleep(0.25)
        time.sleep(1.0)  # a `--workers` front lists the engine's figures as of its last snapshot (every 0.5 s)
        idle = model_figures(url, name)
    # what the idle lane timed: the adopted fit where it was faster, else the fit times the
    # correction the re-measure set to its own timing (`GraphCost.recalibrate`)
    timed_idle = idle["cost"]["seconds_per_unit"] * idle["cost"]["observed_over_measured"]
    slow = ready["cost"]["seconds_per_unit"] / timed_idle
    side = lambda figures: (figures["limits"] or {}).get("max_input_side")  # noqa: E731
    return {"s_per_unit_warmup": ready["cost"]["seconds_per_unit"], "s_per_unit_idle": round(timed_idle, 6),
            "warmup_over_idle": round(slow, 3), "side_warmup": side(ready), "side_idle": side(idle)}


def run_warmup_bench(repository: Path, name: str, starts: int, workers: list[int], baseline_code: Path | None, idle_s: float,
                     timeout_s: float, out: Path | None, **settings) -> dict:
    codes: dict[str, Path | None] = {"this code": None, **({"baseline": baseline_code} if baseline_code else {})}
    runs: dict[str, list[dict]] = {f"{label}, workers {n}": [] for n in workers for label in codes}
    for _ in range(starts):  # the codes in turns, so both see the same spells of the machine
        for n in workers:
            for label, code in codes.items():
                runs[f"{label}, workers {n}"].append(one_start(repository, name, n, code, idle_s, timeout_s, **settings))
    rows = []
    for key, starts_run in runs.items():
        ratios = [run["warmup_over_idle"] for run in starts_run]
        rows.append({"server": key, "starts": starts_run, "median_warmup_over_idle": round(statistics.median(ratios), 3),
                     "worst_warmup_over_idle": max(ratios), "starts_over_1_25": sum(ratio > 1.25 for ratio in ratios)})
    report = {"machine": machine(), "model": name, "remeasure_idle_s": idle_s, "baseline_code": str(baseline_code) if baseline_code else None,
              "settings": settings, "servers": rows}
    print_warmup_report(report)
    if out is not None:
        write_report(report, out)
    return report


def print_warmup_report(report: dict) -> None:
    table = Table(title=f"{report['model']}: warm-up's s/unit over the idle re-measure's, a quiet machine — {report['machine']}")
    for column in ("server", "starts", "median", "worst", "starts > 1.25x", "largest side at ready (after idle)"):
        table.add_column(column)
    for row in report["servers"]:
        sides = ", ".join(f"{run['side_warmup']} ({run['side_idle']})" for run in row["starts"])
        table.add_row(row["server"], str(len(row["starts"])), f"{row['median_warmup_over_idle']:.2f}", f"{row['worst_warmup_over_idle']:.2f}",
                      str(row["starts_over_1_25"]), sides)
    Console().print(table)
