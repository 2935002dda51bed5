"""The HTTP edge under Ray Serve: what `ganserve serve`'s own HTTP protocol and intake refuse
before a request costs anything, done as an ASGI middleware inside Ray's proxy
(Ray's one hook into its HTTP server: the proxy calls the function that
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names, `proxy_middlewares`, for its middlewares; the
variable must be in the environment of the Ray nodes' processes: `ganserve ray` sets it for the
local Ray it starts, a cluster's nodes need it where they start, as deploy/rayservice.yaml does).

Ray's proxy is uvicorn without any of the single server's limits. A hostile probe found (docs/ray.md,
"The HTTP edge under Ray"): headers of 64 MiB forwarded through the ingress and the object store
to a replica (GiBs held by all three afterwards); a client's `X-Request-Id` written into every
log line of three processes; request bodies read by the ingress within its 2,048 ongoing
requests, so one address held them all with slow bodies (every other client waited ~30 s) or
filled the ingress with bodies held a byte short of complete (3.8 GiB, never given back). Here,
before the ingress sees a request:

- headers past `max_header_bytes`: 431;
- the client's `X-Request-Id` and `X-Request-Timeout-Seconds` are dropped: Ray names and times
  requests itself, and neither is the client's to set;
- the body is read whole here, within `body_timeout_s` (408) and `max_body_bytes` (413), and
  the bytes count against the proxy's `BodyLedger` until the request is answered (the ingress and
  the replica hold their copies that long): a body that would pass the budget, or a quarter of it
  from one client address, first takes the room of a body still arriving (of its own address
  once that one has been arriving a second, else of the address holding the most), and is
  refused only where there is none: 503 with Retry-After either way. The ingress then gets the
  body at once, so a slow body holds none of its slots.

What only the HTTP server itself could do stays undone: connections that send nothing, headers
that trickle in, answers never read (uvicorn in Ray's proxy has no connection cap, header timeout
or send timeout). docs/ray.md says what to put in front."""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.connection_table import IDLE_EVICTABLE_S, client_share_key
from service.digits import ascii_count
from service.intake import Refused, error_message

DROPPED_HEADERS = {b"x-request-id", b"x-request-timeout-seconds"}  # Ray's own request id and timeout: not the client's
HEADER_OVERHEAD = 4  # ": " and CRLF of each header line, as the single server counts them
DEFAULT_BODY_BUDGET_BYTES = 512 * 2**20
BODY_BUDGET_ENV = "GANSERVE_RAY_BODY_BUDGET_BYTES"  # the proxy's body budget (the BodyLedger's)
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "service.ray_serving.edge:proxy_middlewares"


@dataclass(eq=False)
class Body:
    """One request's body in the proxy: its bytes counted in the ledger, and whether the ledger
    took them back for another client's (`evicted`, while the body was still arriving)."""

    address: str | None
    started: float
    evicted: asyncio.Future
    held: int = 0


class BodyLedger:
    """Bytes of request bodies one proxy holds for requests not yet answered: in all (`budget`),
    and per client address (a share key: an IPv6 client by its /64), one address at most a
    quarter. A body that does not fit makes room first, as the single server's connection table
    does for connections (service/connection_table.py), taking a body still arriving:

    1. its own address over its quarter: that address's body arriving longest, once it has been
       arriving `evictable_after_s` (a client behind the same NAT as one holding bodies a byte
       short was refused every request);
    2. the whole budget in use: the body arriving longest of the address holding the most, when
       that holds more than the newcomer's would, whatever its age.

    A body taken is answered 503 with Retry-After (it was never accepted); one that finds no room
    is refused the same way. Bodies complete and in flight to the ingress are never taken."""

    def __init__(self, budget_bytes: int, evictable_after_s: float = IDLE_EVICTABLE_S) -> None:
        self.budget = budget_bytes
        self.share = budget_bytes // 4
        self.evictable_after_s = evictable_after_s
        self.total = 0
        self.by_address: dict[str | None, int] = {}
        self.arriving: dict[str | None, dict[Body, None]] = {}  # per address, longest arriving first

    def begin(self, body: Body) -> None:
        self.arriving.setdefault(body.address, {})[body] = None

    def add(self, body: Body, nbytes: int, now: float) -> bool:
        """Counts `nbytes` more of `body`, making room first where they do not fit; False when
        there is none to make."""
        while not self.fits(body.address, nbytes):
            victim = self.victim(body, nbytes, now)
            if victim is None:
                return False
            self.evict(victim)
        self.total += nbytes
        self.by_address[body.address] = self.by_address.get(body.address, 0) + nbytes
        body.held += nbytes
        return True

    def fits(self, address: str | None, nbytes: int) -> bool:
        return self.total + nbytes <= self.budget and self.by_address.get(address, 0) + nbytes <= self.share

    def victim(self, body: Body, nbytes: int, now: float) -> Body | None:
        own = self.by_address.get(body.address, 0)
        if own + nbytes > self.share:
            return self.longest_arriving(body.address, body, now - self.evictable_after_s)
        heaviest = max(self.by_address, key=self.by_address.__getitem__, default=None)
        if heaviest is not None and heaviest != body.address and self.by_address[heaviest] > own + nbytes:
            return self.longest_arriving(heaviest, body, None)
        return None

    def longest_arriving(self, address: str | None, besides: Body, began_by: float | None) -> Body | None:
        for candidate in self.arriving.get(address, {}):
            if candidate is not besides and candidate.held and (began_by is None or candidate.started <= began_by):
                return candidate
            if began_by is not None and candidate.started > began_by:
                return None  # the rest began later still
        return None

    def evict(self, victim: Body) -> None:
        self.arrived(victim)
        self.release(victim)
        if not victim.evicted.done():
            victim.evicted.set_result(None)

    def arrived(self, body: Body) -> None:
        """The body is complete (or refused): no longer one to take, its bytes still counted."""
        line = self.arriving.get(body.address)
        if line is not None:
            line.pop(body, None)
            if not line:
                del self.arriving[body.address]

    def release(self, body: Body) -> None:
        """Gives back what `body` holds (its request answered, refused or gone)."""
        if body.held == 0:
            return
        self.total -= body.held
        left = self.by_address[body.address] - body.held
        body.held = 0
        if left:
            self.by_address[body.address] = left
        else:
            del self.by_address[body.address]


def busy() -> Refused:
    return Refused(503, "overloaded", "the server holds as many request bodies as it takes (from this client address, or in all); retry",
                   {"Retry-After": "1"})


class ProxyEdge:
    """The ASGI middleware (module docstring). WebSocket and lifespan scopes pass untouched: the
    ingress refuses WebSockets itself."""

    def __init__(self, app: ASGIApp, max_header_bytes: int, max_body_bytes: int, body_timeout_s: float,
                 body_budget_bytes: int = DEFAULT_BODY_BUDGET_BYTES, evictable_after_s: float = IDLE_EVICTABLE_S) -> None:
        self.app = app
        self.max_header_bytes, self.max_body_bytes, self.body_timeout_s = max_header_bytes, max_body_bytes, body_timeout_s
        self.ledger = BodyLedger(body_budget_bytes, evictable_after_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = scope["headers"]
        loop = asyncio.get_running_loop()
        body = Body(client_share_key(scope.get("client")), loop.time(), loop.create_future())
        try:
            if sum(len(name) + len(value) + HEADER_OVERHEAD for name, value in headers) > self.max_header_bytes:
                raise Refused(431, "headers_too_large", f"the request's headers are over {self.max_header_bytes} bytes")
            scope = {**scope, "headers": [(name, value) for name, value in headers if name.lower() not in DROPPED_HEADERS]}
            chunks = await self.read_body(scope, receive, body)
        except Refused as refused:  # (the intake's, answered as the intake answers it)
            for message in error_message(path, refused.status, refused.code, refused.message, refused.headers | {"Connection": "close"}):
                await send(message)
            return
        try:
            if chunks is not None:  # (None: the client went away before its body was complete, nobody to answer)
                await self.app(scope, replayed(chunks, receive), send)
        finally:
            self.ledger.release(body)

    async def read_body(self, scope: Scope, receive: Receive, body: Body) -> list[bytes] | None:
        """The body's chunks, each counted in the ledger as it arrives; None when its client left.
        What was counted is given back when refused, here, else by the caller once answered."""
        declared = next((ascii_count(value, max_digits=40) for name, value in scope["headers"] if name.lower() == b"content-length"), None)
        if declared is not None and declared > self.max_body_bytes:
            raise Refused(413, "payload_too_large", f"request body over {self.max_body_bytes} bytes")
        chunks: list[bytes] = []
        self.ledger.begin(body)
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await next_message(receive, body)
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    if body.held + len(chunk) > self.max_body_bytes:
                        raise Refused(413, "payload_too_large", f"request body over {self.max_body_bytes} bytes")
                    if chunk and not self.ledger.add(body, len(chunk), asyncio.get_running_loop().time()):
                        raise busy()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return chunks
        except TimeoutError:
            self.ledger.release(body)
            raise Refused(408, "request_timeout", f"the request body did not arrive within {self.body_timeout_s:g} s") from None
        except BaseException:  # refused, or the proxy cancelled the request: nothing stays counted
            self.ledger.release(body)
            raise
        finally:
            self.ledger.arrived(body)


async def next_message(receive: Receive, body: Body) -> Message:
    """The client's next message, or Refused 503 once the ledger has taken the body's bytes for
    another client's (BodyLedger). Only a body holding bytes can be taken: until it does (every
    request's first message, and the only one of most), the message is awaited without a race."""
    evicted = body.evicted
    if evicted.done():
        raise busy()
    if not body.held:
        return await receive()
    arriving = asyncio.ensure_future(receive())
    try:
        await asyncio.wait((arriving, evicted), return_when=asyncio.FIRST_COMPLETED)
    finally:  # (taken, timed out or cancelled: the pending receive goes too)
        if not arriving.done():
            arriving.cancel()
    if evicted.done():
        raise busy()
    return arriving.result()


def replayed(chunks: list[bytes], receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then the client's own (its disconnect)."""
    pending = list(chunks) or [b""]

    async def receive_replayed() -> Message:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        return await receive()

    return receive_replayed


def proxy_middlewares() -> list[Middleware]:
    """What Ray's proxy calls (PROXY_CALLBACK): the edge with the limits the GANSERVE_* variables of
    the proxy's process say (GANSERVE_MAX_HEADER_BYTES, _MAX_BODY_BYTES, _BODY_TIMEOUT_S, as for
    `serve`, and GANSERVE_RAY_BODY_BUDGET_BYTES)."""
    from service.settings import Settings

    settings = Settings()
    budget = int(os.environ.get(BODY_BUDGET_ENV, DEFAULT_BODY_BUDGET_BYTES))
    return [Middleware(ProxyEdge, max_header_bytes=settings.max_header_bytes, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s, body_budget_bytes=budget)]
