"""Starting the real server as a subprocess (`ganserve serve` on a free port, as users start it),
for the benchmarks and the tests alike."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def stat_fields(path: Path) -> list[str]:
    """A /proc stat file's fields after the command name (state, ppid, …, utime at 11, stime at 12)."""
    return path.read_text().rsplit(")", 1)[1].split()


def cpu_s(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_family(pid: int) -> dict[int, list[str]]:
    """pid → its stat fields (`stat_fields`) for `pid` and its live children: a `serve --workers N`
    server is a supervisor, an engine and N fronts, so its CPU and its roles are read from the
    whole family (Linux only)."""
    family = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_fields(stat)
        except (OSError, IndexError):
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            family[int(stat.parent.name)] = fields
    return family


def process_roles(pid: int, family: dict[int, list[str]] | None = None) -> dict[int, str]:
    """pid → role of each process of a server (of `family`, when the caller has read it): "server"
    for a single process; "supervisor", "engine" and "front" for `serve --workers N` (read from the
    children's command lines)."""
    roles = {}
    for process in family if family is not None else process_family(pid):
        try:
            command = Path(f"/proc/{process}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if process != pid and "service.worker_process" in command:
            roles[process] = "front" if '"role": "front"' in command else "engine"
    return roles | {pid: "supervisor" if roles else "server"}


def cpu_seconds_by_part(pid: int) -> dict[str, float]:
    """User + system CPU seconds of each part of a running server (Linux /proc): every process's
    main thread, which runs its event loop, apart from its other threads (lanes, runtime and
    encoder pools; exited ones included), by role — "event loop" / "other threads" for one process,
    "engine event loop", "front event loops", … for `--workers N`. It says which part a faster host
    must scale: one engine loop forms every batch, the fronts add up over cores."""
    family = process_family(pid)
    parts: dict[str, float] = {}
    for process, role in process_roles(pid, family).items():
        try:
            whole_s, main_s = cpu_s(family[process]), cpu_s(stat_fields(Path(f"/proc/{process}/task/{process}/stat")))
        except (OSError, IndexError, KeyError):
            continue  # exited between the listing and the read
        if role == "supervisor":
            parts["supervisor"] = parts.get("supervisor", 0.0) + whole_s
            continue
        prefix = "" if role == "server" else f"{role} "
        loop, others = f"{prefix}event loop" + ("s" if role == "front" else ""), f"{prefix}other threads"
        parts[loop] = parts.get(loop, 0.0) + main_s
        parts[others] = parts.get(others, 0.0) + max(whole_s - main_s, 0.0)
    return parts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def never_ready(readiness: dict) -> list[str]:
    """The failed models of a 503 readiness answer once nothing is loading any more, and the
    models it was told to serve that its repository lacks: the server
    will not become ready without an operator (where its rule had been met, it would say 200)."""
    states = readiness.get("models") or {}
    if any(state == "loading" for state in states.values()) or not (states or readiness.get("missing")):
        return []
    return [f"{model} failed to load" for model, state in states.items() if state == "failed"] + [f"{name} is not served" for name in readiness.get("missing", [])]


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until /health/ready answers 200; the server's own log tail in the error when it dies, or
    at once when a model it requires failed to load (a benchmark on a lent GPU must not wait out
    the timeout for a server that cannot become ready)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1) as client:  # one client: `httpx.get` builds an SSL context per call, ~18 ms of CPU
        # here, so polling every 50 ms kept 0.3 of a core busy beside the warm-up it waited for, and timed it ~1.2x slow
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                answer = client.get(f"{url}/health/ready")
                if answer.status_code == 200:
                    return
                if failed := never_ready(answer.json()):
                    raise RuntimeError(f"server cannot become ready: {', '.join(failed)}: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
    raise TimeoutError(f"server never became ready in {timeout:.0f} s")


@contextlib.contextmanager
def launched_process(command: list[str], port: int, env: dict[str, str] | None = None, wait: bool = True,
                     ready_timeout_s: float = 120, cwd: Path = REPO) -> Iterator[tuple[subprocess.Popen, str]]:
    """Yields (process, base URL) of an HTTP server `command` starts in `cwd` on `port`. Its stderr
    goes to a temporary file (a pipe nobody reads would block a chatty server); stopped with SIGTERM
    (a graceful drain) at exit."""
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "server.log"
        with open(log, "wb") as stderr:
            process = subprocess.Popen(command, cwd=cwd, env=env or dict(os.environ), stdout=subprocess.DEVNULL, stderr=stderr)
        process.log_path = log  # type: ignore[attr-defined]  # what the server wrote to stderr, while it runs
        url = f"http://127.0.0.1:{port}"
        try:
            if wait:
                wait_ready(url, process, log, ready_timeout_s)
            yield process, url
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()


@contextlib.contextmanager
def launched_naive(repository: Path, model: str, threads: int) -> Iterator[tuple[subprocess.Popen, str]]:
    """The naive baseline (bench/naive.py) on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "bench.naive", "--repository", str(repository), "--model", model, "--port", str(port), "--threads", str(threads)]
    with launched_process(command, port) as launched:
        yield launched


@contextlib.contextmanager
def launched_server(repository: Path, wait: bool = True, code: Path | None = None, **settings) -> Iterator[tuple[subprocess.Popen, str]]:
    """`ganserve serve` as users start it; `settings` become GANSERVE_* variables. It has longer to
    become ready where warm-up compiles (`graph_capture compile` on a CPU: 10-20 s a batch size here).

    `code`: another checkout of ganserve to serve from instead of this one (say `git worktree add
    /tmp/base HEAD~1`), run with this environment's packages: `ganserve bench --baseline-code`."""
    ready_timeout_s = 900 if settings.get("graph_capture") == "compile" else 120
    port = free_port()
    env = {**os.environ, **{f"GANSERVE_{k.upper()}": json.dumps(v) if isinstance(v, list) else str(v) for k, v in settings.items()}}
    if code is not None:  # its packages first on the path (`-m` puts the working directory there too)
        env["PYTHONPATH"] = os.pathsep.join([str(code.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "ganserve_cli", "serve", "--repository", str(repository.resolve()), "--host", "127.0.0.1", "--port", str(port)]
    with launched_process(command, port, env, wait, ready_timeout_s, cwd=(code or REPO).resolve()) as launched:
        yield launched
