"""`ganserve bench-soak --connection-hogs N`: one client holding N silent sockets, re-opened as fast
as the server closes them, beside a benign client — from the benign client's own address (behind
NAT or a proxy every client has one) and from another.

The hog's sockets send nothing; the benign client posts one DCGAN generate every 50 ms on a fresh
connection, from 127.0.0.1. At the connection cap (`max_connections`, well under N) the server
closes a waiting connection for each newcomer or refuses the newcomer with 503
(service/connection_table.py); the figures are what the benign client got (statuses, p50/p99),
how fast the hog re-opened, and the server's RSS. A hog on the benign client's own address got
92–96 % of its requests 503 before a newcomer could take its own address's longest-waiting place.
"""
from __future__ import annotations

import selectors
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.server import launched_server
from bench.soak import rss_bytes

BENIGN_EVERY_S = 0.05


class Hog(threading.Thread):
    """Keeps `sockets` silent connections from `source` open, re-opening each one the server closes."""

    def __init__(self, url: str, sockets: int, source: str, seconds: float) -> None:
        super().__init__(daemon=True)
        host, port = url.removeprefix("http://").split(":")
        self.target, self.source, self.sockets, self.seconds = (host, int(port)), source, sockets, seconds
        self.opened = self.refused_503 = self.open_errors = 0

    def open_one(self, selector: selectors.BaseSelector) -> None:
        try:
            sock = socket.create_connection(self.target, timeout=2, source_address=(self.source, 0))
        except OSError:
            self.open_errors += 1
            return
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def run(self) -> None:
        with selectors.DefaultSelector() as selector:
            for _ in range(self.sockets):
                self.open_one(selector)
            stop = time.monotonic() + self.seconds
            while time.monotonic() < stop:
                for key, _ in selector.select(timeout=0.2):
                    sock = key.fileobj
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    self.refused_503 += data.startswith(b"HTTP/1.1 503")
                    selector.unregister(sock)
                    sock.close()  # closed by the server (or about to be, after its 503): open another
                    self.open_one(selector)
            for key in list(selector.get_map().values()):
                key.fileobj.close()


def benign_client(url: str, seconds: float) -> dict:
    """One generate every BENIGN_EVERY_S on a fresh connection: statuses and latency."""
    statuses: dict[str, int] = {}
    latencies = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        started = time.perf_counter()
        try:
            status = str(httpx.post(f"{url}/v1/models/dcgan-digits/generate", json={"seed": len(latencies)}, timeout=10).status_code)
        except httpx.HTTPError as error:
            status = type(error).__name__
        latencies.append(time.perf_counter() - started)
        statuses[status] = statuses.get(status, 0) + 1
        time.sleep(max(0.0, BENIGN_EVERY_S - (time.perf_counter() - started)))
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "statuses": statuses, "served": statuses.get("200", 0) / max(1, len(latencies)),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def run_connection_hogs(repository: Path, sockets: int, seconds: float, max_connections: int = 512, code: Path | None = None) -> dict:
    """The figures above for a hog on the benign client's address and on another, on a server of
    the repository's DCGAN alone (`code`: another checkout's server, as `ganserve bench --baseline-code`)."""
    phases = {}
    with launched_server(repository, code=code, log_level="warning", models=["dcgan-digits"], max_connections=max_connections) as (process, url):
        for phase, source in (("same_address", "127.0.0.1"), ("other_address", "127.0.0.2")):
            hog = Hog(url, sockets, source, seconds)
            rss_peak = rss_bytes(process.pid)
            hog.start()
            time.sleep(0.5)  # the hog at the cap first
            benign = benign_client(url, seconds - 1.0)
            rss_peak = max(rss_peak, rss_bytes(process.pid))
            hog.join(seconds + 10)
            phases[phase] = {"benign": benign, "hog_connects_per_s": hog.opened / seconds, "hog_refused_503": hog.refused_503,
                             "hog_open_errors": hog.open_errors, "rss_peak_mb": rss_peak / 2**20}
            time.sleep(1.0)  # the hog's last sockets closed before the next phase
        alive = process.poll() is None
    return {"sockets": sockets, "seconds": seconds, "max_connections": max_connections, "phases": phases, "process_alive": alive}
