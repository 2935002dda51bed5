"""The streaming super-resolution endpoint (protocol: service/streams.py). Refusals before the
handshake completes are HTTP answers with the API's JSON error body (404 unknown model, 422 not
an upscale model, a bad, unknown or repeated parameter, 503 not ready, too many streams or this
client's share of them, 403 from another site's page)."""
from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from service.connection_table import share_key
from service.errors import ApiError, error_payload
from service.digits import ascii_count
from service.intake import allowed_host_set, cross_site_origin, refuse_cross_site, refuse_unlisted_host, trusted_origin_set, unlisted_host
from service.pipeline import refuse_unknown_query, require_kind
from service.streams import STREAM_FORMATS, UpscaleStream

router = APIRouter(prefix="/v1", tags=["image-to-image"])
STREAM_PARAMETERS = frozenset({"format", "version"})


def stream_parameters(websocket: WebSocket) -> tuple[str, int | None]:
    refuse_unknown_query(websocket, STREAM_PARAMETERS)
    query = websocket.query_params
    fmt = query.get("format", "jpeg").lower()
    if fmt not in STREAM_FORMATS:
        raise ApiError(422, f"format: one of {', '.join(STREAM_FORMATS)} (got {fmt!r})")
    version = query.get("version")
    number = ascii_count(version)
    if version is not None and not (number is not None and 1 <= number < 2**31):
        raise ApiError(422, f"version: a positive integer (got {version[:32]!r})")
    return fmt, number


async def refuse(websocket: WebSocket, error: ApiError) -> None:
    """The handshake answered with the API's error (a plain close where the server cannot)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse(error_payload(websocket.url.path, error.status, error.message, error.code),
                                                          status_code=error.status, headers=error.headers))
    else:
        await websocket.close(1008, error.message[:120])


class WebSocketRoutesOnly:
    """ASGI middleware: a WebSocket handshake to a path no WebSocket route serves (an HTTP route, a
    static file, nothing) is refused with the API's JSON 404, where Starlette closed it unaccepted,
    which the server answered as an empty text/plain 403; one a browser sends from another site's
    page with the API's 403 (`intake.cross_site_origin`: no CORS applies to WebSockets, and a
    probe's page read upscales through a visitor's stream slots), and one sent to a name
    GANSERVE_ALLOWED_HOSTS does not list with its 421 (`intake.unlisted_host`)."""

    def __init__(self, app: ASGIApp, trusted_origins: Sequence[str] = (), allowed_hosts: Sequence[str] = ()) -> None:
        self.app = app
        self.trusted_origins = trusted_origin_set(trusted_origins)
        self.allowed_hosts = allowed_host_set(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            headers = dict(scope.get("headers") or [])
            if (name := unlisted_host(headers, self.allowed_hosts)) is not None:
                await refuse(WebSocket(scope, receive, send), refuse_unlisted_host(name))
                return
            if b"origin" in headers and (origin := cross_site_origin(headers, self.trusted_origins)) is not None:
                await refuse(WebSocket(scope, receive, send), refuse_cross_site(origin))
                return
            routes = scope["app"].router.routes  # (HTTP routes never match a WebSocket; mounts, of static files, match any)
            if not any(not isinstance(route, Mount) and route.matches(scope)[0] == Match.FULL for route in routes):
                await refuse(WebSocket(scope, receive, send), ApiError(404, f"no WebSocket endpoint at {scope.get('path', '')[:100]!r} "
                                                                            "(the one stream: /v1/models/{name}/upscale/stream)"))
                return
        await self.app(scope, receive, send)


@router.get("/models/{name}/upscale/stream", include_in_schema=False)
async def upscale_stream_over_http(name: str, request: Request) -> None:
    """426 for a plain GET (or HEAD) of an upscale model's stream address (it answered a bare 404,
    as if there were none); an unknown model is 404 and another kind 422, as the handshake says."""
    require_kind(request.app.state.registry.get(name), "super_resolution")
    raise ApiError(426, "this is a WebSocket endpoint: connect with a WebSocket client (an Upgrade: websocket handshake), "
                        f"or POST single images to /v1/models/{name[:100]}/upscale", headers={"Upgrade": "websocket", "Connection": "Upgrade"})


@router.websocket("/models/{name}/upscale/stream")
async def upscale_stream(websocket: WebSocket, name: str) -> None:
    """Frames in (binary PNG/JPEG/WebP messages), each answered in order: its upscale, or a
    notice that it was dropped (latest wins) or refused."""
    registry = websocket.app.state.registry
    try:
        fmt, version = stream_parameters(websocket)
        model = registry.get(name, version)
        require_kind(model, "super_resolution")
        if registry.draining:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"})
        slot = registry.take_stream_slot(share_key(websocket.client.host) if websocket.client else "")
    except ApiError as error:
        await refuse(websocket, error)
        return
    try:
        stream = UpscaleStream(websocket, registry, name, version, fmt, f"s{slot}")
        await websocket.accept()
        limits = model.limits.describe() if model.limits else {}
        await stream.send({"type": "ready", "stream": stream.id, "model": name, "version": model.entry.version, "scale": model.entry.spec["scale"],
                           "format": fmt, "max_input_pixels": limits.get("max_input_pixels"), "max_frame_bytes": registry.settings.max_body_bytes,
                           "idle_timeout_s": registry.settings.stream_idle_s})
        await stream.run()
    finally:
        registry.free_stream_slot(slot)
