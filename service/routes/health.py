"""Liveness and readiness, in our names and KServe v2's, and the Prometheus scrape."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.metrics import record_registry_state
from service.pipeline import registry_of

router = APIRouter(tags=["health"])


def readiness(request: Request) -> JSONResponse:
    registry = registry_of(request)
    states = {f"{name}/{v}": m.state for name, versions in registry.models.items() for v, m in versions.items()}
    ready = registry.is_ready()
    answer = {"ready": ready, "requires": registry.settings.ready_requires, "models": states}
    if missing := registry.missing_models():
        answer["missing"] = missing  # named by GANSERVE_MODELS or GANSERVE_READY_REQUIRES, not served
    if stuck := registry.stuck_lanes():
        answer["stuck"] = stuck
    return JSONResponse(answer, status_code=200 if ready else 503)


@router.get("/health/live")
@router.get("/v2/health/live")
async def live(request: Request) -> JSONResponse:
    """200 while the process makes progress; 503 once a lane has run one batch past
    GANSERVE_STUCK_COMPUTE_S (`stuck`: which, for how long), or under `--workers` the engine has
    been silent that long: a wedged runtime or device that only a restart frees, which is what an
    orchestrator's liveness probe is for (it said live whatever happened)."""
    registry = registry_of(request)
    if stuck := registry.stuck_lanes():
        return JSONResponse({"live": False, "stuck": stuck, "stuck_after_s": registry.settings.stuck_after_s}, status_code=503)
    return JSONResponse({"live": True})


@router.get("/health/ready")
@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once the models `GANSERVE_READY_REQUIRES` names (default: all) are loaded and warmed;
    503 before, while any of them is failed, while a model GANSERVE_MODELS or the rule names is
    not served (`missing`), and while draining."""
    return readiness(request)


@router.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    registry = registry_of(request)
    record_registry_state(registry)
    body, media_type = registry.metrics.exposition({(name, str(version)) for name, versions in registry.models.items() for version in versions})
    return Response(body, media_type=media_type)
