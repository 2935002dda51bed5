"""One child of `ganserve serve --workers N` (started by service/workers.py, not by hand):
`python -m service.worker_process SETTINGS_JSON [--replacement]`.

The engine serves its HTTP (what the fronts forward: jobs, model control) on a Unix socket in
the supervisor's private directory; a front listens on the public port in its SO_REUSEPORT group.
The kernel hands new connections only to sockets that listen, and uvicorn calls `listen` once the
app's start-up is done: the fronts started with the server listen at once (the server answers
/health/live while it loads); a replacement for a front that died (`--replacement`) listens only
once it mirrors the engine's loaded models, so no client of a running server meets it unready.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_the_supervisor(supervisor_pid: int) -> None:
    """Asks the kernel for SIGTERM when the supervisor dies (Linux), and exits at once if it died
    before this process could ask. A child left behind kept serving the port, unsupervised and
    outside the next server's memory budget."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:
        sys.exit(1)


def main(settings_json: str, replacement: bool = False, supervisor_pid: int | None = None) -> None:
    if supervisor_pid is not None:
        stop_with_the_supervisor(supervisor_pid)
    import uvicorn

    from service.app import ENGINE_HTTP, create_app
    from service.http_protocol import guarded_protocol, guarded_websocket_protocol, quiet_client_caused_output
    from service.memory import return_freed_memory_to_the_os
    from service.settings import Settings
    from service.workers import port_socket

    settings = Settings(**json.loads(settings_json))
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s {settings.role} %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a front's forwards to the engine: one INFO line per job poll otherwise
    quiet_client_caused_output()
    return_freed_memory_to_the_os()
    config = uvicorn.Config(create_app(settings, serve_while_loading=not replacement), log_level=settings.log_level,
                            http=guarded_protocol(settings.header_timeout_s, settings.max_connections, settings.send_timeout_s, settings.max_header_bytes),
                            ws=guarded_websocket_protocol(settings.send_timeout_s, settings.max_header_bytes, settings.stream_max_messages_per_s),
                            timeout_keep_alive=settings.keep_alive_s, timeout_graceful_shutdown=int(settings.shutdown_grace_s),
                            ws_max_size=settings.max_body_bytes, ws_per_message_deflate=False, access_log=False,
                            forwarded_allow_ips=settings.forwarded_allow_ips,  # (the engine reads its clients from the fronts' header)
                            **({"uds": str(settings.engine_dir / ENGINE_HTTP)} if settings.role == "engine" else {}))
    server = uvicorn.Server(config)
    if settings.role == "front":
        server.run(sockets=[port_socket(settings.host, settings.port)])
    else:
        if supervisor_pid is not None:
            server.capture_signals = removing_an_orphaned_run_dir(server.capture_signals, supervisor_pid, settings.engine_dir)
        server.run()


def removing_an_orphaned_run_dir(capture_signals, supervisor_pid: int, run_dir) -> Callable:
    """uvicorn's `capture_signals`, after whose serving the engine removes the supervisor's
    directory (sockets, the shared budget table, metrics files) if the supervisor died, which
    would have removed it. Inside it, since on leaving it uvicorn re-raises the signal that
    stopped the server (the process ends there)."""

    @contextlib.contextmanager
    def capture():
        with capture_signals():
            try:
                yield
            finally:
                if os.getppid() != supervisor_pid:
                    shutil.rmtree(run_dir, ignore_errors=True)

    return capture


if __name__ == "__main__":
    options = sys.argv[2:]
    main(sys.argv[1], replacement="--replacement" in options,
         supervisor_pid=int(options[options.index("--supervisor") + 1]) if "--supervisor" in options else None)
