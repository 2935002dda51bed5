"""`ganserve bench-soak --stalled-readers N`: clients that ask for big answers and never read them.

Each of N raw sockets (a 4 KiB receive window), one after another, posts a v2 infer to the StyleGAN
asking for 256 images as JSON (~8.7 MB of text) and reads only its status line. Meanwhile a benign client
generates single images. The figures: how the N were answered (200, or 503 once the memory budget
is taken), the bytes the server held for them (`ganserve_memory_reserved_bytes`) against its
budget and its RSS, the benign client's statuses and latency, and how long until the server
dropped the stalled clients (`GANSERVE_SEND_TIMEOUT_S`) and the budget was whole again.

Answers were once released from the budget when handed to the socket, so unread answers grew the
process past its budget (a hostile probe: RSS 711 → 2,854 MB under 2 GB, 225 clients); the
server now holds them in the budget until they have left the process (service/intake.py).
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import numpy as np

from bench.load import scrape
from bench.server import launched_server
from bench.soak import rss_bytes

ROWS = 256  # the most a request may ask for: an ~8.7 MB JSON answer from the 32x32 RGB StyleGAN (more than the
# kernel's socket buffers take; the DCGAN's 2.6 MB once answers were written by orjson fitted in them, and nothing was held)
MODEL = "stylegan-shapes"


def stalled_request(url: str, model: str, inputs: dict[str, np.ndarray]) -> socket.socket:
    """A v2 infer of `inputs` (binary) asking for the output as JSON, sent on a socket with a 4 KiB
    receive window whose answer is left unread (but for the status line, read by `status_of`)."""
    header = json.dumps({"inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32", "parameters": {"binary_data_size": array.nbytes}}
                                    for name, array in inputs.items()], "parameters": {"binary_data_output": False}}).encode()
    body = header + b"".join(array.astype(np.float32).tobytes() for array in inputs.values())
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v2/models/%s/infer HTTP/1.1\r\nhost: bench\r\ncontent-type: application/octet-stream\r\n"
                 b"inference-header-content-length: %d\r\ncontent-length: %d\r\n\r\n%s" % (model.encode(), len(header), len(body), body))
    return sock


def status_of(sock: socket.socket, timeout_s: float) -> str:
    sock.settimeout(timeout_s)
    try:
        line = sock.recv(12)  # "HTTP/1.1 200": the rest stays in the server's buffers
        return line[9:12].decode() if len(line) >= 12 else "closed"
    except OSError as error:
        return type(error).__name__


def reserved_bytes(url: str) -> float:
    return scrape(url).get("ganserve_memory_reserved_bytes", 0.0)


def run_stalled_readers(repository: Path, readers: int, memory_budget: int, send_timeout_s: float, code: Path | None = None) -> dict:
    """The figures above, from a server of the repository's StyleGAN and DCGAN under `memory_budget`
    (`code`: another checkout's server, as `ganserve bench --baseline-code` takes it)."""
    with launched_server(repository, code=code, log_level="warning", models=["dcgan-digits", MODEL], memory_budget=memory_budget,
                         send_timeout_s=send_timeout_s) as (process, url):
        rss_idle = rss_peak = rss_bytes(process.pid)
        capacity = scrape(url).get("ganserve_memory_budget_bytes", 0.0)
        ws = np.random.default_rng(0).standard_normal((ROWS, 8, 64)).astype(np.float32)
        started = time.monotonic()
        sockets, statuses = [], {}
        for _ in range(readers):  # one after another, each answered before the next asks (a burst at once meets the compute-time reservations instead)
            sockets.append(stalled_request(url, MODEL, {"ws": ws}))
            status = status_of(sockets[-1], timeout_s=60)
            statuses[status] = statuses.get(status, 0) + 1
            rss_peak = max(rss_peak, rss_bytes(process.pid))
        held = reserved_bytes(url)
        benign, latencies = {}, []
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(20):
                t = time.perf_counter()
                status = str(client.post("/v1/models/dcgan-digits/generate", json={"seed": 1}).status_code)
                latencies.append(time.perf_counter() - t)
                benign[status] = benign.get(status, 0) + 1
                rss_peak = max(rss_peak, rss_bytes(process.pid))
        while reserved_bytes(url) > 0 and time.monotonic() - started < send_timeout_s * 4 + 60:
            rss_peak = max(rss_peak, rss_bytes(process.pid))
            time.sleep(0.25)
        whole_after_s = time.monotonic() - started
        for sock in sockets:
            sock.close()
        ms = np.asarray(latencies) * 1000
        return {"readers": readers, "statuses": statuses, "memory_budget_mb": memory_budget / 2**20, "capacity_mb": capacity / 2**20,
                "held_mb": held / 2**20, "rss_idle_mb": rss_idle / 2**20, "rss_peak_mb": rss_peak / 2**20,
                "budget_whole_after_s": whole_after_s, "released": reserved_bytes(url) == 0,
                "benign_statuses": benign, "benign_p50_ms": float(np.percentile(ms, 50)), "benign_max_ms": float(ms.max()),
                "process_alive": process.poll() is None}
