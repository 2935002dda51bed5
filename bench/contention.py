"""`ganserve bench-contention`: how honest admission is when several models compute at once on
the same cores (service/admission.py, "The lanes beside it").

Each server (this checkout, and `--baseline-code` beside it, in turns) serves an upscaler, a
translator and DCGAN with its runtimes on every core (the default) and a short deadline, so that
heavy requests fill it. Two scenarios:

- **bursts**: `k` upscales and `k` translates posted at once, `bursts` times. Each lane alone
  could finish some of them in time; beside each other they run at about half speed.
- **steady**: two clients loop upscales and two loop translates for `seconds`, each obeying
  `Retry-After` when refused, while a benign client asks DCGAN for one image every 200 ms.
- **streams**: `streams` clients stream small translates (128², each one too slight a push on a
  booked upscale to be refused for it) back to back for `seconds`, each obeying `Retry-After`,
  and one client sends upscales one at a time, `upscale_side`² and 1.4 times that in turns
  (about 1 and 2 s alone at 160²), half a second after each answer whatever it was (the
  scenario counts what admission does with each one; a 30 s `Retry-After` would leave one or two
  in the run). The streams leave almost nothing queued at any moment, yet their lane computes
  all along: counted at its backlog alone, an upscale admitted within its deadline ran about
  twice its estimate beside them and got 504. Per answered upscale, its compute over what
  admission counted for it (`Server-Timing` `estimate` plus `beside`).

With `--other-processes N`, N busy loops (each in its own session, like another tenant's) spin
from after the first runs to the end: load the lanes cannot see, which admission reads off the
kernel's counters (service/host_load.py), and which the code before took for idle cores.

What counts: how many admitted requests still missed their deadline (504 after waiting it out,
where a 503 at once was the honest answer), how often a client that waited out a `Retry-After`
was refused again, the latency of what was answered, and the benign client's.
"""
from __future__ import annotations

import io
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from bench.limits import busy_loops
from bench.runner import machine, write_report
from bench.server import launched_server

UPSCALE, TRANSLATE, BENIGN = "sr-rrdb-x4/upscale", "cyclegan-thin2thick/translate", "dcgan-digits/generate"


def noise_png(side: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(((np.random.default_rng(seed).random((side, side)) > 0.5) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


REASONS = (("beside the streams", "other models' streams"), ("miss their deadlines", "would push an admitted request past its deadline"), ("is promised to another model", "room promised to another model"),
           ("slower than measured", "slower than measured lately"), ("other processes want ", "other processes"),
           ("work queued", "work queued"), ("memory budget", "memory budget"), ("encod", "encoding backlog"))


def reason(message: str) -> str:
    """A 503's message, by what refused it (service/admission.py)."""
    return next((name for words, name in REASONS if words in message), "other")


class Record:
    """Every answer of one server's run: (scenario, route, status, seconds, Retry-After, refused
    before), and each 503's reason."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, int, float, int | None, bool]] = []
        self.reasons: Counter = Counter()  # (scenario, route, reason)
        self.lock = threading.Lock()

    def post(self, client: httpx.Client, scenario: str, route: str, refused_before: bool = False, **request) -> httpx.Response:
        started = time.perf_counter()
        answer = client.post(f"/v1/models/{route}", **request)
        retry = answer.headers.get("retry-after")
        with self.lock:
            self.rows.append((scenario, route, answer.status_code, time.perf_counter() - started, int(retry) if retry else None, refused_before))
            if answer.status_code == 503:
                self.reasons[scenario, route, reason(answer.text)] += 1
        return answer


def image_request(route: str, upscale_side: int, translate_side: int, seed: int) -> dict:
    side = upscale_side if route == UPSCALE else translate_side
    return {"content": noise_png(side, seed), "headers": {"content-type": "image/png"}}


def run_bursts(url: str, record: Record, bursts: int, k: int, upscale_side: int, translate_side: int) -> None:
    def one(job: tuple[str, int]) -> None:
        route, seed = job
        with httpx.Client(base_url=url, timeout=120) as client:
            record.post(client, "bursts", route, **image_request(route, upscale_side, translate_side, seed))

    for burst in range(bursts):
        jobs = [(route, burst * 100 + i) for i in range(k) for route in (UPSCALE, TRANSLATE)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            list(pool.map(one, jobs))
        time.sleep(1.5)


def run_steady(url: str, record: Record, seconds: float, upscale_side: int, translate_side: int) -> None:
    stop = time.monotonic() + seconds

    def heavy(route: str, seed: int) -> None:
        body = image_request(route, upscale_side, translate_side, seed)
        refused = False
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop:
                answer = record.post(client, "steady", route, refused, **body)
                refused = answer.status_code == 503
                if refused and time.monotonic() < stop:
                    time.sleep(float(answer.headers.get("retry-after", "1")))

    def benign() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop:
                record.post(client, "steady", BENIGN, json={"seed": 7})
                time.sleep(0.2)

    threads = [threading.Thread(target=heavy, args=(route, seed)) for seed, route in enumerate((UPSCALE, UPSCALE, TRANSLATE, TRANSLATE))]
    threads.append(threading.Thread(target=benign))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


STREAM_SIDE = 128


def stage_s(answer: httpx.Response, stage: str) -> float:
    """One `Server-Timing` stage in seconds (0 where the server did not report it)."""
    for part in answer.headers.get("server-timing", "").split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name == stage:
            return float(duration) / 1000
    return 0.0


def run_streams(url: str, record: Record, seconds: float, upscale_side: int, streams: int) -> list[float]:
    """The streams scenario; returns each answered upscale's compute over what admission counted."""
    stop = time.monotonic() + seconds
    ratios: list[float] = []

    def stream(seed: int) -> None:
        body = {"content": noise_png(STREAM_SIDE, seed), "headers": {"content-type": "image/png"}}
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop:
                answer = record.post(client, "streams", TRANSLATE, **body)
                if answer.status_code == 503:
                    time.sleep(float(answer.headers.get("retry-after", "1")))

    def heavy() -> None:
        sides = (upscale_side, round(upscale_side * 1.4))
        turn = 0
        with httpx.Client(base_url=url, timeout=120) as client:
            time.sleep(min(5.0, seconds / 4))  # the streams' demand shows within the lanes' window
            while time.monotonic() < stop:
                side = sides[turn % 2]
                answer = record.post(client, "streams", UPSCALE, **image_request(UPSCALE, side, STREAM_SIDE, turn))
                if answer.status_code == 200:
                    ratios.append(round(stage_s(answer, "compute") / (stage_s(answer, "estimate") + stage_s(answer, "beside")), 3))
                turn += 1
                time.sleep(0.5)

    threads = [threading.Thread(target=stream, args=(seed,)) for seed in range(streams)] + [threading.Thread(target=heavy)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ratios


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[int(q * (len(ordered) - 1))], 3) if ordered else None


def summary(record: Record, scenario: str, route: str) -> dict:
    rows = [row for row in record.rows if row[0] == scenario and row[1] == route]
    statuses = Counter(status for _, _, status, _, _, _ in rows)
    admitted = statuses[200] + statuses[504]
    answered = [seconds for _, _, status, seconds, _, _ in rows if status == 200]
    retried = [status for _, _, status, _, _, before in rows if before]
    return {"statuses": dict(sorted(statuses.items())),
            "admitted_past_deadline": round(statuses[504] / admitted, 3) if admitted else None,
            "answered_p50_s": round(statistics.median(answered), 3) if answered else None, "answered_p99_s": percentile(answered, 0.99),
            "refused_again_after_retry_after": round(retried.count(503) / len(retried), 3) if retried else None,
            "slowest_refusal_s": max((seconds for _, _, status, seconds, _, _ in rows if status == 503), default=None),
            "refused_because": {why: count for (where, what, why), count in sorted(record.reasons.items()) if (where, what) == (scenario, route)}}


def run_contention_bench(repository: Path, baseline_code: Path | None, rounds: int, bursts: int, k: int, seconds: float,
                         timeout_s: float, upscale_side: int, translate_side: int, out: Path | None, other_processes: int = 0,
                         streams: int = 4) -> dict:
    codes = [("baseline", baseline_code)] if baseline_code else []
    codes.append(("this checkout", None))
    results: dict[str, list[dict]] = {label: [] for label, _ in codes}
    for _ in range(rounds):
        for label, code in codes:
            record = Record()
            with launched_server(repository, code=code, request_timeout_s=timeout_s, models=["sr-rrdb-x4", "cyclegan-thin2thick", "dcgan-digits"]) as (_, url):
                with httpx.Client(base_url=url, timeout=120) as client:  # first runs paid before anything is counted
                    for route in (UPSCALE, TRANSLATE):
                        client.post(f"/v1/models/{route}", **image_request(route, upscale_side, translate_side, 0))
                with busy_loops(other_processes):
                    time.sleep(1.0)
                    run_bursts(url, record, bursts, k, upscale_side, translate_side)
                    time.sleep(2.0)
                    run_steady(url, record, seconds, upscale_side, translate_side)
                    time.sleep(2.0)
                    ratios = run_streams(url, record, seconds, upscale_side, streams) if streams else []
            cases = {f"{scenario}/{route.split('/')[0]}": summary(record, scenario, route)
                     for scenario, routes in (("bursts", (UPSCALE, TRANSLATE)), ("steady", (UPSCALE, TRANSLATE, BENIGN)), ("streams", (UPSCALE, TRANSLATE)))
                     for route in routes if scenario != "streams" or streams}
            if streams:
                cases["streams/sr-rrdb-x4"]["compute_over_counted"] = ratios
            results[label].append(cases)
    report = {"machine": machine(), "timeout_s": timeout_s, "other_processes": other_processes, "bursts": bursts, "k": k, "steady_seconds": seconds, "streams": streams,
              "upscale_side": upscale_side, "translate_side": translate_side, "results": results}
    beside = f", {other_processes} busy loops beside" if other_processes else ""
    table = Table(title=f"contention: deadline {timeout_s:g} s, {k}+{k} at once x {bursts}, then {seconds:g} s steady{beside}")
    for column in ("server", "round", "case", "statuses", "admitted past deadline", "answered p50 / p99 s", "refused again after Retry-After"):
        table.add_column(column)
    for label, runs in results.items():
        for turn, cases in enumerate(runs, 1):
            for case, figures in cases.items():
                table.add_row(label, str(turn), case, str(figures["statuses"]), str(figures["admitted_past_deadline"]),
                              f"{figures['answered_p50_s']} / {figures['answered_p99_s']}", str(figures["refused_again_after_retry_after"]))
    Console().print(table)
    for label, runs in results.items():
        for turn, cases in enumerate(runs, 1):
            if "streams/sr-rrdb-x4" in cases:
                print(f"{label}, round {turn}: streams' upscales, compute over what admission counted:", cases["streams/sr-rrdb-x4"]["compute_over_counted"])
    write_report(report, out)
    return report
