"""`ganserve bench-ray`: the same load through `ganserve serve` (one process) and `ganserve ray`
(a local Ray, one replica of the model behind the Serve proxy and the ingress), one after the
other on this machine: single-image generate at each concurrency, then a few upscales (a fresh
launch serving the SR model only), where one request's compute dwarfs the proxy hop. Reports
req/s and latency of both, the latency Ray adds (p50 difference), and how long each took from
launch to ready (the generate launch: for Ray, starting Ray itself and deploying)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.table import Table

from bench.load import run_load
from bench.runner import console, machine, rate, write_report
from bench.server import free_port, launched_process
from bench.upscale import test_frame
from service.imaging import encode

UPSCALE_SIDE = 64  # px in, 256 px out: about a second of compute per request on 2 cores
SERVER_SETTINGS = {"GANSERVE_INTRA_OP_THREADS": "1", "GANSERVE_ENCODER_THREADS": "1"}


def launch(kind: str, repository: Path, models: list[str]):
    """`ganserve serve` or `ganserve ray` on a free port, serving `models` only."""
    import os

    port = free_port()
    env = {**os.environ, **SERVER_SETTINGS, "GANSERVE_MODELS": json.dumps(models), "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "ganserve_cli", kind, "--repository", str(repository), "--host", "127.0.0.1", "--port", str(port)]
    if kind == "ray":
        env.pop("GANSERVE_MODELS")
        command += [arg for name in models for arg in ("--model", name)] + ["--num-cpus", "2"]
    return launched_process(command, port, env)


def measure(kind: str, repository: Path, model: str, upscale_model: str | None, concurrencies: list[int], duration_s: float, upscale_concurrencies: list[int]) -> dict:
    """Generate, then upscale, each on a fresh launch serving that model only (so the upscale is
    not measured in a process that just served a minute of saturated generate traffic)."""
    started = time.perf_counter()
    with launch(kind, repository, [model]) as (process, url):
        ready_s = time.perf_counter() - started
        rows = [run_load(url, model, f"{kind} generate", {"seed": 1}, c, duration_s, pid=process.pid if kind == "serve" else None).to_dict() for c in concurrencies]
    upscales = []
    if upscale_model:
        frame = encode(test_frame(UPSCALE_SIDE), "jpeg")
        request = {"content": frame, "headers": {"content-type": "image/jpeg"}}
        with launch(kind, repository, [upscale_model]) as (process, url):
            upscales = [run_load(url, upscale_model, f"{kind} upscale {UPSCALE_SIDE} px", {}, c, duration_s, path=f"/v1/models/{upscale_model}/upscale?format=jpeg", request=request).to_dict()
                        for c in upscale_concurrencies]
    return {"ready_s": ready_s, "generate": rows, "upscale": upscales}


def run_ray_bench(repository: Path, model: str, upscale_model: str | None, concurrencies: list[int], duration_s: float, out: Path | None) -> dict:
    upscale_concurrencies = [1, 2]
    report = {"machine": machine(), "model": model, "upscale_model": upscale_model, "duration_s": duration_s,
              "serve": measure("serve", repository, model, upscale_model, concurrencies, duration_s, upscale_concurrencies),
              "ray": measure("ray", repository, model, upscale_model, concurrencies, duration_s, upscale_concurrencies)}
    write_report(report, out)
    print_report(report)
    return report


def print_report(report: dict) -> None:
    serve, ray = report["serve"], report["ray"]
    console.print(f"[bold]{report['model']}[/] on {report['machine']}: ganserve serve ready in {serve['ready_s']:.1f} s, ganserve ray (local Ray + deploy) in {ray['ready_s']:.1f} s")
    for section, label in (("generate", "single-image generate"), ("upscale", f"upscale {report['upscale_model']}, {UPSCALE_SIDE} px JPEG → {4 * UPSCALE_SIDE} px JPEG")):
        if not serve[section]:
            continue
        table = Table(title=f"{label}: one process vs Ray Serve (1 replica)")
        for column in ("clients", "serve req/s", "ray req/s", "serve p50 ms", "ray p50 ms", "ray adds (p50) ms", "serve p99 ms", "ray p99 ms", "ray non-200"):
            table.add_column(column, justify="right")
        for one, other in zip(serve[section], ray[section]):
            failures = sum(n for status, n in other["statuses"].items() if status != "200")
            table.add_row(str(one["concurrency"]), rate(one["requests_per_s"]), rate(other["requests_per_s"]),
                          f"{one['latency_ms']['p50']:.1f}", f"{other['latency_ms']['p50']:.1f}", f"{other['latency_ms']['p50'] - one['latency_ms']['p50']:+.1f}",
                          f"{one['latency_ms']['p99']:.1f}", f"{other['latency_ms']['p99']:.1f}", str(failures))
        console.print(table)
