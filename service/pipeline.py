"""The one request path every model operation takes.

A route validates its body, then calls `begin` (the model, labelled for metrics) and `execute`
with the request's estimated cost and its work. `execute` owns the deadline (from the request's
arrival), admission (time and memory, service/admission.py), the client's hang-up (items are
dropped before compute, the request counts as 499) and mapping batcher outcomes to HTTP errors.
Routes never repeat any of it, and never import each other.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TypeVar

from fastapi import Request, Response, WebSocket
from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError

from service.admission import RequestCost, admit, batch_share_bytes, compute_seconds, is_slight, refuse_past_client_timeout, reserve_memory
from service.batcher import DeadlineExceeded, QueueFull, RequestState, RequestTooLarge, ShuttingDown
from service.connection_table import share_key
from service.errors import ApiError, DuplicateKey, describe_validation, first_repeated, unique_keys
from service.intake import STATE_KEY, RequestContext, context_of, not_json
from service.lanes import Booking
from service.memory import memory_holder
from service.registry import IMAGE_TO_IMAGE, LoadedModel, ModelRegistry

T = TypeVar("T")


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


FORWARDED_CLIENT = "x-ganserve-client"  # a --workers front's header to the engine: the address its client connected from


def client_address(request: Request) -> str:
    """The address the client connected from, as its share is kept (an IPv6 address's /64:
    service/connection_table.py `share_key`). In a `--workers` engine every request is one a front
    forwarded over the engine's private Unix socket, and the front names its client in
    FORWARDED_CLIENT (a client's own header of that name is never passed on)."""
    if registry_of(request).settings.role == "engine":
        return request.headers.get(FORWARDED_CLIENT, "")
    return share_key(request.client.host) or "" if request.client else ""


def context(request: Request) -> RequestContext:
    found = context_of(request.scope)
    if found is None:  # only when the app runs without its intake middleware
        found = RequestContext(time.monotonic())
        request.scope.setdefault("state", {})[STATE_KEY] = found
    return found


def declared_media(request: Request) -> str:
    """The request's media type as its Content-Type declares it, lower case, parameters left off
    ("" when it declares none)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_json(request: Request) -> None:
    if message := not_json(declared_media(request)):
        raise ApiError(415, message)


def refuse_unknown_query(request: Request | WebSocket, taken: frozenset[str], hint: str = "") -> None:
    """422 for a query parameter the operation does not take, or one given twice (`steps=20&steps=30`
    ran 30 steps without a word, where a proxy in front may have read 20: as a JSON key twice)."""
    if not request.scope.get("query_string"):
        return
    keys = [key for key, _ in request.query_params.multi_items()]
    if unknown := [key for key in keys if key not in taken]:
        raise ApiError(422, f"unknown query parameter {unknown[0][:64]!r}{hint}")
    if (repeated := first_repeated(keys)) is not None:
        raise ApiError(422, f"query parameter {repeated!r} is given twice")


class KnownQueryRoute(APIRoute):
    """The route class of routers whose operations take their options in the query (uploads,
    jobs): 422 for a query parameter the operation does not take (`project?version=99` ran the
    latest version without a word, where `upscale?version=99` is 404)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        return refusing_unknown_query(super().get_route_handler(), frozenset(parameter.alias for parameter in self.dependant.query_params))


def refusing_unknown_query(handler: Callable[[Request], Awaitable[Response]], taken: frozenset[str]) -> Callable[[Request], Awaitable[Response]]:
    async def known_query(request: Request) -> Response:
        refuse_unknown_query(request, taken)
        return await handler(request)

    return known_query


class JsonBodyRoute(APIRoute):
    """The route class of routers whose operations take a JSON body: a route with a body model
    answers 415 for any other content type before FastAPI parses the body (a `Depends` did this at
    the cost of a second pass of FastAPI's dependency solver on every request: docs/benchmarks.md,
    run 7), and 422 for a query parameter it does not take: its options are body fields, and
    `generate?format=jpeg` answered a PNG without a word, where an unknown body field is 422.

    The body is bounded before it is parsed (`GANSERVE_MAX_JSON_BODY_BYTES`, 413), a key given
    twice in one object is 422 (`unique_keys`), and its unknown fields are refused before
    validation (a route without a body refuses unknown query parameters, as `KnownQueryRoute`), which built an error object for each: 700,000 unknown keys in 7.9 MB held the
    event loop ~6 s and 0.9 GB for a 422 that showed ten of them."""

    json_body_only = True  # the intake refuses a body declared past GANSERVE_MAX_JSON_BODY_BYTES before reading it

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        taken = frozenset(parameter.alias for parameter in self.dependant.query_params)
        if self.body_field is None:  # (a GET: `GET /v1/models?x=1` was 200, where every other v1 route says 422)
            return refusing_unknown_query(handler, taken)
        body_model = self.body_field.field_info.annotation
        fields = frozenset(name for key, info in body_model.model_fields.items() for name in (key, info.alias) if name)
        forbids_extra = body_model.model_config.get("extra") == "forbid"

        async def json_only(request: Request) -> Response:
            require_json(request)
            refuse_unknown_query(request, taken, ": this operation takes its options in the JSON body")
            limit = registry_of(request).settings.max_json_body_bytes
            if len(body := await request.body()) > limit:
                raise ApiError(413, f"the JSON body is {len(body)} bytes; this operation takes at most {limit} (GANSERVE_MAX_JSON_BODY_BYTES)")
            if forbids_extra:
                try:
                    payload = json.loads(body, object_pairs_hook=unique_keys)
                except DuplicateKey as duplicate:
                    raise ApiError(422, f"the key {duplicate.key[:64]!r} appears more than once in one JSON object: say each option once") from None
                except Exception:  # not JSON, or nested past the parser's recursion limit: the handler answers that, as before
                    payload = None
                else:
                    request._json = payload  # parsed once: the handler reads it as Starlette's cached `request.json()`
                if isinstance(payload, dict) and (unknown := [key for key in payload if key not in fields]):
                    named = ", ".join(repr(key[:64]) for key in unknown[:3])
                    raise ApiError(422, f"unknown field{'s' if len(unknown) > 1 else ''} {named}{f' and {len(unknown) - 3} more' if len(unknown) > 3 else ''}")
            return await handler(request)

        return json_only


Endpoint = TypeVar("Endpoint", bound=Callable)


def query_value(request: Request, name: str, adapter: TypeAdapter[T], default: T | None = None) -> T | None:
    """A query parameter as its route will read it, for a check made before the body is read
    (`checked_on_headers`): `default` where it is absent, None where it is repeated or invalid
    (which `refuse_invalid_parameters` has refused before such a check runs)."""
    values = request.query_params.getlist(name)
    if not values:
        return default
    return valid_or_none(adapter, values[0]) if len(values) == 1 else None


def path_value(request: Request, name: str, adapter: TypeAdapter[T]) -> T | None:
    """A path parameter as its route will read it, for the same checks (`query_value`): None
    where the path has none or its text is invalid (refused before, as `query_value` says)."""
    text = request.path_params.get(name)
    return None if text is None else valid_or_none(adapter, text)


def valid_or_none(adapter: TypeAdapter[T], text: str) -> T | None:
    try:
        return adapter.validate_python(text)
    except ValidationError:
        return None


def checked_on_headers(check: Callable[[Request], None]) -> Callable[[Endpoint], Endpoint]:
    """Marks an upload route's endpoint with `check(request)`: what it refuses from the path and
    headers alone (an unknown or unready model, a model of another kind, a content type it does
    not read), after what its parameters' types refuse (`refuse_invalid_parameters`). The intake runs it before it reads a large, chunked or `Expect: 100-continue` body
    (`RequestIntake.refuse_on_headers`): `curl -T` of 8 MB to a misspelt model was told "100
    Continue", read whole and reserved in the memory budget, then answered 404 (a probe)."""
    def checks(request: Request, route: APIRoute) -> None:
        refuse_invalid_parameters(request, route)
        check(request)

    def mark(endpoint: Endpoint) -> Endpoint:
        endpoint.checked_on_headers = checks  # type: ignore[attr-defined]
        return endpoint
    return mark


def refuse_invalid_parameters(request: Request, route: APIRoute) -> None:
    """The 422 the route gives its path and query parameters once it runs, said before its body
    is read: an unknown or repeated query parameter (`KnownQueryRoute`), then what their types
    refuse (`?steps=abc`, `/versions/abc/infer`), in the words of the app's validation errors. A
    probe's 8 MB sent after `Expect: 100-continue` to `upscale?format=bogus` was told "100
    Continue" and read whole for that 422, where `?steps=5000` was refused at once."""
    if isinstance(route, KnownQueryRoute):
        refuse_unknown_query(request, frozenset(parameter.alias for parameter in route.dependant.query_params))
    problems = [problem for fields, received in ((route.dependant.path_params, request.path_params),
                                                 (route.dependant.query_params, request.query_params))
                for problem in request_params_to_args(fields, received)[1]]
    if problems:
        raise ApiError(422, describe_validation(RequestValidationError(problems)))


def begin(request: Request, name: str, operation: str, version: int | None = None) -> LoadedModel:
    """The model a request addresses (404 unknown, 503 not ready), with the request's metric
    labels set so that every later answer counts under them."""
    registry = registry_of(request)
    ctx = context(request)
    ctx.labels = (name if name in registry.models else "unknown", "", operation)
    model = registry.get(name, version)
    ctx.labels = (name, str(model.entry.version), operation)
    return model


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def require_kind(model: LoadedModel, kind: str) -> None:
    """422 when the model is not of `kind`, naming the endpoint its kind does have."""
    entry = model.entry
    if entry.kind != kind:
        hint = f": POST to /v1/models/{entry.name}/{IMAGE_TO_IMAGE[entry.kind]}" if entry.kind in IMAGE_TO_IMAGE else ""
        raise ApiError(422, f"model {entry.name!r} is {article(entry.kind)} {entry.kind} model, not {article(kind)} {kind} model{hint}")


def estimate(model: LoadedModel, graph: str, units: list[float], resident_bytes: int = 0, tiles: bool = False) -> RequestCost:
    """The cost of running `units` items through one of the model's graphs, plus what the request
    holds besides its batches (images, outputs, encoded bytes); `tiles`: the items are an
    upscale's tiles (`GraphCost.tile_bytes`)."""
    cost, config = model.costs.get(graph), model.config
    return RequestCost(compute_seconds(cost, units, config.max_batch_size),
                       resident_bytes + batch_share_bytes(cost, units, config.max_batch_size, config.max_batch_seconds, tiles))


def with_encoding(registry: ModelRegistry, cost: RequestCost, fmt: str, pixels: int, images: int = 1) -> RequestCost:
    """`cost` with what its answer's encoding takes the encoder pool: `images` images of `pixels`
    pixels each in `fmt` (service/encoder_backlog.py)."""
    return dataclasses.replace(cost, encode_seconds=registry.encoder_table.seconds(fmt, pixels, images), encode_format=fmt)


def output_pixels(model: LoadedModel) -> int:
    """The pixels of one generated image."""
    return (model.entry.spec.get("resolution") or 1) ** 2


def generated_bytes(model: LoadedModel, count: int) -> int:
    """What `count` generated images hold: float outputs, uint8 and the encoded bytes (at worst
    as large as the pixels, base64 a third more)."""
    spec = model.entry.spec
    values = (spec.get("resolution") or 1) ** 2 * (spec.get("channels") or 1)
    return count * values * (4 + 1 + 2)


def combined(*costs: RequestCost) -> RequestCost:
    return RequestCost(sum(c.seconds for c in costs), sum(c.bytes for c in costs), sum(c.encode_seconds for c in costs),
                       next((c.encode_format for c in costs if c.encode_format), ""))


async def execute(request: Request, model: LoadedModel, cost: RequestCost, work: Callable[[RequestState], Awaitable[T]]) -> T:
    """Admits the request, runs `work(state)` until it is done, the deadline passes or the client
    leaves, and maps the outcome to an answer."""
    return await execute_for(registry_of(request), context(request), model, cost, work)


class Interruption:
    """Why a request's work was cancelled under it: its deadline (a timer) or its client leaving
    (the intake's watcher). One timer and one callback per request, and the work runs in the
    request's own task: no helper tasks to create, wait on and tear down on the hot path."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def interrupt(self, task: asyncio.Task, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            task.cancel()


async def execute_for(registry: ModelRegistry, ctx: RequestContext, model: LoadedModel, cost: RequestCost,
                      work: Callable[[RequestState], Awaitable[T]]) -> T:
    """`execute` for a unit of work that is not an HTTP request (a stream's frame): its context
    says when it arrived, when its client left and what it reserved (the caller releases it)."""
    state = RequestState(deadline=deadline_of(registry, ctx), timing=ctx.timing,
                         protected_until=None if ctx.timeout_s is None else ctx.arrived + registry.settings.request_timeout_s)
    if registry.draining:
        raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"})
    if ctx.disconnected.is_set():
        raise ApiError(499, "the client closed the request", code="client_closed_request")
    settings = registry.settings
    labels = ctx.labels or (model.entry.name, str(model.entry.version), "upscale_stream")
    bound = registry.metrics.bound(*labels)
    booked: list[Booking] = []
    try:
        if ctx.timeout_s is not None:
            refuse_past_client_timeout(model, cost, ctx.timeout_s, state.deadline - time.monotonic(),
                                       registry.shared_device.other_share() + registry.shared_device.host_share())
        state.lane_seconds = admit(model, cost, state.deadline - time.monotonic(), registry.memory,
                                   recheck_s=settings.remeasure_idle_s or settings.request_timeout_s, encoding=registry.encoding,
                                   timeout_s=settings.request_timeout_s, counted=ctx.encode_micros,
                                   beside=registry.lanes_beside(model), booked=booked, other_share=registry.shared_device.other_share(),
                                   holder=memory_holder(share_key(ctx.client) or "", labels[0], labels[2]), timing=ctx.timing,
                                   host_share=registry.shared_device.host_share(), protected_s=None if state.protected_until is None else state.protected_until - time.monotonic())
    except ApiError as refusal:  # counted by reason beside the batcher's own (they showed in requests_total's status alone)
        if refusal.status == 503 and state.deadline <= time.monotonic():  # (a 413 says more: retrying cannot help)
            # admission read the negative time left as a wait to retry after: "retry in 1 s", half a minute late
            bound.rejected("deadline_before_admission").inc()  # (counted in requests_total alone: a probe)
            raise ApiError(504, "the request's deadline passed before it reached admission (its body arriving, or the server's "
                                "encoder pool busy)") from None
        bound.rejected("too_expensive" if refusal.status == 413 else "overloaded").inc()
        raise
    ctx.reserved += cost.bytes  # released by the intake once the response is sent
    ctx.timing["estimate"] = state.lane_seconds  # the compute admission counted (Server-Timing), beside what it took
    state.lane = model.lane
    state.lane.add_backlog(state.lane_seconds)  # its items take their shares off as they finish
    state.slight = is_slight(state.lane_seconds, model.lane.threads, state.protected_deadline - time.monotonic())
    task = asyncio.current_task()
    loop = task.get_loop()
    interruption = Interruption()
    timer = loop.call_at(loop.time() + state.deadline - time.monotonic(), interruption.interrupt, task, "deadline")
    left = functools.partial(interruption.interrupt, task, "disconnect")
    ctx.on_disconnect.append(left)
    in_flight = bound.in_flight
    in_flight.inc()
    try:
        return await work(state)
    except asyncio.CancelledError:
        if interruption.reason is None:  # cancelled from outside (shutdown): not ours to answer
            raise
        task.uncancel()
        state.cancelled = True  # what is still queued is dropped before compute
        if interruption.reason == "disconnect":
            raise ApiError(499, "the client closed the request", code="client_closed_request")
        raise deadline_passed(ctx)
    except QueueFull as full:
        raise ApiError(429, "the model's queue is full; retry later", headers={"Retry-After": str(max(1, round(full.retry_after_s)))})
    except RequestTooLarge as error:
        raise ApiError(413, f"this request can never fit the model's queue: {error}", code="too_expensive")
    except DeadlineExceeded:
        raise deadline_passed(ctx)
    except ShuttingDown:
        if registry.draining:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"})
        raise ApiError(503, f"model {model.entry.label} was {model.state} while this request waited for it; retry", headers={"Retry-After": "1"})
    finally:
        in_flight.dec()
        timer.cancel()
        ctx.on_disconnect.remove(left)
        state.lane.remove_backlog(state.lane_seconds)  # what its items did not settle (dropped, estimate error)
        state.lane_seconds = 0.0
        state.lane.bookings.difference_update(booked)


def deadline_passed(ctx: RequestContext) -> ApiError:
    """The 504 of a request admitted whose deadline passed before its work was done: the client's
    own timeout named where it set the deadline (v2's `timeout`)."""
    if ctx.timeout_s is not None:
        return ApiError(504, f"the request's timeout of {round(ctx.timeout_s * 1e6)} µs passed before its outputs were computed")
    return ApiError(504, "the request's deadline passed before its images were computed")


def reserve(request: Request, nbytes: int) -> None:
    """Holds `nbytes` of the memory budget until the response is sent (work outside `execute`,
    such as decoding a projection target)."""
    reserve_memory(registry_of(request).memory, nbytes)
    context(request).reserved += nbytes


async def off_loop(request: Request, function: Callable[..., T], *args) -> T:
    """Runs CPU work (decoding, blending, serialising) in the encoder pool, off the event loop."""
    return await in_pool(registry_of(request), function, *args)


async def in_pool(registry: ModelRegistry, function: Callable[..., T], *args, deadline: float | None = None, pool: Executor | None = None) -> T:
    """`function(*args)` in the encoder pool (or `pool`). With `deadline` (monotonic), a wait past it is a 504:
    two uploads whose decoding held both threads for 70 s made a small upscale's header check wait
    41-61 s, then be told 503 "retry in 1 s" with -24.9 s left of its 30 (a probe). Work a thread
    has begun runs on (it cannot be stopped); work still queued is dropped."""
    future = asyncio.get_running_loop().run_in_executor(pool or registry.encoders, function, *args)
    if deadline is None:
        return await future
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await future
    except TimeoutError:
        where = ("the server's encoder pool (it decodes uploads and encodes answers; busy with other requests' images)" if pool is None
                 else "its turn to decode its upload (one at a time, behind other requests' uploads)")
        raise ApiError(504, f"the request's deadline passed while it waited for {where}") from None


def deadline_of(registry: ModelRegistry, ctx: RequestContext) -> float:
    """When a request's answer is due (monotonic seconds): its arrival plus the request timeout,
    or its client's own where that is shorter (`client_timeout`)."""
    timeout = registry.settings.request_timeout_s
    return ctx.arrived + (timeout if ctx.timeout_s is None else min(timeout, ctx.timeout_s))


def client_timeout(request: Request, seconds: float | None) -> None:
    """The client's own deadline, `seconds` after its request arrived (v2's `timeout`), where it
    is shorter than the server's: admission refuses up front what cannot finish by it, and the
    batcher drops its items once it passes (504), as Triton's dynamic batcher does. It was read
    and ignored: a client that would give up after 100 ms had its request queued and computed
    for up to the server's 30 s."""
    if seconds is not None and seconds < registry_of(request).settings.request_timeout_s:
        context(request).timeout_s = seconds


def request_deadline(request: Request) -> float:
    return deadline_of(registry_of(request), context(request))
