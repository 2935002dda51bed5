"""`ganserve ray`: the model repository on a Ray cluster (an existing one, or a local one started
here), one Serve deployment per model behind one HTTP ingress. Ray is imported inside the command
only: `ganserve serve` never loads it."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import typer

from service.ray_serving.edge import BODY_BUDGET_ENV, DEFAULT_BODY_BUDGET_BYTES, PROXY_CALLBACK, PROXY_CALLBACK_ENV
from service.settings import name_list


def env_value(text: str):
    """A GANSERVE_* value as the replicas' settings take it: JSON objects and lists parsed (as
    pydantic-settings reads them from the environment), the rest as text."""
    return json.loads(text) if text.strip()[:1] in ("{", "[") else text


# (a replica serves one model and is ready with it: GANSERVE_READY_REQUIRES naming two kept every replica unready)
NOT_REPLICA_SETTINGS = ("GANSERVE_REPOSITORY", "GANSERVE_MODELS", "GANSERVE_READY_REQUIRES", "GANSERVE_HOST", "GANSERVE_PORT", BODY_BUDGET_ENV)


def replica_settings(environment: Mapping[str, str]) -> dict:
    """The GANSERVE_* settings every replica takes, as `Settings` fields."""
    return {key.removeprefix("GANSERVE_").lower(): env_value(value) for key, value in environment.items()
            if key.startswith("GANSERVE_") and key not in NOT_REPLICA_SETTINGS}


def env_models(text: str) -> list[str]:
    """GANSERVE_MODELS as `serve` reads it (a JSON list or comma-separated names), the models
    `ganserve ray` deploys when no --model is given (it was ignored: every model in the repository
    was deployed)."""
    try:
        value = name_list(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise typer.BadParameter(f"GANSERVE_MODELS must be model names, comma-separated or a JSON list, got {text!r}")
    return value


def ray_command(
    repository: Path = typer.Option(..., "--repository", help="model repository root; every node must read it at this path (docs/ray.md)"),
    address: Optional[str] = typer.Option(None, "--address", help="a running cluster (`auto`, or host:port of its GCS); none: start a local Ray here [RAY_ADDRESS]"),
    host: str = typer.Option("0.0.0.0", "--host", help="the HTTP ingress's host"),
    port: int = typer.Option(8000, "--port", help="the HTTP ingress's port"),
    model: Optional[list[str]] = typer.Option(None, "--model", help="deploy only this model (repeatable; default: GANSERVE_MODELS, else all)"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="local Ray only: logical CPUs it offers (default: the machine's)"),
    object_store_mb: int = typer.Option(256, "--object-store-mb", min=80, help="local Ray only: its object store (requests and answers cross it)"),
    proxy_location: Optional[str] = typer.Option(None, "--proxy-location", help="EveryNode (default on a cluster), HeadOnly (default locally; also where nodes share one host)"),
    detach: bool = typer.Option(False, "--detach", help="deploy and exit, leaving the application on the cluster (`serve shutdown` stops it)"),
    body_budget_bytes: int = typer.Option(DEFAULT_BODY_BUDGET_BYTES, "--body-budget-bytes", envvar=BODY_BUDGET_ENV, min=1024,
                                          help="local Ray only: request bodies its HTTP proxy holds for requests not yet answered (one client address a quarter); past it 503 (service/ray_serving/edge.py)"),
) -> None:
    """Serve the model repository on Ray Serve: replicas, autoscaling and failover per model, the
    same /v1 and /v2 API. Server settings come from GANSERVE_* variables, as for `serve`; each
    model's `serving.replicas` section places it (docs/ray.md)."""
    import ray
    from ray import serve

    from service.ray_serving.config import APP_NAME, RayAppArgs
    from service.ray_serving.deployments import build_app

    settings = replica_settings(os.environ)
    models = model or env_models(os.environ.get("GANSERVE_MODELS", ""))
    args = RayAppArgs(repository=str(repository.resolve()), models=models, settings=settings)
    address = address or os.environ.get("RAY_ADDRESS")
    started = time.perf_counter()
    if address:  # the cluster's proxies run the edge if its nodes were started with the variables below (docs/ray.md)
        ray.init(address=address, log_to_driver=False)
    else:  # a local Ray's processes inherit these: its proxy runs the edge with this command's limits
        os.environ.update({PROXY_CALLBACK_ENV: PROXY_CALLBACK, BODY_BUDGET_ENV: str(body_budget_bytes)})
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, object_store_memory=object_store_mb * 2**20)
    stop = threading.Event()

    def stop_serving(*_) -> None:
        if not deployed.is_set() and not stop.is_set():  # still deploying (a replica Ray cannot place waits for good): stop now
            stop.set()  # once: a second signal does not break the clean-up below
            raise KeyboardInterrupt
        stop.set()

    deployed = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # before the deploy: ray.init left SIGINT to Ray's own handler
        signal.signal(signum, stop_serving)
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location or ("EveryNode" if address else "HeadOnly"))
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        deployed.set()
        typer.echo(f"ganserve on Ray Serve: http://{host}:{port} ({', '.join(args.models) or 'every model'}), ready in {time.perf_counter() - started:.1f} s")
        if detach:
            return
        stop.wait()
    except KeyboardInterrupt:
        typer.echo("stopped while deploying", err=True)
    serve.delete(APP_NAME)  # replicas drain: readiness false, accepted requests finish by their deadline
    if not address:
        serve.shutdown()
        ray.shutdown()


def register(app: typer.Typer) -> None:
    app.command("ray")(ray_command)
