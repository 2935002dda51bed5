"""The Ray Serve application: one `ModelReplica` deployment per model, one `Ingress` that owns
HTTP, and a `MetricsBoard`. `build_app` is the import path a RayService's serveConfigV2 names and
what `ganserve ray` runs.

A replica is the single-process server narrowed to one model (`Settings.models`): the same
registry, lanes, batcher, admission, deadlines and error JSON, entered through its ASGI app in
process (forwarding.py). Ray adds placement, replicas, routing and autoscaling; it does not batch
(no `@serve.batch`): the replica's own batcher does, fed by `max_ongoing_requests` sized from it."""
from __future__ import annotations

import asyncio
import json
import logging

import ray
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from service.errors import error_payload
from service.ray_serving.config import RayAppArgs, plan_deployments
from service.digits import ascii_count
from service.ray_serving.forwarding import ForwardedRequest, ForwardedResponse, call_asgi
from service.ray_serving.metrics_board import ExpositionBoard
from service.ray_serving.routing import REFUSED_ON_RAY, Route, is_idempotent, route

log = logging.getLogger("ganserve.ray")
REPLICA_HEADER = b"x-ganserve-replica"  # which replica (and node) answered: for operators and tests
REPLICA_LOST = (RayActorError, ReplicaUnavailableError)  # the replica died or was stopped with the request in it


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class MetricsBoard:
    """Holds each replica's latest metrics text (metrics_board.py); the ingress answers its merge."""

    def __init__(self, expiry_s: float) -> None:
        self.board = ExpositionBoard(expiry_s)

    def push(self, replica: str, node: str, text: str) -> None:
        self.board.push(replica, node, text)

    def forget(self, replica: str) -> None:
        self.board.forget(replica)

    def exposition(self) -> bytes:
        return self.board.exposition()


@serve.deployment
class ModelReplica:
    """One model's ganserve app. Ray routes to it only once its constructor returns, so the
    constructor loads and warms the model and fails (with the model's error) if it cannot."""

    async def __init__(self, args: dict, model: str, cpus: float, board: DeploymentHandle) -> None:
        from service.app import create_app  # torch and the runtimes: in replicas, not in the ingress

        settings = RayAppArgs.model_validate(args).server_settings(model, cpus)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
        self.app = create_app(settings)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        self.registry = self.app.state.registry
        await self.registry.loaded_event.wait()
        if not self.registry.is_ready():
            problems = {m.entry.label: m.error or m.state for m in self.registry.all_models() if not m.ready}
            await self.lifespan.__aexit__(None, None, None)
            raise RuntimeError(f"model {model!r} could not be served: {problems}")
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()[:12]
        self.tag = f"{self.replica}@{self.node}".encode()
        self.board = board
        self.pushing = asyncio.create_task(self.push_metrics(RayAppArgs.model_validate(args).metrics_push_s))

    async def forward(self, request: ForwardedRequest) -> ForwardedResponse:
        answer = await call_asgi(self.app, request)
        answer.headers.append((REPLICA_HEADER, self.tag))
        return answer

    async def push_metrics(self, every_s: float) -> None:
        """Sends this replica's /metrics text to the board, as a scrape would read it."""
        scrape = ForwardedRequest("GET", "/metrics", b"", [(b"host", b"ganserve-replica")], b"")  # (HTTP/1.1's one Host: the intake refuses none)
        while True:
            try:
                text = (await call_asgi(self.app, scrape)).body.decode()
                await self.board.push.remote(self.replica, self.node, text)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the board restarting must not stop the replica
                log.warning("metrics push failed: %s", error)
            await asyncio.sleep(every_s)

    async def check_health(self) -> None:
        """Ray replaces a replica whose check fails; a draining or failed registry is unhealthy,
        and so is one whose lane is stuck in a batch (`ModelRegistry.stuck_lanes`)."""
        if stuck := self.registry.stuck_lanes():
            raise RuntimeError(f"compute stuck: {stuck}")
        if not self.registry.is_ready():
            raise RuntimeError("the model is not ready")

    async def __del__(self) -> None:
        """Ray's graceful shutdown: readiness false, queued work drains, then the pools stop."""
        if not hasattr(self, "pushing"):  # the constructor failed (and exited the lifespan itself)
            return
        self.pushing.cancel()
        try:  # the board may be stopping too (the whole application deleted): never wait on it
            await asyncio.wait_for(self.board.forget.remote(self.replica), 1.0)
        except Exception:  # noqa: BLE001 - its series expire on the board anyway
            pass
        await self.lifespan.__aexit__(None, None, None)


class BodyRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def json_response(path: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The single-process server's error JSON (service/errors.py), shaped by the path (/v2: the protocol's)."""
    return Response(json.dumps(error_payload(path, status, message)), status_code=status, headers=headers, media_type="application/json")


async def refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    """A WebSocket handshake: refused with the 403 JSON of a plain GET of the stream's path where
    the proxy lets an app answer a handshake with an HTTP response, else closed (a bare 403)."""
    websocket = WebSocket(scope, receive, send)
    if "websocket.http.response" in scope.get("extensions", {}):
        await websocket.send_denial_response(json_response(scope.get("path", ""), *REFUSED_ON_RAY["stream"]))
    else:
        await websocket.close(1008)


async def run_lifespan(receive: Receive, send: Send) -> None:
    """The ASGI lifespan Ray's wrapper runs: nothing to start or stop here (the constructor and
    `__del__` do it)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class IngressApp:
    """The ingress as an ASGI app (an object with an async `__call__`: uvicorn, which Ray uses for
    the lifespan, takes a bound method for an ASGI 2 app)."""

    def __init__(self, ingress: "Ingress") -> None:
        self.ingress = ingress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            response = await self.ingress.answer(Request(scope, receive, send))
            await response(scope, receive, send)
        elif kind == "websocket":
            await refuse_websocket(scope, receive, send)
        elif kind == "lifespan":
            await run_lifespan(receive, send)


@serve.deployment(max_ongoing_requests=2048, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The one HTTP entry: routes by path to the model's deployment (routing.py), merges what
    spans models, and turns Ray's failures into the server's JSON: queue full (Ray's
    `max_queued_requests`) is 429 with Retry-After like the batcher's full queue; a replica that
    died with the request in it is retried once on another when the request is idempotent, else 503.

    An ASGI ingress (`__serve_build_asgi_app__`), not a `__call__` taking a Request: Ray builds
    that Request itself, and a WebSocket handshake failed its check before our routing ran (a 500
    and a logged traceback for every handshake, where the stream's refusal is a 403)."""

    def __init__(self, models: dict[str, DeploymentHandle], board: DeploymentHandle, args: dict) -> None:
        self.models = models
        self.board = board
        self.settings = RayAppArgs.model_validate(args).server_settings()
        self.metrics = CollectorRegistry()
        self.retries = Counter("ganserve_ray_retries_total", "Idempotent requests re-sent after their replica died (outcome: retried, failed)",
                               ("model", "outcome"), registry=self.metrics)
        self.rejected = Counter("ganserve_ray_rejected_total", "Requests Ray refused before a replica took them (reason: queue_full, unavailable, replica_lost)",
                                ("model", "reason"), registry=self.metrics)

    def __serve_build_asgi_app__(self) -> "IngressApp":
        return IngressApp(self)

    async def answer(self, request: Request) -> Response:
        path, method = request.url.path, request.method.upper()
        where = route(method, path)
        if where.kind == "live":
            return Response(json.dumps({"live": True}), media_type="application/json")
        if where.kind == "refused":
            status, message = REFUSED_ON_RAY[where.refusal]
            return json_response(path, status, message)
        if where.kind == "metrics":
            return await self.metrics_exposition()
        try:
            body = await self.bounded_body(request)
        except BodyRefused as refused:
            return json_response(path, refused.status, refused.message)
        forwarded = ForwardedRequest(method, path, request.url.query.encode(), list(request.headers.raw), body,
                                     (request.client.host, request.client.port) if request.client else ("127.0.0.1", 0))
        if where.kind == "model":
            if where.model not in self.models:
                return json_response(path, 404, f"unknown model {where.model!r}; GET /v1/models lists the models served")
            return as_response(await self.send(where.model, forwarded, is_idempotent(method, path)), path)
        if where.kind == "any":
            return as_response(await self.send(next(iter(self.models)), forwarded, is_idempotent(method, path)), path)
        return await self.merged(where, forwarded)

    async def bounded_body(self, request: Request) -> bytes:
        """The body, refused as the replica's intake would (413 past `max_body_bytes`, 408 past
        `body_timeout_s`) before the ingress holds more of it than a replica would accept. Behind
        `ganserve ray`'s proxy the edge (edge.py) has read it already and hands it over at once;
        this stays for an ingress reached another way."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if (length := ascii_count(declared, max_digits=40)) is not None and length > limit:
            raise BodyRefused(413, f"request body over {limit} bytes")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise BodyRefused(413, f"request body over {limit} bytes")
                    chunks.append(chunk)
        except (ClientDisconnect, TaskCancelledError):  # (Ray cancels the request when its client hangs up: no traceback for that)
            raise BodyRefused(499, "the client went away while sending its body") from None
        except TimeoutError:
            raise BodyRefused(408, f"the request body did not arrive within {self.settings.body_timeout_s:g} s") from None
        return b"".join(chunks)

    async def send(self, model: str, forwarded: ForwardedRequest, idempotent: bool) -> ForwardedResponse | Response:
        """The request on one replica of `model`: once, or twice when the first replica died and
        the request is idempotent; Ray's refusals become the server's JSON answers."""
        path = forwarded.path
        limit = self.settings.request_timeout_s + 10  # the replica answers 504 by the deadline; this only guards a lost reply
        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(self.models[model].forward.remote(forwarded), limit)
            except BackPressureError as error:
                self.rejected.labels(model, "queue_full").inc()
                return json_response(path, 429, f"model {model!r}: every replica is busy and the queue in front of them is full ({error}); retry",
                                     {"Retry-After": "1"})
            except DeploymentUnavailableError:
                self.rejected.labels(model, "unavailable").inc()
                return json_response(path, 503, f"model {model!r} has no running replica (its deployment failed); see `serve status`", {"Retry-After": "5"})
            except REPLICA_LOST as error:
                if attempt == 1 and idempotent:
                    self.retries.labels(model, "retried").inc()
                    log.warning("%s %s: replica lost (%s), retrying once on another", forwarded.method, path, type(error).__name__)
                    continue
                self.retries.labels(model, "failed").inc() if idempotent else self.rejected.labels(model, "replica_lost").inc()
                return json_response(path, 503, f"the replica serving model {model!r} stopped with this request in it"
                                     + (" (and so did the one it was retried on)" if idempotent else "; it was not retried (not idempotent)"),
                                     {"Retry-After": "1"})
            except asyncio.TimeoutError:
                return json_response(path, 504, f"no answer from model {model!r} within {limit:.0f} s")
            except Exception as error:  # a failure of Ray's own: the single server's 500, with the log to read
                log.exception("%s %s to model %r failed", forwarded.method, path, model)
                return json_response(path, 500, f"internal error ({type(error).__name__}); the ingress's log has the details")
        raise AssertionError("unreachable")

    async def merged(self, where: Route, forwarded: ForwardedRequest) -> Response:
        """Listings, readiness and the repository index: asked of every model's deployment, merged."""
        names = sorted(self.models)
        answers = await asyncio.gather(*(self.send(name, forwarded, True) for name in names))
        path = forwarded.path
        parsed: dict[str, object] = {}
        for name, answer in zip(names, answers):
            if isinstance(answer, Response):  # a refusal, as the single server would answer it
                if where.kind != "ready":
                    return answer
                parsed[name] = None
                continue
            try:
                parsed[name] = json.loads(answer.body)
            except ValueError:
                return json_response(path, 502, f"model {name!r} answered {path} with something that is not JSON")
        if where.kind == "list":
            models = [row for name in names for row in (parsed[name] or {}).get("models", []) if row.get("name") == name]
            return Response(json.dumps({"models": models}), media_type="application/json")
        if where.kind == "index":
            rows = [row for name in names for row in parsed[name] if isinstance(row, dict) and row.get("name") == name]
            return Response(json.dumps(rows), media_type="application/json")
        states = {label: state for name in names for label, state in ((parsed[name] or {}).get("models") or {}).items() if label.split("/")[0] == name}
        ready = all(parsed[name] and parsed[name].get("ready") for name in names)
        body = {"ready": ready, "requires": "all", "models": states}
        return Response(json.dumps(body), status_code=200 if ready else 503, media_type="application/json")

    async def metrics_exposition(self) -> Response:
        replicas = await self.board.exposition.remote()
        return Response(replicas + generate_latest(self.metrics), media_type=CONTENT_TYPE_LATEST)


def as_response(answer: ForwardedResponse | Response, path: str) -> Response:
    if isinstance(answer, Response):
        return answer
    response = Response(answer.body, status_code=answer.status)
    response.raw_headers = answer.headers  # the replica's own, content-length included
    return response


def build_app(args: RayAppArgs) -> serve.Application:
    """The application: a deployment per model (placed by its `serving.replicas`), the board and
    the ingress. Ray calls this with serveConfigV2's `args`, validated as `RayAppArgs`."""
    args = RayAppArgs.model_validate(args)
    shutdown_grace_s = args.server_settings().shutdown_grace_s
    board = MetricsBoard.bind(max(5.0, 5 * args.metrics_push_s))
    plain = args.model_dump()
    models = {plan.model: ModelReplica.options(**plan.options(shutdown_grace_s)).bind(plain, plan.model, plan.config.replicas.num_cpus, board)
              for plan in plan_deployments(args)}
    return Ingress.options(num_replicas=args.ingress_replicas).bind(models, board, plain)
