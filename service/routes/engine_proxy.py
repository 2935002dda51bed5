"""A front process's routes for what lives in the engine process alone (`serve --workers N`):
projection jobs (they need the eager generator and keep their state in the engine's job store)
and the model-repository extension (loading and unloading happen where the runtimes are). The
front has already bounded the body (the intake), and forwards one only to the route that reads
it: a projection's upload, once the front has refused what one process refuses before a job slot
is taken (the model, the steps, the upload's header and structure), so that a flood of bad uploads
costs the fronts' CPU and not the engine's, whose loop forms every batch. The engine answers over
its own HTTP socket, and its answer, status and error body included, is passed on as it is. After a load or an unload the
front re-reads the engine's models before answering, so the next request sees the change. An
engine that has stopped answering (ENGINE_SILENT_S) gets nothing forwarded: 503 at once, and a
forwarded request still waiting when it falls silent is answered 503 then."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated

import httpx
from fastapi import APIRouter, Query, Request, Response

from service.errors import ApiError
from service.front import FrontRegistry, engine_silent_error
from service.pipeline import FORWARDED_CLIENT, KnownQueryRoute, checked_on_headers, client_address, registry_of, request_deadline
from service.routes.jobs import DEFAULT_PROJECTION_STEPS, projected_model, projection_headers
from service.routes.repository import load_body, refuse_overrides, require_known_host
from service.schemas import ProjectionSteps, VersionText
from service.uploads import probe, read_upload

router = APIRouter(include_in_schema=False)
PASSED_HEADERS = ("content-type", "accept", "retry-after", "location")
SILENCE_CHECK_S = 0.5  # how often a forwarded request's wait looks at whether the engine still answers


async def while_the_engine_answers(registry: FrontRegistry, answer: Awaitable[httpx.Response]) -> httpx.Response:
    """The engine's answer, or 503 once it has been silent for ENGINE_SILENT_S. A stopped engine's
    socket still accepts, so a forwarded job poll waited out its 30 s timeout and a `load` (no
    timeout: a large model takes as long as it takes) waited for good. What the engine was asked
    may still happen once it answers again: a load then completes."""
    if silent := registry.engine_silent_s():
        raise engine_silent_error(silent)
    waiting = asyncio.ensure_future(answer)
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=SILENCE_CHECK_S)
            if done:
                return waiting.result()
            if silent := registry.engine_silent_s():
                raise engine_silent_error(silent)
    finally:
        waiting.cancel()  # (nothing when it finished)


async def forward(request: Request, timeout_s: float | None, body: bytes = b"") -> Response:
    """The request as the client sent it (path, query, the PASSED_HEADERS), with `body`: none but
    for the route that reads one (a body sent to a job poll or to model control, which ignore it,
    was copied to the engine: +280 MB of its memory under a probe's flood, outside the budget)."""
    registry = registry_of(request)
    client: httpx.AsyncClient = request.app.state.engine_http
    # the client's bytes as they came: decoded to text, a non-ASCII byte (`Accept: caf\xe9`) made httpx
    # refuse to encode the header, a 500 and two tracebacks per request (one process answers them as usual)
    headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() in PASSED_HEADERS]
    headers.append((FORWARDED_CLIENT.encode(), client_address(request).encode("latin-1", "replace")))  # (a projection's share of the job slots is per client)
    # the path and query as the client sent them, still percent-encoded: decoded, a %00 or %7F in a
    # job id made httpx refuse the URL (a 500 where one process answers 404), a %3F cut the name short
    # and a %2E%2E was normalised into another route
    target = httpx.URL(request.scope.get("raw_path", request.url.path.encode()).decode("latin-1"), query=request.scope.get("query_string", b""))
    try:
        answer = await while_the_engine_answers(registry, client.request(request.method, target, headers=headers, content=body, timeout=timeout_s))
    except httpx.InvalidURL:
        raise ApiError(404, "not found")
    except httpx.HTTPError as error:
        raise ApiError(503, f"the engine process did not answer ({type(error).__name__}); retry", headers={"Retry-After": "1"})
    if request.url.path.startswith("/v2/repository/models/"):
        await registry.refresh()
    return Response(answer.content, status_code=answer.status_code,
                    headers={k: v for k, v in answer.headers.items() if k.lower() in PASSED_HEADERS})


@checked_on_headers(projection_headers)
async def engine_projection(name: str, request: Request, steps: Annotated[ProjectionSteps, Query()] = DEFAULT_PROJECTION_STEPS,
                            version: Annotated[VersionText | None, Query()] = None) -> Response:
    """Refuses here what one process refuses before it takes a job slot, and checks the upload's
    header and structure (a marker flood cost the engine 9.7 s of CPU in 15 s when it came
    through unchecked); the engine checks again, takes the slot and decodes."""
    registry = registry_of(request)
    projected_model(request, name, steps, version)
    body = await request.body()  # (kept by the request: read_upload's form parser reads it from there)
    await probe(registry, await read_upload(request), request_deadline(request))
    return await forward(request, registry.settings.request_timeout_s, body)


# a query parameter it does not take is 422 here, before the upload is read (the engine's route says the same)
router.add_api_route("/v1/models/{name}/project", engine_projection, methods=["POST"], route_class_override=KnownQueryRoute)


@router.get("/v1/jobs/{job_id}")
@router.delete("/v1/jobs/{job_id}")
async def engine_route(request: Request) -> Response:
    return await forward(request, registry_of(request).settings.request_timeout_s)


@router.post("/v2/repository/index")
async def engine_index(request: Request) -> Response:
    """The index with its request (`{"ready": true}`), bounded here before it is passed on."""
    await load_body(request, "an index request")
    return await forward(request, registry_of(request).settings.request_timeout_s, await request.body())


@router.post("/v2/repository/models/{name}/load")
@router.post("/v2/repository/models/{name}/unload")
async def engine_model_control(request: Request) -> Response:
    """Loading a large model takes as long as it takes (the engine answers once it is ready or failed).
    The host check is the front's (and the site check its intake's): the engine sees neither the browser's Origin nor its Host."""
    if registry_of(request).settings.model_control:  # (off: the engine answers its 403)
        require_known_host(request)
        if request.url.path.endswith("/load"):  # checked here: the body is not passed on, and the engine's check saw none
            await refuse_overrides(request)
    return await forward(request, None)
