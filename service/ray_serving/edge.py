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
  the replica hold their copies that long): past its budget, or past a quarter of it from one
  client address, 503 with Retry-After. The ingress then gets the body at once, so a slow body
  holds none of its slots.

What only the HTTP server itself could do stays undone: connections that send nothing, headers
that trickle in, answers never read (uvicorn in Ray's proxy has no connection cap, header timeout
or send timeout). docs/ray.md says what to put in front."""
from __future__ import annotations

import asyncio
import json
import os

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.connection_table import client_share_key
from service.digits import ascii_count
from service.errors import error_payload

DROPPED_HEADERS = {b"x-request-id", b"x-request-timeout-seconds"}  # Ray's own request id and timeout: not the client's
HEADER_OVERHEAD = 4  # ": " and CRLF of each header line, as the single server counts them
DEFAULT_BODY_BUDGET_BYTES = 512 * 2**20
BODY_BUDGET_ENV = "GANSERVE_RAY_BODY_BUDGET_BYTES"  # the proxy's body budget (the BodyLedger's)
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "service.ray_serving.edge:proxy_middlewares"


class BodyLedger:
    """Bytes of request bodies one proxy holds for requests not yet answered: in all, and per
    client address (a share key: an IPv6 client by its /64), one address at most a quarter."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.share = budget_bytes // 4
        self.total = 0
        self.by_address: dict[str | None, int] = {}

    def take(self, address: str | None, nbytes: int) -> bool:
        held = self.by_address.get(address, 0)
        if self.total + nbytes > self.budget or held + nbytes > self.share:
            return False
        self.total += nbytes
        self.by_address[address] = held + nbytes
        return True

    def give_back(self, address: str | None, nbytes: int) -> None:
        if nbytes == 0:
            return
        self.total -= nbytes
        left = self.by_address[address] - nbytes
        if left:
            self.by_address[address] = left
        else:
            del self.by_address[address]


class Refused(Exception):
    def __init__(self, status: int, message: str, retry_after_s: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after_s, self.code = status, message, retry_after_s, code  # code: as the single server names it


class ProxyEdge:
    """The ASGI middleware (module docstring). WebSocket and lifespan scopes pass untouched: the
    ingress refuses WebSockets itself."""

    def __init__(self, app: ASGIApp, max_header_bytes: int, max_body_bytes: int, body_timeout_s: float,
                 body_budget_bytes: int = DEFAULT_BODY_BUDGET_BYTES) -> None:
        self.app = app
        self.max_header_bytes, self.max_body_bytes, self.body_timeout_s = max_header_bytes, max_body_bytes, body_timeout_s
        self.ledger = BodyLedger(body_budget_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        address = client_share_key(scope.get("client"))
        headers = scope["headers"]
        try:
            if sum(len(name) + len(value) + HEADER_OVERHEAD for name, value in headers) > self.max_header_bytes:
                raise Refused(431, f"the request's headers are over {self.max_header_bytes} bytes", code="headers_too_large")
            scope = {**scope, "headers": [(name, value) for name, value in headers if name.lower() not in DROPPED_HEADERS]}
            chunks = await self.read_body(scope, receive, address)
        except Refused as refused:  # (what read_body had counted it gave back)
            await answer_refusal(send, path, refused)
            return
        if chunks is None:
            return  # the client went away before its body was complete: nobody to answer
        held = sum(len(chunk) for chunk in chunks)
        try:
            await self.app(scope, replayed(chunks, receive), send)
        finally:
            self.ledger.give_back(address, held)

    async def read_body(self, scope: Scope, receive: Receive, address: str | None) -> list[bytes] | None:
        """The body's chunks, each counted in the ledger as it arrives: given back by the caller once
        the request is answered, or here when the body is refused or its client leaves (None)."""
        declared = next((ascii_count(value, max_digits=40) for name, value in scope["headers"] if name.lower() == b"content-length"), None)
        if declared is not None and declared > self.max_body_bytes:
            raise Refused(413, f"request body over {self.max_body_bytes} bytes")
        chunks: list[bytes] = []
        held = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self.ledger.give_back(address, held)
                        return None
                    chunk = message.get("body", b"")
                    if held + len(chunk) > self.max_body_bytes:
                        raise Refused(413, f"request body over {self.max_body_bytes} bytes")
                    if chunk and not self.ledger.take(address, len(chunk)):
                        raise Refused(503, "the server holds as many request bodies as it takes (from this client, or in all); retry", 1)
                    held += len(chunk)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return chunks
        except TimeoutError:
            self.ledger.give_back(address, held)
            raise Refused(408, f"the request body did not arrive within {self.body_timeout_s:g} s") from None
        except BaseException:  # refused, or the proxy cancelled the request: nothing stays counted
            self.ledger.give_back(address, held)
            raise


def replayed(chunks: list[bytes], receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then the client's own (its disconnect)."""
    pending = list(chunks) or [b""]

    async def receive_replayed() -> Message:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        return await receive()

    return receive_replayed


async def answer_refusal(send: Send, path: str, refused: Refused) -> None:
    body = json.dumps(error_payload(path, refused.status, refused.message, refused.code), separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    if refused.retry_after_s is not None:
        headers.append((b"retry-after", str(refused.retry_after_s).encode()))
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """What Ray's proxy calls (PROXY_CALLBACK): the edge with the limits the GANSERVE_* variables of
    the proxy's process say (GANSERVE_MAX_HEADER_BYTES, _MAX_BODY_BYTES, _BODY_TIMEOUT_S, as for
    `serve`, and GANSERVE_RAY_BODY_BUDGET_BYTES)."""
    from service.settings import Settings

    settings = Settings()
    budget = int(os.environ.get(BODY_BUDGET_ENV, DEFAULT_BODY_BUDGET_BYTES))
    return [Middleware(ProxyEdge, max_header_bytes=settings.max_header_bytes, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s, body_budget_bytes=budget)]
