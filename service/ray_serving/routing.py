"""Where the ingress sends one HTTP request: to the deployment of the model its path names, to
every model (listings, readiness, the repository index, which it merges), to the metrics board, or
nowhere (what cannot work across replicas is refused with a clear 4xx, never forwarded)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

MODEL_PATH = re.compile(r"^/v[12]/models/(?P<name>[^/]+)(?P<rest>/.*)?$")
REFUSED_ON_RAY = {
    # a projection job lives in the replica that runs it; a later GET would land on another
    "jobs": (403, "projection jobs are not served on Ray Serve (a job lives in one replica): use `ganserve serve` for /project and /v1/jobs"),
    "model_control": (403, "model control on Ray Serve is a redeployment (`ganserve ray` or the RayService's serveConfigV2), not an HTTP call"),
    "stream": (403, "upscale streams (WebSocket) are not proxied by the Ray Serve ingress: use `ganserve serve` for /upscale/stream"),
}


@dataclass(frozen=True)
class Route:
    kind: Literal["model", "list", "live", "ready", "index", "metrics", "any", "refused"]
    model: str | None = None
    refusal: str | None = None  # a key of REFUSED_ON_RAY


def route(method: str, path: str) -> Route:
    """The route of one request (method is upper case, path without the query)."""
    if path in ("/health/live", "/v2/health/live"):
        return Route("live")
    if path in ("/health/ready", "/v2/health/ready"):
        return Route("ready")
    if path == "/metrics":
        return Route("metrics")
    if path == "/v1/models" and method == "GET":
        return Route("list")
    if path == "/v2/repository/index":
        return Route("index")
    if path.startswith("/v2/repository/"):
        return Route("refused", refusal="model_control")
    if path.startswith("/v1/jobs"):
        return Route("refused", refusal="jobs")
    match = MODEL_PATH.match(path)
    if match:
        rest = match["rest"] or ""
        if rest == "/project":
            return Route("refused", refusal="jobs")
        if rest == "/upscale/stream":
            return Route("refused", refusal="stream")
        return Route("model", model=match["name"])
    return Route("any")  # the playground, its static files, /docs, /openapi.json, /v2 server metadata


def is_idempotent(method: str, path: str) -> bool:
    """Whether a request may run twice: reads, and every operation whose answer is a function of
    its body (generation is seeded, seed 0 when none is given; translate, upscale and v2 infer are
    deterministic). Requests that create state (jobs, model control) are not, and are refused on
    Ray anyway; the check stays here so a new route is not retried by accident."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return True
    return route(method, path).kind in ("model", "index", "list")
