"""The Open Inference Protocol's model-repository extension, as Triton serves it and
`tritonclient` calls it: the index of what is on disk and in what state, and load/unload of one
model. `load` re-reads the model's versions from disk and loads them beside the served ones;
traffic moves to them when they are warm, and the replaced ones finish their accepted work first.
Load and unload change what the server serves, so they answer 403 unless `GANSERVE_MODEL_CONTROL`
is on (Triton's default model-control mode refuses them too), and 403 to a request a browser sent
from another site's page."""
from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import APIRouter, Request

from service.errors import ApiError, error_responses
from service.pipeline import registry_of

router = APIRouter(prefix="/v2/repository", tags=["v2"])


@router.post("/index")
async def repository_index(request: Request) -> list[dict]:
    return await registry_of(request).index()


def require_same_site(request: Request) -> None:
    """403 for a request whose `Origin` (which browsers send with every cross-site POST, and
    clients such as tritonclient do not) names another host than the one it was sent to: a page
    on any site could otherwise post a form to `unload` (no preflight asks first)."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
        raise ApiError(403, f"model control does not take requests a browser sends from another site (Origin {origin[:100]!r}); "
                            "send them from a client or a page of this server")


def require_model_control(request: Request) -> None:
    if not registry_of(request).settings.model_control:
        raise ApiError(403, "model control is off: start the server with GANSERVE_MODEL_CONTROL=true to load and unload models over HTTP")
    require_same_site(request)


@router.post("/models/{name}/load", responses=error_responses(403, 404, 422, protocol=True))
async def load_model(name: str, request: Request) -> dict:
    """Loads (or reloads) every version of `name` found on disk; answers once they are ready or failed."""
    require_model_control(request)
    versions = await registry_of(request).load_model(name)
    if not any(m.ready for m in versions.values()):
        reasons = "; ".join(f"v{v}: {m.error}" for v, m in sorted(versions.items()))
        raise ApiError(422, f"model {name!r} could not be loaded ({reasons})")
    return {"name": name, "versions": {str(v): m.state for v, m in sorted(versions.items())},
            **({"errors": {str(v): m.error for v, m in versions.items() if m.error}} if any(m.error for m in versions.values()) else {})}


@router.post("/models/{name}/unload", responses=error_responses(403, 404, protocol=True))
async def unload_model(name: str, request: Request) -> dict:
    require_model_control(request)
    await registry_of(request).unload_model(name)
    return {"name": name, "state": "unloaded"}
