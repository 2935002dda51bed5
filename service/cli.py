"""The service-side verb of `ganserve`: serve."""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import typer


# GANSERVE_* variables read by something other than `Settings`
OTHER_VARIABLES = {"GANSERVE_RAY_BODY_BUDGET_BYTES"}


def unknown_settings(environment: Mapping[str, str]) -> list[str]:
    """A line for each GANSERVE_* variable that is no setting, with the setting it most looks
    like: a misspelt one (GANSERVE_READY_MODELS) was ignored without a word."""
    from service.settings import Settings

    known = [name.upper() for name in Settings.model_fields] + [name.removeprefix("GANSERVE_") for name in OTHER_VARIABLES]
    lines = []
    for variable in sorted(key for key in environment if key.startswith("GANSERVE_") and key.removeprefix("GANSERVE_") not in known):
        close = difflib.get_close_matches(variable.removeprefix("GANSERVE_"), known, n=1, cutoff=0.7)
        lines.append(f"{variable} is no setting, and is ignored" + (f" (did you mean GANSERVE_{close[0]}?)" if close else ""))
    return lines


def serve_command(
    repository: Optional[Path] = typer.Option(None, "--repository", help="model repository root [GANSERVE_REPOSITORY]"),
    host: Optional[str] = typer.Option(None, "--host", help="[GANSERVE_HOST]"),
    port: Optional[int] = typer.Option(None, "--port", help="[GANSERVE_PORT]"),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="onnx, torchscript or eager [GANSERVE_RUNTIME]"),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="items per forward pass [GANSERVE_MAX_BATCH_SIZE]"),
    max_queue_delay_ms: Optional[float] = typer.Option(None, "--max-queue-delay-ms", help="[GANSERVE_MAX_QUEUE_DELAY_MS]"),
    workers: Optional[int] = typer.Option(None, "--workers", help="HTTP front processes; above 1, one engine process computes "
                                                                "every batch and the fronts parse, admit and encode [GANSERVE_WORKERS]"),
) -> None:
    """Serve the model repository over HTTP. Every option also reads from GANSERVE_* variables."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from service.settings import Settings

    overrides = {k: v for k, v in dict(repository=repository, host=host, port=port, runtime=runtime,
                                       max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms, workers=workers).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:  # a setting's name and what it takes, not a traceback
        for problem in error.errors():
            message = problem["msg"].removeprefix("Value error, ")
            if problem["loc"]:
                name = "GANSERVE_" + str(problem["loc"][0]).upper()
                typer.echo(f"ganserve serve: {name}: {message} (got {str(problem.get('input'))[:80]!r})", err=True)
            else:  # a rule across settings: its message names them (the input is every setting)
                typer.echo(f"ganserve serve: {message}", err=True)
        raise typer.Exit(2)
    except SettingsError as error:  # a JSON setting (GANSERVE_VERSION_POLICIES) that is not JSON
        field = re.search(r'field "(\w+)"', str(error))
        name = f"GANSERVE_{field.group(1).upper()}" if field else "a setting"
        typer.echo(f"ganserve serve: {name} must be JSON, such as README's example for it ({error.__cause__})", err=True)
        raise typer.Exit(2)
    for line in unknown_settings(os.environ):
        typer.echo(f"ganserve serve: warning: {line}", err=True)
    if not settings.repository.is_dir():  # (it surfaced as a page of uvicorn's lifespan traceback, exit 3)
        typer.echo(f"ganserve serve: model repository {settings.repository} does not exist: run `make models` or `ganserve export`", err=True)
        raise typer.Exit(2)
    from service.memory import huge_pages_environment

    if settings.huge_pages and (environment := huge_pages_environment(dict(os.environ))) is not None:
        # the tunable is read only at a process's start: the same command again, in it (under
        # --workers the engine and the fronts inherit it)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.workers > 1:
        # before the app is imported: the supervisor only starts, watches and stops processes, and
        # importing the app (torch and the runtimes) cost it ~640 MB of RSS outside every budget
        from service.workers import serve_workers

        try:
            status = serve_workers(settings)
        except OSError as error:  # the port is taken (by another server's fronts too), or not ours to bind
            logging.getLogger("ganserve.workers").error("cannot serve on %s:%d: %s", settings.host, settings.port, error)
            status = 1
        raise typer.Exit(status)
    import uvicorn

    from service.runtimes import DeviceUnavailable, resolve_device

    try:
        resolve_device(settings.device)
    except DeviceUnavailable as error:  # (under --workers, the engine stops with it)
        typer.echo(f"ganserve serve: {error}", err=True)
        raise typer.Exit(2)
    from service.app import create_app
    from service.http_protocol import guarded_protocol, guarded_websocket_protocol, quiet_client_caused_output
    from service.memory import return_freed_memory_to_the_os

    return_freed_memory_to_the_os()
    quiet_client_caused_output()
    # every accepted request ends by its deadline, so the drain fits in shutdown_grace_s; WebSockets
    # without permessage-deflate: stream frames are PNG/JPEG/WebP already, and an 8 KB deflated
    # message inflated to 7.9 MiB on the event loop (~24 ms each: one stream starved every client)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                http=guarded_protocol(settings.header_timeout_s, settings.max_connections, settings.send_timeout_s, settings.max_header_bytes),
                ws=guarded_websocket_protocol(settings.send_timeout_s, settings.max_header_bytes, settings.stream_max_messages_per_s),
                timeout_keep_alive=settings.keep_alive_s, timeout_graceful_shutdown=int(settings.shutdown_grace_s),
                ws_max_size=settings.max_body_bytes, ws_per_message_deflate=False, access_log=False,
                forwarded_allow_ips=settings.forwarded_allow_ips)


def register(app: typer.Typer) -> None:
    from service.ray_serving.cli import register as register_ray  # the verb only: ray is imported when it runs

    app.command("serve")(serve_command)
    register_ray(app)
