"""`ganserve bench-claims`: who gets the memory budget's room when it is short, this code against
another checkout (`--baseline-code`), servers in turns.

The memory budget is set to what the server holds resident plus `room` bytes, so a few translates
at a time fill what requests may hold. Every client sends cyclegan translates of smooth images
from its own loopback address and obeys `Retry-After`; sizes are fractions of the side the
server lists (`max_input_side`), so both codes are loaded alike:

- four benign clients, half the side each (a quarter of the room), one request after another;
- a large client (`victim`), 0.9 of the side: the request a memory refusal once starved;
- in `squat_one` and `squat_rot`, an attacker that sends a large request every 0.25 s and never
  comes back for one refused (from one address, or 31 in turn); in `renew`, one that comes back
  every 0.3 s, sooner than told, with a request a little larger; in `crowd`, a second large
  client as obedient as the victim but with two connections (counted as `attacker`): one of its
  connections took the claim while the other, refused, claimed the room again at once, and the
  victim's refusals made none (a hostile probe: 43 answers against 1).

Per scenario and code: requests answered a minute and refusals by reason (memory, or room promised
to another: service/memory.py `MemoryClaim`), the victim's longest run of refusals, and how full
the room was on average (`ganserve_memory_reserved_bytes` over what requests may hold, each second).
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.load import scrape
from bench.runner import machine, write_report
from bench.server import launched_server
from bench.soak import smooth_png

SCENARIOS = ("starve", "squat_one", "squat_rot", "renew", "crowd")
MODEL = "cyclegan-thin2thick"
ATTACKER_ADDRESSES = [f"127.0.0.{k}" for k in range(10, 41)]


class Tally:
    """Answers per role, counted by status and reason; the victim's runs of refusals."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, Counter] = {role: Counter() for role in ("benign", "victim", "attacker")}
        self.victim_runs: list[int] = []

    def add(self, role: str, answer: httpx.Response | None) -> None:
        if answer is None:
            key = "error"
        elif answer.status_code == 503:
            key = "503 promised" if "promised" in answer.text else "503 memory" if "memory budget" in answer.text else "503 other"
        else:
            key = str(answer.status_code)
        with self.lock:
            self.counts[role][key] += 1


def post(client: httpx.Client, body: bytes) -> httpx.Response | None:
    try:
        return client.post(f"/v1/models/{MODEL}/translate", params={"format": "jpeg"}, content=body, headers={"content-type": "image/png"})
    except httpx.HTTPError:
        return None


def retry_after(answer: httpx.Response | None) -> float:
    return float(answer.headers.get("retry-after", 1)) if answer is not None else 1.0


def client_at(url: str, address: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, transport=httpx.HTTPTransport(local_address=address))


def obedient(url: str, address: str, body: bytes, role: str, tally: Tally, stop: threading.Event) -> None:
    """One request after another, waiting out every Retry-After."""
    refused = 0
    with client_at(url, address) as client:
        while not stop.is_set():
            answer = post(client, body)
            tally.add(role, answer)
            if answer is not None and answer.status_code == 503:
                refused += 1
                stop.wait(retry_after(answer))
            else:
                if role == "victim":
                    tally.victim_runs.append(refused)
                refused = 0
    if role == "victim":
        tally.victim_runs.append(refused)


def attacker(url: str, addresses: list[str], body: bytes, period_s: float, tally: Tally, stop: threading.Event,
             early_body: bytes | None = None) -> None:
    """A large request every `period_s`; with `early_body`, a refused one is sent again every
    `period_s` (sooner than told) until answered otherwise."""
    clients = {address: client_at(url, address) for address in addresses}
    try:
        turn = 0
        while not stop.is_set():
            client = clients[addresses[turn % len(addresses)]]
            turn += 1
            answer = post(client, body)
            tally.add("attacker", answer)
            while early_body is not None and answer is not None and answer.status_code == 503 and not stop.wait(period_s):
                answer = post(client, early_body)
                tally.add("attacker", answer)
            stop.wait(period_s)
    finally:
        for client in clients.values():
            client.close()


def run_scenario(repository: Path, code: Path | None, scenario: str, duration_s: float, room: int, resident: int) -> dict:
    with launched_server(repository, code=code, models=[MODEL], memory_budget=resident + room, intra_op_threads=1,
                         request_timeout_s=30) as (_, url):
        side = httpx.get(f"{url}/v1/models/{MODEL}", timeout=30).json()["versions"][-1]["limits"]["max_input_side"]
        capacity = scrape(url)["ganserve_memory_budget_bytes"]
        small, large, larger = smooth_png(side // 2), smooth_png(int(0.9 * side)), smooth_png(int(0.97 * side))
        tally, stop = Tally(), threading.Event()
        threads = [threading.Thread(target=obedient, args=(url, f"127.0.0.{2 + k}", small, "benign", tally, stop)) for k in range(4)]
        threads.append(threading.Thread(target=obedient, args=(url, "127.0.0.6", large, "victim", tally, stop)))
        if scenario in ("squat_one", "squat_rot"):
            addresses = ATTACKER_ADDRESSES[:1] if scenario == "squat_one" else ATTACKER_ADDRESSES
            threads.append(threading.Thread(target=attacker, args=(url, addresses, large, 0.25, tally, stop)))
        elif scenario == "renew":
            threads.append(threading.Thread(target=attacker, args=(url, ATTACKER_ADDRESSES[:1], large, 0.3, tally, stop, larger)))
        elif scenario == "crowd":
            threads += [threading.Thread(target=obedient, args=(url, ATTACKER_ADDRESSES[0], large, "attacker", tally, stop)) for _ in range(2)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        fullness = []
        while time.monotonic() - started < duration_s:
            time.sleep(1.0)
            fullness.append(scrape(url).get("ganserve_memory_reserved_bytes", 0.0) / max(capacity, 1.0))
        stop.set()
        for thread in threads:
            thread.join(timeout=150)
        elapsed = time.monotonic() - started
    per_minute = {role: round(60 * counts["200"] / elapsed, 1) for role, counts in tally.counts.items()}
    return {"side": side, "room_mib": round(capacity / 2**20), "answered_per_min": per_minute,
            "statuses": {role: dict(counts) for role, counts in tally.counts.items() if counts},
            "victim_longest_refusals": max(tally.victim_runs, default=0), "room_used": round(statistics.mean(fullness), 2) if fullness else None}


def resident_bytes(repository: Path, code: Path | None) -> int:
    """What the server holds with the model loaded (every process's), read off a generous budget."""
    budget = 8 * 2**30
    with launched_server(repository, code=code, models=[MODEL], memory_budget=budget, intra_op_threads=1) as (_, url):
        return int(budget - scrape(url)["ganserve_memory_budget_bytes"])


def run_claims_bench(repository: Path, baseline_code: Path | None, scenarios: list[str], duration_s: float, room: int,
                     out: Path | None) -> dict:
    codes: dict[str, Path | None] = {"this code": None, **({"baseline": baseline_code} if baseline_code else {})}
    residents = {label: resident_bytes(repository, code) for label, code in codes.items()}
    rows = []
    for scenario in scenarios:
        for label, code in codes.items():  # in turns, scenario by scenario
            rows.append({"scenario": scenario, "code": label, **run_scenario(repository, code, scenario, duration_s, room, residents[label])})
    report = {"machine": machine(), "model": MODEL, "duration_s": duration_s, "room_mib": room // 2**20,
              "baseline_code": str(baseline_code) if baseline_code else None, "rows": rows}
    table = Table(title=f"who gets the memory budget's room, {duration_s:.0f} s a scenario, {room // 2**20} MiB for requests — {report['machine']}")
    for column in ("scenario", "code", "benign /min", "victim /min (longest refusals)", "attacker /min", "room used", "refusals: memory / promised"):
        table.add_column(column)
    for row in rows:
        refusals = Counter()
        for counts in row["statuses"].values():
            refusals.update(counts)
        table.add_row(row["scenario"], row["code"], f"{row['answered_per_min']['benign']:.0f}",
                      f"{row['answered_per_min']['victim']:.0f} ({row['victim_longest_refusals']})", f"{row['answered_per_min']['attacker']:.0f}",
                      f"{row['room_used']:.2f}", f"{refusals['503 memory']} / {refusals['503 promised']}")
    Console(width=200).print(table)
    if out is not None:
        write_report(report, out)
    return report
