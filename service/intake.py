"""The HTTP edge every request passes, as one ASGI middleware:

- the body is read whole before any route sees it, bounded in bytes (413, chunked or not, and
  before a byte is read when Content-Length says so), in time (408 for a body that trickles in)
  and against the memory budget (503 when the bytes in flight would pass it);
- the client is watched for the rest of the request: a hang-up sets the request's
  `disconnected` event and stops its work (the pipeline's callback cancels it and its queued
  items are dropped) and the request counts as 499. Our HTTP protocol reports the hang-up itself
  (service/http_protocol.py); under another server a task per request waits on `receive()`;
- a compressed body (any `Content-Encoding` but identity) is refused with 415 before it is read;
- HEAD is answered as GET, without the body;
- a `Range` header the file routes cannot use (another unit than bytes, a range that ends before
  it starts, no range at all) is dropped, as RFC 9110 lets a server ignore it: Starlette answered
  it with a plain-text 400, the one error of the API that was not JSON (a hostile probe);
- a model operation's answer gets a `Server-Timing` header (queue, compute, encode, total);
- every model operation is timed and counted in `ganserve_requests_total` with its final
  status, whether a route answered it, validation refused it or the client left;
- what a request reserved from the memory budget is released when its response has been sent,
  all but its answer's bytes; those when they have left the process (our protocol says when:
  an answer a client does not read stays in the budget until it is read or the client dropped).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_payload
from service.digits import ascii_count
from service.http_protocol import DISCONNECT_EXTENSION, FLUSHED_EXTENSION, GAVE_UP_SLOT, STOPPING_EXTENSION, TRAILERS_TOO_LARGE
from service.memory import MemoryBudget, OverBudget

if TYPE_CHECKING:
    from service.encoder_backlog import EncoderBacklog

STATE_KEY = "ganserve"  # scope["state"][STATE_KEY] holds the request's RequestContext
BYTE_RANGE = re.compile(r"\s*(\d{0,19})\s*-\s*(\d{0,19})\s*")  # (a longer number is no file's offset, and int() refuses past 4,300 digits)


def usable_range(value: bytes) -> bool:
    """Whether a Range header is `bytes=` ranges each of which has a start or a suffix length,
    and ends no earlier than it starts."""
    unit, equals, ranges = value.decode("latin-1").partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return False
    parts = [BYTE_RANGE.fullmatch(part) for part in ranges.split(",") if part.strip()]
    return bool(parts) and all(part is not None and (part[1] or part[2]) and (not part[1] or not part[2] or int(part[1]) <= int(part[2]))
                               for part in parts)


def has_precondition(scope: Scope) -> bool:
    return any(name in (b"if-match", b"if-unmodified-since") for name, _ in scope["headers"])


def without_unusable_range(scope: Scope) -> Scope:
    """The scope without its Range where the server cannot use it (RFC 9110 §14.2 lets a server
    ignore a Range): one that is not `bytes=` ranges, or given in two header fields (the file
    server used the first, where a proxy in front may have read the other: 206 of bytes the client
    did not ask for)."""
    headers = scope["headers"]
    ranges = [value for name, value in headers if name == b"range"]
    if not ranges or (len(ranges) == 1 and usable_range(ranges[0])):
        return scope
    return {**scope, "headers": [(name, value) for name, value in headers if name != b"range"]}


@dataclass
class RequestContext:
    """What the edge knows about one request and shares with the request pipeline."""

    arrived: float  # time.monotonic()
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    on_disconnect: list[Callable[[], object]] = field(default_factory=list)  # what stops the request's work (the pipeline's)
    labels: tuple[str, str, str] | None = None  # (model, version, operation), set by the pipeline
    client: str = ""  # the peer's address: who a memory refusal's claim is for (service/memory.py `MemoryClaim`)
    reserved: int = 0  # bytes held from the memory budget until the response is sent
    encode_micros: list[int] = field(default_factory=list)  # counted in the encoder pool's backlog until the answer is encoded (`encoded`)
    timing: dict[str, float] = field(default_factory=dict)  # stage seconds for Server-Timing (queue, compute: the batcher's)
    timeout_s: float | None = None  # the client's own deadline, where it asked for one shorter than the server's (v2's `timeout`)

    def encoded(self, backlog: "EncoderBacklog") -> None:
        """The answer is encoded (or never will be): its seconds leave the encoder pool's backlog."""
        for micros in self.encode_micros:
            backlog.remove_micros(micros)
        self.encode_micros.clear()

    def client_left(self) -> None:
        """The client hung up: wakes whoever waits on `disconnected` and stops the request's work."""
        self.disconnected.set()
        for stop in list(self.on_disconnect):
            stop()


def peer_host(scope: Scope) -> str:
    """The client's address as the server saw it (a proxy's, behind one; "" where unknown)."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def context_of(scope: Scope) -> RequestContext | None:
    return scope.get("state", {}).get(STATE_KEY)


def error_message(path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> tuple[Message, Message]:
    body = json.dumps(error_payload(path, status, message, code), separators=(",", ":")).encode()  # compact, as the routes' JSON errors are
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": raw}, {"type": "http.response.body", "body": body}


def unsatisfiable_range(path: str, start: Message) -> tuple[Message, Message]:
    """A file route's 416 (a Range past the file's end, or a suffix of 0 bytes), which Starlette
    answers as an empty `text/plain`, as the API's JSON error, its `Content-Range` (the file's
    length, RFC 9110 §15.5.17) kept: every other error is JSON (a hostile probe)."""
    content_range = next((value.decode("latin-1") for name, value in start.get("headers", []) if name.lower() == b"content-range"), "")
    length = content_range.rpartition("/")[2]
    return error_message(path, 416, "range_not_satisfiable",
                         f"the Range asked for is not within the file{f' of {length} bytes' if length.isdigit() else ''}",
                         {"Content-Range": content_range} if content_range else None)


def http_date(value: str | None) -> float | None:
    """An HTTP date as a timestamp; None where absent or not a date (RFC 9110 §13.1.4: then ignored)."""
    try:
        return parsedate_to_datetime(value).timestamp() if value else None
    except (TypeError, ValueError, OverflowError):
        return None


def failed_precondition(path: str, request: Headers, start: Message) -> tuple[Message, Message] | None:
    """A file route's 412 where the request's `If-Match` (strong comparison, `*` any file) or,
    without it, `If-Unmodified-Since` does not hold for the file it is about to send (RFC 9110
    §13.2.2, steps 1–2); None where it holds or the answer has no validator to test it against.
    Starlette reads neither, so a client resuming a download "only if it is still the file I had"
    got a range of a new file (206)."""
    answer = Headers(raw=start.get("headers", []))
    if (if_match := request.get("if-match")) is not None:
        tags, etag = [tag.strip() for tag in if_match.split(",")], answer.get("etag")
        holds = etag is None or "*" in tags or (not etag.startswith("W/") and etag in tags)
    else:
        since, modified = http_date(request.get("if-unmodified-since")), http_date(answer.get("last-modified"))
        holds = since is None or modified is None or modified <= since
    return None if holds else error_message(path, 412, "precondition_failed", "the file is not the one the request's If-Match or "
                                                                              "If-Unmodified-Since names; fetch it again without them")


def refuse_compressed(headers: list[tuple[bytes, bytes]]) -> None:
    """415 for a body in any coding but identity, in any Content-Encoding header (a proxy may read
    the first of two, where a dict keeps the last) or position of its list. Compressed bodies were
    read as they came (tritonclient's gzip request got "not valid JSON (UnicodeDecodeError)");
    inflating one would cost what no limit checked first."""
    if compressed := [coding for coding in header_items(headers, b"content-encoding") if coding not in (b"", b"identity")]:
        raise Refused(415, "unsupported_media_type", f"request bodies are taken uncompressed (Content-Encoding "
                                                     f"{compressed[0].decode('latin-1')[:40]!r}); send it without compression")


def header_items(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The members of every `name` header's comma-separated list, trimmed and lower-cased."""
    return [item.strip().lower() for key, value in headers if key == name for item in value.split(b",")]


def refuse_unknown_expectations(headers: list[tuple[bytes, bytes]]) -> None:
    """417 for an Expect other than 100-continue (RFC 9110 §10.1.1): it was answered as if met."""
    if unknown := [item for item in header_items(headers, b"expect") if item not in (b"", b"100-continue")]:
        raise Refused(417, "expectation_failed", f"the server meets no expectation but 100-continue (Expect {unknown[0].decode('latin-1')[:40]!r})")


def refuse_ambiguous_framing(scope: Scope) -> None:
    """400 for a request two parsers may read two ways (RFC 9112 §3.2, RFC 9110 §5.3): no `Host`
    on HTTP/1.1 or more than one, or two `Content-Type`s (the route read the first, the intake's
    checks the last), and 505 for a version other than HTTP/1.0 or 1.1 (`HTTP/2.0` in a request
    line was served as 1.1). A proxy in front and this server could otherwise disagree about
    which host or media type a request has (GANSERVE_ALLOWED_HOSTS checks one of them)."""
    hosts = types = 0
    for name, _ in scope["headers"]:
        if name == b"host":
            hosts += 1
        elif name == b"content-type":
            types += 1
    version = scope.get("http_version", "1.1")
    if version not in ("1.1", "1.0"):
        raise Refused(505, "http_version_not_supported", f"the server speaks HTTP/1.1 (and 1.0); the request line says HTTP/{version[:8]}")
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        raise Refused(400, "bad_request", "an HTTP/1.1 request carries exactly one Host header" + (f"; this one has {hosts}" if hosts else ""))
    if types > 1:
        raise Refused(400, "bad_request", "the request gives Content-Type more than once: send it once")


def refuse_unsupported_upgrade(headers: list[tuple[bytes, bytes]], length: int | None) -> None:
    """400 for a request with a body that asks to switch to a protocol this server does not speak
    (`Connection: Upgrade`, `Upgrade: h2c`): the HTTP parser stops at its headers, so the route
    would see no body (a valid JSON body was answered "needs a JSON body"); the connection closes
    after the answer (service/http_protocol.py). Without a body it is served, the upgrade ignored."""
    if not length and not any(name == b"transfer-encoding" for name, _ in headers):
        return
    upgrades = header_items(headers, b"upgrade")
    if b"upgrade" in header_items(headers, b"connection") and upgrades != [b"websocket"]:
        shown = b", ".join(upgrades).decode("latin-1")[:40]
        raise Refused(400, "bad_request", f"this server does not switch protocols (Upgrade {shown!r}), and the body of a request "
                                          "asking to is not read: send it without Connection: Upgrade")


def refuse_transfer_codings(headers: list[tuple[bytes, bytes]]) -> None:
    """501 for a transfer coding other than chunked (RFC 9112 §6.1): the HTTP parser unchunks a
    body and passes any other coding's bytes on as they came (`gzip, chunked` was read as plain)."""
    if unknown := [item for item in header_items(headers, b"transfer-encoding") if item not in (b"", b"chunked")]:
        raise Refused(501, "not_implemented", f"the server takes no transfer coding but chunked (Transfer-Encoding "
                                              f"{unknown[0].decode('latin-1')[:40]!r}); send the body as it is, chunked or with a Content-Length")


def with_server_timing(start: Message, context: RequestContext) -> Message:
    """The response start with a `Server-Timing` header: the batcher's queue and compute stages,
    the encode stage the route reported (its own `Server-Timing`), and the total so far, in ms."""
    headers = list(start.get("headers", []))
    parts = [f"{stage};dur={1000 * seconds:.2f}" for stage, seconds in context.timing.items()]
    for i, (name, value) in enumerate(headers):
        if name.lower() == b"server-timing":
            parts.append(value.decode("latin-1"))
            del headers[i]
            break
    parts.append(f"total;dur={1000 * (time.monotonic() - context.arrived):.2f}")
    headers.append((b"server-timing", ", ".join(parts).encode("latin-1")))
    return {**start, "headers": headers}


# a body past this (or chunked, or after `Expect: 100-continue`) is not read for an upload route that
# refuses the request on its headers (`RequestIntake.refuse_on_headers`); a smaller one costs less to read
HEADER_CHECKED_BODY_BYTES = 64 * 1024


def body_worth_not_reading(headers: dict[bytes, bytes], length: int | None) -> bool:
    """Whether a refusal the headers decide should come before the body is read: one declared past
    HEADER_CHECKED_BODY_BYTES, a chunked one (its size unknown), or one sent after `Expect:
    100-continue` (the `100 Continue` goes out with the first read). Such a refusal closes the
    connection, its body unread; a small body is cheaper read and refused by its route."""
    return b"expect" in headers or b"transfer-encoding" in headers or (length or 0) > HEADER_CHECKED_BODY_BYTES


def media_type(headers: dict[bytes, bytes]) -> str:
    """The request's media type, lower-cased and without parameters (`charset=…`)."""
    return headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def cross_site_origin(headers: dict[bytes, bytes], trusted_origins: frozenset[str] = frozenset()) -> str | None:
    """The `Origin` of a request a browser sent from another site's page, None for any other
    request. Browsers send `Origin` with every cross-site POST and WebSocket handshake, and a form
    post or a `no-cors` fetch needs no preflight, so without this a page anywhere could spend a
    visitor's share of this server: a probe's page started projection jobs (the visitor's own
    were then 429) and read upscales over a WebSocket (no CORS applies to those). Clients such as
    tritonclient or curl send none. An origin naming the host the request was sent to (its `Host`)
    is the server's own pages'; `trusted_origins` (GANSERVE_TRUSTED_ORIGINS) are others allowed."""
    origin = headers.get(b"origin")
    if origin is None:
        return None
    text = origin.decode("latin-1")
    if normal_origin(text) in trusted_origins:
        return None
    try:
        netloc = urlsplit(text.strip()).netloc.lower()
    except ValueError:  # ("http://[::1" and the like)
        return text
    return None if netloc and netloc == headers.get(b"host", b"").decode("latin-1").strip().lower() else text


def host_name(host: str) -> str:
    """The name in a Host header, without its port (an IPv6 literal keeps no brackets). What
    follows the name must be a port: `127.0.0.1:8813.evil.com` and `[::1]evil.com` were read as
    the addresses they start with (no browser sends them; they are kept whole, and so refused)."""
    host = host.strip().lower()
    if host.startswith("["):
        literal, _, rest = host[1:].partition("]")
        return literal if rest == "" or (rest[0] == ":" and rest[1:].isdigit()) else host
    name, colon, port = host.rpartition(":")
    return name if colon and host.count(":") == 1 and port.isdigit() else host


def local_or_address(name: str) -> bool:
    """An IP address, localhost or a name under `.localhost`: no other site's page can be served
    from them, so no page is same-site to this server through them (DNS rebinding needs a name)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def unlisted_host(headers: dict[bytes, bytes], allowed_hosts: frozenset[str]) -> str | None:
    """The name in a request's `Host` where GANSERVE_ALLOWED_HOSTS is set and that name is neither
    in it nor an address or localhost; None for any other request (one without a Host is HTTP/1.0,
    no browser's). DNS rebinding: a page on a name an attacker controls, whose
    address the attacker then points at this server, is same-site to itself, so the site check
    (`cross_site_origin`) lets its posts through and its reads are its own; the name in its Host
    is the attacker's."""
    host = headers.get(b"host")
    if not allowed_hosts or host is None:
        return None
    name = host_name(host.decode("latin-1"))
    return None if name in allowed_hosts or local_or_address(name) else name


def allowed_host_set(names: Sequence[str]) -> frozenset[str]:
    """GANSERVE_ALLOWED_HOSTS as `unlisted_host` compares names: lower case (`host_name` lowers the Host's)."""
    return frozenset(name.strip().lower() for name in names)


def refuse_unlisted_host(name: str) -> ApiError:
    return ApiError(421, f"this server answers requests sent to an IP address, localhost or a name in GANSERVE_ALLOWED_HOSTS, "
                         f"not to {name[:100]!r}")


def normal_origin(origin: str) -> str:
    """An origin as `cross_site_origin` compares it with the trusted ones: lower case, no trailing slash."""
    return origin.strip().rstrip("/").lower()


def trusted_origin_set(origins: Sequence[str]) -> frozenset[str]:
    """GANSERVE_TRUSTED_ORIGINS, each as `normal_origin` writes it."""
    return frozenset(normal_origin(origin) for origin in origins)


def refuse_cross_site(origin: str) -> ApiError:
    return ApiError(403, f"this server does not take requests a browser sends from another site's page (Origin {origin[:100]!r}): "
                         "send them from a client or from this server's own pages, or list that site in GANSERVE_TRUSTED_ORIGINS")


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def operation_of(scope: Scope) -> str | None:
    """The operation a model route performs (`generate`, `upscale`, `infer`, …), None for the rest."""
    route = scope.get("route")
    path = getattr(route, "path", "")
    if scope.get("method") != "POST" or "{name}" not in path:
        return None
    return path.rstrip("/").rsplit("/", 1)[-1]


def not_json(media: str) -> str | None:
    """The 415's message for a body of media type `media` (lower case, parameters left off) sent to
    a route that reads only JSON, None for JSON: said the same before its body is read (here) and
    after (service/pipeline.py `require_json`)."""
    if media == "application/json":
        return None
    return f"send the request body as application/json (got {media or 'no content type'!r})"


class RequestIntake:
    """`json_routes`: the routes that read only a JSON body of at most `max_json_body_bytes`
    (service/pipeline.py JsonBodyRoute); a body declared past that bound for one of them is 413
    before it is read (it was read whole, up to `max_body_bytes`, then refused). They are matched
    only for such a body, so routing twice costs nothing on the common path."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float, max_json_body_bytes: int | None = None,
                 json_routes: Sequence[BaseRoute] = (), upload_routes: Sequence[BaseRoute] = (), trusted_origins: Sequence[str] = (),
                 allowed_hosts: Sequence[str] = ()) -> None:
        self.app = app
        self.trusted_origins = trusted_origin_set(trusted_origins)
        self.allowed_hosts = allowed_host_set(allowed_hosts)  # empty: any Host is answered
        self.limit = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.json_limit = max_json_body_bytes if max_json_body_bytes is not None else max_body_bytes
        self.json_routes = tuple(json_routes)
        self.upload_routes = tuple(upload_routes)  # routes whose endpoint is `checked_on_headers` (service/pipeline.py)

    def takes_json_only(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] is Match.FULL for route in self.json_routes)

    def refuse_on_headers(self, scope: Scope) -> None:
        """An upload route's refusals from the path and headers alone (`checked_on_headers`), before
        a body worth not reading is read (`body_worth_not_reading`). A small body is read as before:
        the route says the same once it has it."""
        for route in self.upload_routes:
            matched, child = route.matches(scope)
            if matched is Match.FULL:
                try:
                    route.endpoint.checked_on_headers(Request({**scope, **child}), route)
                except ApiError as error:
                    raise Refused(error.status, error.code, error.message, error.headers) from None
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            # answered as the GET would be (its status and headers) and the body left out by the
            # HTTP server, which reads the method from its own scope: load balancers' health checks
            # and link checkers send HEAD, and FastAPI's routes answered it 405 (only mounts took it)
            scope = {**scope, "method": "GET"}
        if scope["method"] == "GET":
            scope = without_unusable_range(scope)
        context = RequestContext(time.monotonic(), client=peer_host(scope))
        scope.setdefault("state", {})[STATE_KEY] = context
        registry = getattr(scope["app"].state, "registry", None)
        budget: MemoryBudget | None = registry.memory if registry is not None else None
        status = {"code": 500}
        final_body_sent = False
        answer_bytes = 0
        replaced_body = False  # a file route's answer was replaced by the API's JSON error (416, 412): its own body is dropped

        async def tracking_send(message: Message) -> None:
            nonlocal final_body_sent, answer_bytes, replaced_body
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                replaced = None
                if message["status"] == 416:
                    replaced = unsatisfiable_range(scope.get("path", ""), message)
                elif message["status"] in (200, 206, 304) and scope["method"] == "GET" and has_precondition(scope):
                    replaced = failed_precondition(scope.get("path", ""), Headers(scope=scope), message)
                if replaced is not None:
                    start, message = replaced
                    status["code"] = start["status"]
                    await send(start)
                    replaced_body = final_body_sent = True
                    answer_bytes += len(message["body"])
                elif context.labels is not None or operation_of(scope) is not None:  # a model operation: its stages, for clients and the playground
                    message = with_server_timing(message, context)
            elif message["type"] == "http.response.body" and replaced_body:
                return
            elif message["type"] == "http.response.body":
                answer_bytes += len(message.get("body", b""))
                final_body_sent = not message.get("more_body", False)
            await send(message)

        try:
            try:
                body = await self.read_body(scope, receive, context, budget)
            except Refused as refused:
                start, message = error_message(scope.get("path", ""), refused.status, refused.code, refused.message, refused.headers | {"Connection": "close"})
                await tracking_send(start)
                await tracking_send(message)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await context.disconnected.wait()
                return {"type": "http.disconnect"}

            def hung_up() -> None:
                if not final_body_sent:
                    context.client_left()

            told = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
            if told is not None:  # our protocol calls back when the connection is lost (service/http_protocol.py)
                told.append(hung_up)
                await self.app(scope, replay, tracking_send)
                return

            async def watch() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        hung_up()
                        return

            watcher = asyncio.ensure_future(watch())
            try:
                await self.app(scope, replay, tracking_send)
            finally:
                watcher.cancel()
        finally:
            if budget is not None:
                self.release(scope, budget, context.reserved, answer_bytes)
            if (backlog := getattr(registry, "encoding", None)) is not None:
                context.encoded(backlog)  # a request that ended before its answer was encoded (504, 499, an error)
            self.account(scope, context, 499 if context.disconnected.is_set() else status["code"], registry)

    @staticmethod
    def release(scope: Scope, budget: MemoryBudget, reserved: int, answer_bytes: int) -> None:
        """Gives back what the request reserved: at once, but for as much as its answer's bytes,
        which stay reserved until they have left the process (where our protocol can tell)."""
        flushed = scope.get("extensions", {}).get(FLUSHED_EXTENSION)
        held = min(reserved, answer_bytes) if flushed is not None else 0
        budget.release(reserved - held)
        if held:
            flushed(lambda: budget.release(held))

    async def read_body(self, scope: Scope, receive: Receive, context: RequestContext, budget: MemoryBudget | None) -> bytes:
        headers = dict(scope.get("headers") or [])
        if self.allowed_hosts and (name := unlisted_host(headers, self.allowed_hosts)) is not None:
            refused = refuse_unlisted_host(name)
            raise Refused(refused.status, refused.code, refused.message)
        if b"origin" in headers and scope["method"] not in SAFE_METHODS and (origin := cross_site_origin(headers, self.trusted_origins)) is not None:
            refused = refuse_cross_site(origin)
            raise Refused(refused.status, refused.code, refused.message)
        refuse_ambiguous_framing(scope)
        length = ascii_count(headers.get(b"content-length"), max_digits=40)
        if b"upgrade" in headers:
            refuse_unsupported_upgrade(scope["headers"], length)
        if b"content-encoding" in headers and (length or b"transfer-encoding" in headers):  # (a bodyless GET passes)
            refuse_compressed(scope["headers"])
        if b"transfer-encoding" in headers:
            refuse_transfer_codings(scope["headers"])
        if b"expect" in headers:
            refuse_unknown_expectations(scope["headers"])
        if length is not None and length > self.limit:
            raise Refused(413, "payload_too_large", f"request body over {self.limit} bytes")
        worth_not_reading = body_worth_not_reading(headers, length)
        if (worth_not_reading or (length or 0) > self.json_limit) and (wrong := not_json(media_type(headers))) and self.takes_json_only(scope):
            # refused before its body is read, as the 413 below: a JSON route sent 8 MB as text/xml read it all
            # (after a `100 Continue`), and one declared past the JSON bound was told its size, not its mistake.
            # A small body is read and the route says the same, on a connection that stays open.
            raise Refused(415, "unsupported_media_type", wrong)
        if length is not None and length > self.json_limit and self.takes_json_only(scope):  # (it was read whole, then refused)
            raise Refused(413, "payload_too_large", f"the JSON body is {length} bytes; this operation takes at most {self.json_limit} "
                                                    "(GANSERVE_MAX_JSON_BODY_BYTES)")
        if worth_not_reading:
            self.refuse_on_headers(scope)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(max(0.0, context.arrived + self.body_timeout_s - time.monotonic())):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        context.client_left()
                        raise Refused(499, "client_closed_request", "the client went away while sending its body")
                    if (stopping := scope.get("extensions", {}).get(STOPPING_EXTENSION)) == TRAILERS_TOO_LARGE:
                        raise Refused(431, "headers_too_large", "the trailer fields after the request's chunked body are over "
                                                                 "the headers' limit (GANSERVE_MAX_HEADER_BYTES)")
                    if stopping:
                        raise Refused(503, "too_many_connections" if stopping == GAVE_UP_SLOT else "unavailable",
                                      "the server is at its connection cap, and this request's body was still arriving from an address "
                                      "holding more connections than the newcomer's: its connection went to a newcomer; retry"
                                      if stopping == GAVE_UP_SLOT else "the server is shutting down before this request's body arrived; retry",
                                      {"Retry-After": "1"})
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        raise Refused(413, "payload_too_large", f"request body over {self.limit} bytes")
                    if chunk and budget is not None:
                        try:
                            budget.try_reserve(len(chunk))
                        except OverBudget as error:
                            if error.permanent or (length is not None and length > error.capacity):  # retrying cannot help
                                raise Refused(413, "too_expensive", f"this request's body is {max(size, length or 0)} bytes; the server's memory budget "
                                                                   f"for requests is {error.capacity / 2**20:.0f} MiB (GANSERVE_MEMORY_BUDGET less "
                                                                   "what the loaded models hold)")
                            raise Refused(503, "overloaded", "the server's memory budget is taken by requests in flight; retry later", {"Retry-After": "1"})
                        context.reserved += len(chunk)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise Refused(408, "request_timeout", f"the request body did not arrive within {self.body_timeout_s:g} s")

    @staticmethod
    def account(scope: Scope, context: RequestContext, status: int, registry) -> None:
        operation = operation_of(scope)
        # an engine's HTTP requests are what fronts forwarded (projections, model control), and each was
        # counted by its front already: /metrics sums every process's series, so they counted twice
        if registry is None or operation is None or registry.settings.role == "engine":
            return
        if context.labels is None:  # refused before the pipeline saw it (validation, unknown model, …)
            name = scope.get("path_params", {}).get("name", "")
            context.labels = (name if name in registry.models else "unknown", "", operation)
        metrics = registry.metrics.bound(*context.labels)
        metrics.requests(str(status)).inc()
        metrics.request_duration.observe(time.monotonic() - context.arrived)
