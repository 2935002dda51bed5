"""`ganserve ray`: the model repository on a Ray cluster (an existing one, or a local one started
here), one Serve deployment per model behind one HTTP ingress. Ray is imported inside the command
only: `ganserve serve` never loads it."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import typer


def env_value(text: str):
    """A GANSERVE_* value as the replicas' settings take it: JSON objects and lists parsed (as
    pydantic-settings reads them from the environment), the rest as text."""
    return json.loads(text) if text.strip()[:1] in ("{", "[") else text


def ray_command(
    repository: Path = typer.Option(..., "--repository", help="model repository root; every node must read it at this path (docs/ray.md)"),
    address: Optional[str] = typer.Option(None, "--address", help="a running cluster (`auto`, or host:port of its GCS); none: start a local Ray here [RAY_ADDRESS]"),
    host: str = typer.Option("0.0.0.0", "--host", help="the HTTP ingress's host"),
    port: int = typer.Option(8000, "--port", help="the HTTP ingress's port"),
    model: Optional[list[str]] = typer.Option(None, "--model", help="deploy only this model (repeatable; default: all)"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="local Ray only: logical CPUs it offers (default: the machine's)"),
    object_store_mb: int = typer.Option(256, "--object-store-mb", min=80, help="local Ray only: its object store (requests and answers cross it)"),
    proxy_location: Optional[str] = typer.Option(None, "--proxy-location", help="EveryNode (default on a cluster), HeadOnly (default locally; also where nodes share one host)"),
    detach: bool = typer.Option(False, "--detach", help="deploy and exit, leaving the application on the cluster (`serve shutdown` stops it)"),
) -> None:
    """Serve the model repository on Ray Serve: replicas, autoscaling and failover per model, the
    same /v1 and /v2 API. Server settings come from GANSERVE_* variables, as for `serve`; each
    model's `serving.replicas` section places it (docs/ray.md)."""
    import ray
    from ray import serve

    from service.ray_serving.config import APP_NAME, RayAppArgs
    from service.ray_serving.deployments import build_app

    settings = {key.removeprefix("GANSERVE_").lower(): env_value(value) for key, value in os.environ.items()
                if key.startswith("GANSERVE_") and key not in ("GANSERVE_REPOSITORY", "GANSERVE_MODELS", "GANSERVE_HOST", "GANSERVE_PORT")}
    args = RayAppArgs(repository=str(repository.resolve()), models=model or [], settings=settings)
    address = address or os.environ.get("RAY_ADDRESS")
    started = time.perf_counter()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, object_store_memory=object_store_mb * 2**20)
    serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location or ("EveryNode" if address else "HeadOnly"))
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    typer.echo(f"ganserve on Ray Serve: http://{host}:{port} ({', '.join(args.models) or 'every model'}), ready in {time.perf_counter() - started:.1f} s")
    if detach:
        return
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)  # replicas drain: readiness false, accepted requests finish by their deadline
    if not address:
        serve.shutdown()
        ray.shutdown()


def register(app: typer.Typer) -> None:
    app.command("ray")(ray_command)
