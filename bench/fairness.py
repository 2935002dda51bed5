"""One client's single images while two others keep the same model busy with large requests.

`python -m bench.fairness --baseline-code /tmp/base` serves the shipped repository from this
checkout and from another one (say `git worktree add /tmp/base <rev>`), in turns, and reports for
each: the benign client's latency and its `Server-Timing` queue wait (p50/p99), and how many
large requests the two hogs got through (what fairness costs them). A probe once measured a benign
client waiting 6-16 s behind two clients' 64-image requests on a 256-px StyleGAN; the batcher now
takes one item of each waiting request before the rest (service/batcher.py: take_batch).
"""
from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import typer

from bench.server import launched_server

REPO = Path(__file__).resolve().parents[1]


@dataclass
class FairnessResult:
    benign_requests: int
    benign_p50_ms: float
    benign_p99_ms: float
    queue_p50_ms: float  # the benign requests' Server-Timing `queue`: their longest item wait in the batcher
    queue_p99_ms: float
    hog_requests: int  # large requests answered 200 to the two hogs


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[int(q * (len(ordered) - 1))], 1)


def server_timing(header: str, stage: str) -> float:
    return float(next(part.split("dur=")[1] for part in header.split(",") if part.strip().startswith(stage + ";")))


def run_fairness(url: str, model: str, hog_images: int, duration_s: float, pause_s: float = 0.05) -> FairnessResult:
    """Two hogs post `hog_images`-image requests back to back for `duration_s`; after a second,
    a benign client asks for one image every `pause_s` until half a second before the end."""
    stop = time.monotonic() + duration_s
    answered = [0, 0]

    def hog(slot: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop:
                answer = client.post(f"/v1/models/{model}/generate", json={"seed": slot, "n": hog_images, "format": "npy"})
                answered[slot] += answer.status_code == 200

    hogs = [threading.Thread(target=hog, args=(slot,)) for slot in range(2)]
    for thread in hogs:
        thread.start()
    latencies, queue_waits = [], []
    try:
        time.sleep(1.0)
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop - 0.5:
                started = time.perf_counter()
                answer = client.post(f"/v1/models/{model}/generate", json={"seed": 7})
                latencies.append((time.perf_counter() - started) * 1000)
                answer.raise_for_status()
                queue_waits.append(server_timing(answer.headers["server-timing"], "queue"))
                time.sleep(pause_s)
    finally:
        for thread in hogs:
            thread.join()
    return FairnessResult(len(latencies), round(statistics.median(latencies), 1), percentile(latencies, 0.99),
                          round(statistics.median(queue_waits), 1), percentile(queue_waits, 0.99), sum(answered))


def main(model: str = typer.Option("stylegan-shapes", help="a generator in the repository"),
         hog_images: int = typer.Option(64, help="images per hog request"),
         seconds: float = typer.Option(15.0, help="each turn's length"),
         rounds: int = typer.Option(2, help="turns per server"),
         repository: Path = typer.Option(REPO / "model_repository", exists=True, file_okay=False),
         baseline_code: Path | None = typer.Option(None, exists=True, file_okay=False, help="another checkout to compare against"),
         setting: list[str] = typer.Option([], help="KEY=VALUE server settings, e.g. max_batch_seconds=0.02")) -> None:
    settings = {"intra_op_threads": 1, "encoder_threads": 2, "models": [model]}
    settings |= {key: value for key, value in (item.split("=", 1) for item in setting)}
    servers = [("baseline", baseline_code)] if baseline_code else []
    for turn in range(rounds):
        for label, code in [*servers, ("this checkout", None)]:
            with launched_server(repository, code=code, **settings) as (_, url):
                result = run_fairness(url, model, hog_images, seconds)
            print(json.dumps({"round": turn + 1, "server": label, **asdict(result)}), flush=True)


if __name__ == "__main__":
    typer.run(main)
