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

import json
import logging
import sys


def main(settings_json: str, replacement: bool = False) -> None:
    import uvicorn

    from service.app import ENGINE_HTTP, create_app
    from service.http_protocol import guarded_protocol, guarded_websocket_protocol
    from service.memory import return_freed_memory_to_the_os
    from service.settings import Settings
    from service.workers import port_socket

    settings = Settings(**json.loads(settings_json))
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s {settings.role} %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a front's forwards to the engine: one INFO line per job poll otherwise
    return_freed_memory_to_the_os()
    config = uvicorn.Config(create_app(settings, serve_while_loading=not replacement), log_level=settings.log_level,
                            http=guarded_protocol(settings.header_timeout_s, settings.max_connections, settings.send_timeout_s, settings.max_header_bytes),
                            ws=guarded_websocket_protocol(settings.send_timeout_s),
                            timeout_keep_alive=settings.keep_alive_s, timeout_graceful_shutdown=int(settings.shutdown_grace_s),
                            ws_max_size=settings.max_body_bytes, access_log=False,
                            **({"uds": str(settings.engine_dir / ENGINE_HTTP)} if settings.role == "engine" else {}))
    server = uvicorn.Server(config)
    if settings.role == "front":
        server.run(sockets=[port_socket(settings.host, settings.port)])
    else:
        server.run()


if __name__ == "__main__":
    main(sys.argv[1], replacement="--replacement" in sys.argv[2:])
