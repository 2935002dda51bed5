"""What a client churning projection jobs costs everyone else's answers.

`python -m bench.projection_churn --baseline-code /tmp/base` serves the shipped repository from
this checkout and from another one (say `git worktree add /tmp/base <rev>`), in turns. In each
turn a benign client alternates a small upscale and a 16-image generate (whose grid is encoded in
the encoder pool), first alone, then beside two clients that submit projections of large flat
PNGs (4096² in 58 KB by default: 0.6 s of decoding each) and delete each job at once, as fast as
the job slots let them. Reported per phase: the benign client's p50/p90/max per operation and how
many projections went through. A probe of that churn found the uploads' decoding in the encoder
pool, ahead of the answers' encodings: the generate's p90 went 8 → 264 ms (service/jobs.py
`JobStore.intake` since).
"""
from __future__ import annotations

import io
import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import typer
from PIL import Image

from bench.server import launched_server

REPO = Path(__file__).resolve().parents[1]


def flat_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def noise_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def figures(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 1), "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1),
            "max_ms": round(ordered[-1], 1)}


def run_projection_churn(url: str, style_model: str, upscaler: str, generator: str, side: int = 4096, seconds: float = 20.0,
                         churners: int = 2) -> dict:
    """The benign client's figures for `seconds` alone, then beside `churners` projection churners."""
    target, small = flat_png(side), noise_png(64)
    phases = {}
    for phase, attackers in (("alone", 0), ("beside the churn", churners)):
        stop = threading.Event()
        projections = {"accepted": 0, "refused": 0}

        def churn() -> None:
            with httpx.Client(base_url=url, timeout=120) as client:
                while not stop.is_set():
                    answer = client.post(f"/v1/models/{style_model}/project?steps=1", content=target, headers={"content-type": "image/png"})
                    if answer.status_code == 202:
                        projections["accepted"] += 1
                        client.delete(answer.json()["status_url"])
                    else:
                        projections["refused"] += 1
                        time.sleep(0.05)

        threads = [threading.Thread(target=churn) for _ in range(attackers)]
        for thread in threads:
            thread.start()
        latencies: dict[str, list[float]] = {"upscale": [], "generate": []}
        statuses: dict[str, int] = {}
        ends = time.monotonic() + seconds
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                while time.monotonic() < ends:
                    for operation, send in (("upscale", lambda: client.post(f"/v1/models/{upscaler}/upscale", content=small,
                                                                              headers={"content-type": "image/png"})),
                                            ("generate", lambda: client.post(f"/v1/models/{generator}/generate", json={"seed": 1, "n": 16}))):
                        started = time.perf_counter()
                        status = send().status_code
                        latencies[operation].append((time.perf_counter() - started) * 1000)
                        statuses[f"{operation} {status}"] = statuses.get(f"{operation} {status}", 0) + 1
                    time.sleep(0.1)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        phases[phase] = {**{operation: figures(values) for operation, values in latencies.items()}, "statuses": statuses,
                         "projections": projections}
    return {"upload_bytes": len(target), "side": side, "phases": phases}


def main(seconds: float = typer.Option(20.0, help="each phase's length"),
         side: int = typer.Option(4096, help="the churned projections' upload side"),
         rounds: int = typer.Option(2, help="turns per server"),
         repository: Path = typer.Option(REPO / "model_repository", exists=True, file_okay=False),
         baseline_code: Path | None = typer.Option(None, exists=True, file_okay=False, help="another checkout to compare against")) -> None:
    models = {"style_model": "stylegan-shapes", "upscaler": "sr-rrdb-x4", "generator": "dcgan-digits"}
    servers = [("baseline", baseline_code)] if baseline_code else []
    for turn in range(rounds):
        for label, code in [*servers, ("this checkout", None)]:
            with launched_server(repository, code=code, models=list(models.values())) as (_, url):
                result = run_projection_churn(url, **models, side=side, seconds=seconds)
            print(json.dumps({"round": turn + 1, "server": label, **result}), flush=True)


if __name__ == "__main__":
    typer.run(main)
