"""The Open Inference Protocol's model-repository extension, as Triton serves it and
`tritonclient` calls it: the index of what is on disk and in what state, and load/unload of one
model. `load` re-reads the model's versions from disk and loads them beside the served ones;
traffic moves to them when they are warm, and the replaced ones finish their accepted work first.
Load and unload change what the server serves, so they answer 403 unless `GANSERVE_MODEL_CONTROL`
is on (Triton's default model-control mode refuses them too), and 403 to a request a browser sent
from another site's page (as every POST is: `intake.cross_site_origin`) or to a host name another
site could point at this server."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter, Request

from service.errors import ApiError, DuplicateKey, error_responses, unique_keys
from service.intake import host_name, local_or_address
from service.pipeline import declared_media, registry_of

router = APIRouter(prefix="/v2/repository", tags=["v2"])
# loads and unloads run one at a time; this many more may wait their turn, and the next is refused 429:
# each waiting one holds a connection (under --workers, one of its front's connections to the engine
# too, and loads wait without a timeout), so a script firing loads in a loop filled them
MAX_WAITING_MODEL_CONTROL = 16
MAX_LOAD_BODY_BYTES = 64 * 1024  # a load's parameters without files or a config (refused) are a few dozen bytes
# the body is read as JSON whatever these say (tritonclient sends none, `curl -d` a form, a browser's
# fetch of a string text/plain); any other declared format is 415 before the body is read
REPOSITORY_MEDIA_TYPES = ("", "application/json", "application/x-www-form-urlencoded", "text/plain")


@router.post("/index", responses=error_responses(413, 415, 422, protocol=True))
async def repository_index(request: Request) -> list[dict]:
    """Every entry on disk with its state; `{"ready": true}` lists only the ready ones (the
    protocol's request field: it was ignored, and unloaded models were listed to a client that
    asked for ready ones)."""
    parameters = await load_body(request, "an index request")
    if unknown := sorted(set(parameters) - {"ready"}):  # (as v1's bodies: a misspelt field was ignored, all entries listed)
        raise ApiError(422, f"an index request takes only `ready`; {unknown[0][:64]!r} is not a field of it")
    ready = parameters.get("ready", False)
    if not isinstance(ready, bool):
        raise ApiError(422, "ready: true or false")
    rows = await registry_of(request).index()
    return [row for row in rows if row["state"] == "READY"] if ready else rows


@contextmanager
def model_control_turn(request: Request) -> Iterator[None]:
    """A place among the load/unload requests waiting for the repository (429 past
    MAX_WAITING_MODEL_CONTROL), held until the request is answered."""
    registry = registry_of(request)
    if registry.control_waiting >= MAX_WAITING_MODEL_CONTROL:
        raise ApiError(429, f"{registry.control_waiting} model loads and unloads are already queued (one runs at a time); retry once they are done",
                       headers={"Retry-After": "5"})
    registry.control_waiting += 1
    try:
        yield
    finally:
        registry.control_waiting -= 1


def require_known_host(request: Request) -> None:
    """403 for a request whose Host names something other than an IP address, localhost or a name
    in GANSERVE_MODEL_CONTROL_HOSTS or GANSERVE_ALLOWED_HOSTS (both name the server's own). DNS rebinding: a page on a name an attacker controls, whose
    address the attacker then points at this server, posts to it from its own origin, so Origin and
    Host agree and the intake's site check (`intake.cross_site_origin`) lets it through; the name in its Host is the attacker's."""
    host = request.headers.get("host")
    if host is None:  # HTTP/1.0 without one: not a browser
        return
    name = host_name(host)
    settings = registry_of(request).settings
    allowed = {h.lower() for h in (*settings.model_control_hosts, *settings.allowed_hosts)}
    if not local_or_address(name) and name not in allowed:
        raise ApiError(403, f"model control answers requests sent to an IP address, localhost or a name in GANSERVE_MODEL_CONTROL_HOSTS, "
                            f"not to {name[:100]!r} (a name another site could point at this server); add it there to use it")


def require_model_control(request: Request) -> None:
    """Model control is on, and the request was sent to this server by name (the intake has refused
    it where it came from another site's page). (Under --workers the front checks the client's
    headers; the engine sees the front's.)"""
    settings = registry_of(request).settings
    if not settings.model_control:
        raise ApiError(403, "model control is off: start the server with GANSERVE_MODEL_CONTROL=true to load and unload models over HTTP")
    if settings.role != "engine":
        require_known_host(request)


async def load_body(request: Request, what: str) -> dict:
    """A repository request's JSON body as an object ({} when empty), bounded before it is parsed
    (on the event loop: a body-limit's worth of JSON held it for seconds). A body declared as
    another format (an image, a multipart form) is 415 before it is read: it was read, and a JSON
    object sent as `image/png` was taken."""
    media = declared_media(request)
    if media not in REPOSITORY_MEDIA_TYPES:
        raise ApiError(415, f"send {what} as a JSON object, or with no body (got {media[:64]!r})")
    raw = await request.body()
    if not raw.strip():
        return {}
    if len(raw) > MAX_LOAD_BODY_BYTES:
        raise ApiError(413, f"{what}'s body is {len(raw)} bytes: its fields fit in {MAX_LOAD_BODY_BYTES} bytes" + (
            " (loads take the repository on disk as it is; model files and configurations cannot be given with the request)" if "load" in what else ""))
    try:
        body = json.loads(raw, object_pairs_hook=unique_keys)
    except DuplicateKey as duplicate:  # (as the v1 bodies: `{"a": 1, "a": 2}` was taken, its last value kept)
        raise ApiError(422, f"{what}'s body gives the key {duplicate.key[:64]!r} more than once in one JSON object") from None
    except RecursionError:
        raise ApiError(422, f"{what}'s body is nested too deeply")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(422, f"{what}'s body is a JSON object (or empty)")
    return body


async def refuse_overrides(request: Request) -> None:
    """422 for a load that carries a configuration or model files (tritonclient's `load_model(config=…,
    files=…)`): they were ignored, and the client took its configuration for applied. This server
    loads what is on disk; the body is read only to say so (the intake bounds it)."""
    parameters = (await load_body(request, "a load request")).get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):  # ([] and 0 passed as none)
        raise ApiError(422, "parameters: a JSON object")
    if overrides := sorted(key for key in parameters if key == "config" or key.startswith("file:")):
        raise ApiError(422, f"loads take the repository on disk as it is; {', '.join(overrides)[:200]} cannot be given with the request "
                            "(write the version's files and its serving.json into the repository, then load)")


@router.post("/models/{name}/load", responses=error_responses(403, 404, 413, 415, 422, 429, protocol=True))
async def load_model(name: str, request: Request) -> dict:
    """Loads (or reloads) every version of `name` found on disk; answers once they are ready or failed."""
    require_model_control(request)
    await refuse_overrides(request)
    with model_control_turn(request):
        versions = await registry_of(request).load_model(name)
    if not any(m.ready for m in versions.values()):
        reasons = "; ".join(f"v{v}: {m.error}" for v, m in sorted(versions.items()))
        raise ApiError(422, f"model {name!r} could not be loaded ({reasons})")
    return {"name": name, "versions": {str(v): m.state for v, m in sorted(versions.items())},
            **({"errors": {str(v): m.error for v, m in versions.items() if m.error}} if any(m.error for m in versions.values()) else {})}


@router.post("/models/{name}/unload", responses=error_responses(403, 404, 429, protocol=True))
async def unload_model(name: str, request: Request) -> dict:
    require_model_control(request)
    with model_control_turn(request):
        await registry_of(request).unload_model(name)
    return {"name": name, "state": "unloaded"}
