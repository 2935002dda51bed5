"""`ganserve bench-limits`: what a busy warm-up does to the models' limits, and how soon the idle
server undoes it (service/remeasure.py).

Two servers in turn on the same models, as users start them: one warmed on a quiet machine (the
reference), one warmed beside busy loops (`loops_per_core` per core) that stop once it is ready.
Per model: the cost per unit and the limits at ready, then, for the busy one, after its idle
re-measure: how long after the loops stopped the limits relaxed, and what one re-measure costs the
model's lane (`repeats` runs at the smallest and the largest warmed shape; a request that arrives
meanwhile waits for one run at most).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.runner import machine, write_report
from bench.server import launched_server


def start_loops(count: int) -> list[subprocess.Popen]:
    """`count` processes that spin a core each until `stop`ped, each in its own session like
    another tenant's: with the kernel's autogroup scheduling (on by default) CPU time is shared
    between sessions first, so loops in the caller's session would slow a server that runs in
    the same session but not a `--workers` engine, which runs in its own."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(count)]


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[list[subprocess.Popen]]:
    """`start_loops` for the block (the caller may stop them early)."""
    loops = start_loops(count)
    try:
        yield loops
    finally:
        stop(loops)


def stop(loops: list[subprocess.Popen]) -> None:
    for loop in loops:
        loop.kill()
        loop.wait()


def model_figures(url: str, name: str) -> dict:
    """The served version's limits and main-graph cost, as GET /v1/models/{name} shows them."""
    version = httpx.get(f"{url}/v1/models/{name}", timeout=30).json()["versions"][-1]
    return {"limits": version.get("limits"), "cost": version["costs"]["model"], "repeats": version["serving"]["warmup_repeats"]}


def remeasure_lane_seconds(figures: dict) -> tuple[float, float]:
    """(seconds one re-measure keeps the lane, seconds of its longest run) from the fitted cost."""
    cost = figures["cost"]
    ends = [cost["batch_overhead_seconds"] + cost["seconds_per_unit"] * units for units in (cost["warmed_units"][0], cost["warmed_units"][-1])]
    points = ends if cost["warmed_units"][-1] != cost["warmed_units"][0] else ends[:1]
    return figures["repeats"] * sum(points), max(points)


def run_limits_bench(repository: Path, models: list[str], loops_per_core: int, idle_s: float, timeout_s: float,
                     out: Path | None, **settings) -> dict:
    with launched_server(repository, models=models, remeasure_idle_s=idle_s, **settings) as (_, url):
        quiet = {name: model_figures(url, name) for name in models}
    with busy_loops(loops_per_core * (os.cpu_count() or 1)) as loops, \
            launched_server(repository, models=models, remeasure_idle_s=idle_s, **settings) as (_, url):
        busy = {name: model_figures(url, name) for name in models}
        stop(loops)
        stopped = time.monotonic()
        after: dict[str, dict] = {}
        relaxed_after_s: dict[str, float | None] = {name: None for name in models}
        while time.monotonic() - stopped < timeout_s and None in relaxed_after_s.values():
            time.sleep(0.25)
            for name in models:
                after[name] = model_figures(url, name)
                if relaxed_after_s[name] is None and after[name]["cost"]["relaxed_when_idle"]:
                    relaxed_after_s[name] = round(time.monotonic() - stopped, 2)
    rows = []
    for name in models:
        lane_s, longest_s = remeasure_lane_seconds(after[name])
        rows.append({"model": name, "quiet": quiet[name], "busy": busy[name], "after_idle": after[name], "relaxed_after_s": relaxed_after_s[name],
                     "remeasure_lane_s": round(lane_s, 4), "remeasure_longest_run_s": round(longest_s, 4)})
    report = {"machine": machine(), "loops_per_core": loops_per_core, "remeasure_idle_s": idle_s, "settings": settings, "models": rows}
    print_limits_report(report)
    if out is not None:
        write_report(report, out)
    return report


def print_limits_report(report: dict) -> None:
    table = Table(title=f"limits after a quiet warm-up, a busy one ({report['loops_per_core']} busy loops a core), and that one once idle "
                        f"({report['remeasure_idle_s']} s) — {report['machine']}")
    for column in ("model", "s/unit quiet", "s/unit busy", "s/unit idle again", "side quiet", "side busy", "side idle again", "relaxed after s",
                   "re-measure lane s (longest run)"):
        table.add_column(column)
    for row in report["models"]:
        def side(figures: dict) -> str:
            return str((figures["limits"] or {}).get("max_input_side") or "-")

        table.add_row(row["model"], *(f"{row[k]['cost']['seconds_per_unit']:.4f}" for k in ("quiet", "busy", "after_idle")),
                      side(row["quiet"]), side(row["busy"]), side(row["after_idle"]), str(row["relaxed_after_s"]),
                      f"{row['remeasure_lane_s']:.3f} ({row['remeasure_longest_run_s']:.3f})")
    Console().print(table)
