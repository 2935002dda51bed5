"""`ganserve serve --workers N`: one engine process and N HTTP front processes, supervised.

The engine loads the models and forms every batch (one place per device, service/engine.py); the
fronts each listen on the port with SO_REUSEPORT (the kernel spreads new connections evenly over
them: with one shared listening socket, measured here, one front took 99 % of 16 keep-alive
clients), and do what scales over cores: HTTP, validation, admission, encoding. The port is
claimed here first (bound, not listening, and locked for as long as any of this server's processes
lives), so a port in use stops the server before any child starts.
This process only starts, watches and stops them:

- the children run in their own session, so a Ctrl-C at the terminal reaches this process alone,
  which then stops them in order: SIGTERM to the fronts (each finishes the requests it accepted;
  their items are still computed by the engine), then to the engine (it drains), then exits;
- if this process dies without stopping them (`kill -9`, the OOM killer, a runtime that signals
  the main process only), the kernel sends each child SIGTERM (PR_SET_PDEATHSIG,
  service/worker_process.py): they drained and exited instead of serving on, unsupervised, beside
  the server started next on the same port;
- a front that dies is started again (it takes connections only once it mirrors the engine's
  loaded models: service/worker_process.py), and so is one whose event loop has not turned for
  `FRONT_SILENT_S` (killed first: service/heartbeats.py); if the engine dies, or its event loop
  has not turned for `GANSERVE_STUCK_COMPUTE_S` once its models loaded (at least `FRONT_SILENT_S`;
  killed first: it holds every model, so nothing
  short of a new server frees it), the server stops (exit status 1) for a process manager to
  start it again;
- the memory budget is one for the whole server: every child maps the table made here
  (service/memory.py: SharedBudgetTable), and a dead front's reservations are cleared from it;
- so are the upscale streams' slots (service/stream_slots.py: StreamSlotTable): GANSERVE_MAX_STREAMS
  and a client's half of it are the server's, and a dead front's streams are freed;
- PROMETHEUS_MULTIPROC_DIR is a fresh directory set before the children import prometheus-client,
  and a dead child's live gauges are dropped from it.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.heartbeats import FRONT_SILENT_S, HEARTBEATS_FILE, HeartbeatTable, engine_silent_limit_s
from service.memory import SHARED_BUDGET_FILE, SharedBudgetTable
from service.stream_slots import STREAM_SLOTS_FILE, StreamSlotTable, stream_limit
from service.settings import Settings

log = logging.getLogger("ganserve.workers")
POLL_S = 0.2


def child_command(role: str, settings: Settings, slot: int, replacement: bool = False) -> list[str]:
    overrides = json.loads(settings.model_dump_json())
    overrides["role"], overrides["worker_slot"] = role, slot
    return ([sys.executable, "-m", "service.worker_process", json.dumps(overrides), "--supervisor", str(os.getpid())]
            + (["--replacement"] if replacement else []))


def refuse_port_in_use(host: str, port: int) -> None:
    """OSError (EADDRINUSE) when anything listens on (host, port), another `--workers` server's
    fronts included: the claim below joins the port's SO_REUSEPORT group, which a second server
    would join too, and the kernel then split the connections between two servers that serve
    different models under two memory budgets. A plain listening socket (SO_REUSEADDR, as any
    server binds, so a port left in TIME_WAIT is free) is refused wherever another one listens."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        probe.listen(1)


def port_lock(host: str, port: int) -> socket.socket | None:
    """A socket bound to an abstract Unix name made of (host, port), or OSError (EADDRINUSE) when
    another `--workers` server holds it. Between this server's claim and its fronts' listening
    (seconds: they import torch first) nothing listens on the port, so `refuse_port_in_use` let a
    second server through, and the two split the port's connections. The children inherit it, so
    the name stays taken until the last of them has exited (after a `kill -9` of this process they
    drain first); the kernel frees it with them, and it leaves no file behind. Linux only (as is
    SO_REUSEPORT's spreading of connections): elsewhere there is no lock."""
    if port == 0 or not sys.platform.startswith("linux"):
        return None
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0ganserve-workers-port {port} {host[:64]}")  # (an abstract name holds at most 107 bytes)
    except OSError as error:
        lock.close()
        if error.errno == errno.EADDRINUSE:
            raise OSError(errno.EADDRINUSE, f"port {port} is in use by another `ganserve serve --workers` server (starting or serving)") from None
        raise
    return lock


def port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) in the port's SO_REUSEPORT group, not listening: the
    supervisor's claim (it never listens, so it takes no connections) or a front's, which uvicorn
    makes listen once the front's app has started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.lock = port_lock(settings.host, settings.port)
        try:
            refuse_port_in_use(settings.host, settings.port)
            self.claim = port_socket(settings.host, settings.port)
        except OSError:
            if self.lock is not None:
                self.lock.close()
            raise
        self.run_dir = Path(tempfile.mkdtemp(prefix="ganserve-"))  # 0700: only this user reaches the sockets
        metrics_dir = self.run_dir / "metrics"
        metrics_dir.mkdir()
        self.settings = settings.model_copy(update={"engine_dir": self.run_dir, "port": self.claim.getsockname()[1]})
        self.budget = SharedBudgetTable.create(self.run_dir / SHARED_BUDGET_FILE, slots=settings.workers + 1)
        self.heartbeats = HeartbeatTable.create(self.run_dir / HEARTBEATS_FILE, slots=settings.workers + 1)
        self.streams = StreamSlotTable.create(self.run_dir / STREAM_SLOTS_FILE, slots=stream_limit(settings.max_streams, settings.max_connections))
        self.env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        self.engine: subprocess.Popen | None = None
        self.fronts: list[subprocess.Popen] = []
        self.stopping = False
        self.stopped_by: int | None = None  # the signal that asked for the stop

    def spawn(self, role: str, slot: int, replacement: bool = False) -> subprocess.Popen:
        return subprocess.Popen(child_command(role, self.settings, slot, replacement), env=self.env, start_new_session=True,
                                pass_fds=() if self.lock is None else (self.lock.fileno(),))

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        log.info("serving on %s:%d with %d front processes and one engine", self.settings.host, self.settings.port, self.settings.workers)
        self.engine = self.spawn("engine", slot=0)
        self.fronts = [self.spawn("front", slot=i + 1) for i in range(self.settings.workers)]
        status = 0
        try:
            while not self.stopping:
                time.sleep(POLL_S)
                if self.engine.poll() is not None:
                    log.error("the engine process exited (status %s): stopping", self.engine.returncode)
                    status = 1
                    break
                if (silent := self.heartbeats.silent_s(slot=0)) > engine_silent_limit_s(self.settings.stuck_after_s):
                    # hung (stopped, a native deadlock): it holds every model, and the fronts answer 503 for as
                    # long as it hangs; stopping (status 1) lets a process manager start the server again
                    log.error("the engine process has not answered for %.0f s (GANSERVE_STUCK_COMPUTE_S): killing it and stopping", silent)
                    self.engine.kill()
                    self.engine.wait()
                    status = 1
                    break
                for i, front in enumerate(self.fronts):
                    if self.stopping:
                        break
                    if front.poll() is not None:
                        log.error("front process %d exited (status %s): starting another", front.pid, front.returncode)
                        self.forget(front.pid)
                        self.budget.clear(slot=i + 1)  # what it had reserved died with it
                        self.heartbeats.clear(slot=i + 1)
                        self.streams.clear(process=i + 1)  # its streams' connections died with it
                        self.fronts[i] = self.spawn("front", slot=i + 1, replacement=True)
                    elif (silent := self.heartbeats.silent_s(slot=i + 1)) > FRONT_SILENT_S:
                        # hung (stopped, deadlocked): the kernel still hands it new connections; replaced at the next look
                        log.error("front process %d has not answered for %.0f s: killing it", front.pid, silent)
                        front.kill()
        finally:
            self.stop()
        return status

    def request_stop(self, signum: int, frame) -> None:
        self.stopping = True
        self.stopped_by = signum

    def stop(self) -> None:
        """Fronts first (they answer what they accepted, which needs the engine), then the engine."""
        grace = self.settings.shutdown_grace_s + 10
        self.terminate(self.fronts, grace)
        self.claim.close()
        if self.engine is not None:
            self.terminate([self.engine], grace)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.lock is not None:
            self.lock.close()

    def terminate(self, processes: list[subprocess.Popen], grace_s: float) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.error("process %d did not stop within %.0f s: killing it", process.pid, grace_s)
                process.kill()
                process.wait()
            self.forget(process.pid)

    def forget(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.run_dir / "metrics"))


def serve_workers(settings: Settings) -> int:
    """The server's exit status. A clean stop on SIGTERM ends by SIGTERM itself (status 143 in a
    shell), as the one-process server does (uvicorn raises the signal again once it has shut
    down), so a process manager reads the same stop from either mode; it exited 0 here."""
    supervisor = Supervisor(settings)
    status = supervisor.run()
    if status == 0 and supervisor.stopped_by == signal.SIGTERM:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
    return status
