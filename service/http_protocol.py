"""uvicorn's HTTP and WebSocket protocols with the guards uvicorn lacks:

- a **header timeout**: a connection that does not finish a request's headers within
  `header_timeout_s` of connecting (or of the request's first byte, on a kept-alive connection,
  or of the empty lines a client sends between requests, which stop uvicorn's keep-alive timer
  without beginning a request) gets 408 and is closed, so half-sent requests cannot hold sockets
  open for good;
- a **header size cap**: a request whose headers go past `max_header_bytes` gets 431 and the
  connection is closed, before the parser sees more of them. httptools builds a header's value by
  appending each piece to a string, so parsing one 32 MiB header took 2.6 s of the event loop
  (every other client waited) and 64 MiB 5 s; counted per read, so at most one read (256 KiB) past the cap is parsed,
  and only up to the headers' blank line (a body in the same read is no header);
- a **trailer cap**: the trailer fields after a chunked body are dropped (RFC 9110 lets a
  recipient discard them; uvicorn appended them to the request's headers after the app had
  begun) and counted against `max_header_bytes`, as the bytes after the last chunk that are no
  body; past it the request is answered 431 by the intake and the connection closed. They were
  counted by no limit: a hostile probe's 400 MiB of trailer lines on a 11-byte chunked body were
  answered 200 and took the process up 470 MB for good, each time;
- a **pipeline cap**: past `MAX_PIPELINED` requests queued behind the running one on a connection,
  the rest are dropped unread and the connection closes after the queued answers (uvicorn queued
  them without bound: ~2.8 KB of server memory per 64-byte GET);
- a **connection cap**: past `max_connections` open connections a connection that is only waiting
  for a request is closed to make room, else one whose request's body is still arriving (answered
  503), else one whose client has fallen behind reading its answer (aborted); never one whose
  request was accepted and whose client keeps up (which one: service/connection_table.py, by
  address, the newcomer's own or one holding two more connections); where there is none, the new
  one is answered 503 (JSON, like every error) and shut, its request read and dropped for
  `REFUSED_LINGER_S` before the close;
- an **upgrade to a protocol not served** (`Upgrade: h2c`, CONNECT) ends the connection after
  its answer, what follows it unread: the parser stops at such a request's headers, and a body
  arriving after them was read as a request of its own (h2c smuggling); a WebSocket handshake
  carries at most `MAX_UPGRADE_HEADERS` header fields (431), since websockets parses them again;
- a **send timeout** (`WriteStallGuard`, HTTP and WebSocket): a peer that reads nothing of what
  it was sent for `send_timeout_s` while the write buffer is over its high-water mark is
  disconnected. A stream client that never read its answers held its stream slot, and its unsent
  bytes, for as long as it kept the socket (a hostile probe held all 32 slots for minutes);
- on WebSockets (`GuardedWebSocketProtocol`), **pongs are skipped while the write buffer is
  over its high-water mark** (RFC 6455 allows answering only the latest ping: a ping flood from a
  client that does not read grew the server by ~24 MB/s), and **a message in more than
  `MAX_FRAGMENTS` frames closes the connection with 1009** (websockets' `max_size` counts payload
  bytes only, so a flood of empty continuation frames was parsed without end on the event loop),
  and **a connection sending more than `GANSERVE_STREAM_MAX_MESSAGES_PER_S` messages (text,
  binary, ping, pong; 240 by default, after a burst of twice as many) or `MAX_SMALL_FRAMES_PER_S`
  continuation frames under `SMALL_FRAME_BYTES` a second (after a burst of `SMALL_FRAME_BURST`;
  a client's 4 KiB fragments of a large frame do not count: they were closed at 30 frames a
  second) is closed with 1008**; a new connection's bursts are what its address has earned,
  one whole burst a second past its first 16, never fewer than `MIN_OPENING_MESSAGES` and
  `MIN_OPENING_SMALL_FRAMES` (a client reconnecting in a loop started each connection with a
  whole burst: ~272,000 frames a second from one socket). A read (up to 256 KiB) is parsed in
  pieces of at most `FEED_BYTES`, and no larger than what the budgets have left can cover, the
  budget checked between pieces: one client's 30,000
  one-byte frames every half second (8 MB in 20 s) held the event loop for seconds at a time,
  every other client's requests with it (a hostile probe: benign p99 7.0 s, `/health/live` 1.7 s;
  websockets parses ~37,000 such frames from one read, 118 ms, before uvicorn and the stream
  handle each).

Warnings any client can cause at will (a malformed request, a malformed multipart body) are
logged at most once every `CLIENT_WARNING_EVERY_S` (`ClientCausedWarnings`), the INFO lines
written per WebSocket connection not at all (`PerConnectionLines`), and Pillow's warnings about
an upload's contents not at all (`quiet_client_caused_output`).

It also tells the request intake (service/intake.py) two things about a connection:
- when a client hangs up mid-request: callbacks the intake puts in
  `scope["extensions"][DISCONNECT_EXTENSION]` run when the connection is lost before the response
  is complete. Without it the intake would watch with a task per request, blocked on `receive()`
  (what it still does under another server);
- when the server shuts down while a request's body is still arriving
  (`scope["extensions"][STOPPING_EXTENSION]`, and its `receive()` returns at once): such a request
  was never accepted, and the intake answers it 503 instead of waiting for the rest of its body.
  A client that had sent only the headers held every shutdown for the body timeout (31.7 s,
  against 1.5 s without it);
- when an answer has left the process: `scope["extensions"][FLUSHED_EXTENSION](callback)` runs
  the callback once the write buffer is back under its low-water mark (or the connection is
  gone), so the answer's bytes stay reserved in the memory budget while a client that does not
  read keeps them here (they were released when the answer was handed to the transport: a
  hostile probe held 2 GB of unread answers outside the budget). The WebSocket protocol offers
  the same to the upscale stream (service/streams.py).

The body's own timeout and size limit live in the ASGI middleware (service/intake.py), where
the answer can be JSON with the right status.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import warnings
import weakref
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets import http11 as websockets_http11
from websockets.datastructures import Headers as WebSocketHeaders
from websockets.http11 import Response as WebSocketResponse

from service.connection_table import IDLE_EVICTABLE_S, ConnectionTable, client_share_key
from service.errors import error_payload

DISCONNECT_EXTENSION = "ganserve.on_disconnect"  # a list of callables in the request's scope extensions
FLUSHED_EXTENSION = "ganserve.when_flushed"  # a callable: when_flushed(callback), the callback run once the answer left
# why the request's body will not be waited for, once it is: SHUTTING_DOWN, GAVE_UP_SLOT (its connection
# closed for a newcomer at the connection cap, service/connection_table.py), or TRAILERS_TOO_LARGE
STOPPING_EXTENSION = "ganserve.stopping"
SHUTTING_DOWN, GAVE_UP_SLOT, TRAILERS_TOO_LARGE = "shutting_down", "gave_up_slot", "trailers_too_large"
SERVER_SHUTDOWN_EXTENSION = "ganserve.on_server_shutdown"  # a list of callables: a WebSocket app that closes itself on shutdown
REFUSED_LINGER_S = 1.0  # how long a refused request's remaining bytes are read and dropped before the close
MAX_FRAGMENTS = 4096  # frames one WebSocket message may come in (a 64 MiB frame in 16 KiB pieces)
MAX_MESSAGES_PER_S = 240  # WebSocket messages a connection may send, by default (a live feed sends 30-120 frames a second), after a burst of twice as many
MIN_OPENING_MESSAGES, MIN_OPENING_SMALL_FRAMES = 32, 256  # what any new connection may send at once, whatever its address has used
# (at 16 of each, a client behind a NAT whose address had opened 16 streams was closed on its first frame in 512-byte fragments)
FEED_BYTES_PER_TOKEN = 8  # a piece parsed holds at most this many bytes per message or small frame left in the budget (a tiny frame is 7)
SMALL_FRAME_BYTES = 1024  # a continuation frame smaller than this is a "small frame" (larger ones are bounded by their bytes)
MAX_SMALL_FRAMES_PER_S, SMALL_FRAME_BURST = 2048, 1024  # small continuation frames a connection may send (a client's 4 KiB fragments are not)
FEED_BYTES = 16 * 1024  # a WebSocket read is parsed this much at a time, the budgets checked between pieces (≤ 2,340 frames)
MAX_PIPELINED = 64  # requests queued behind the one running on a connection; later ones are dropped and the connection closes
MAX_UPGRADE_HEADERS = 256  # header fields a WebSocket handshake may carry (websockets parses them all again, in Python)
CLIENT_WARNING_EVERY_S = 10.0  # a warning any client can cause (a malformed request) is logged at most this often


class PerConnectionLines(logging.Filter):
    """Drops the INFO lines uvicorn and websockets write for every WebSocket connection (`"WebSocket
    <path>" [accepted]`, `connection open`, `connection closed`, and for a refused handshake
    `"WebSocket <path>" 404`, `connection rejected (404 Not Found)`): the server runs without an
    access log, and a client opening upscale streams in a loop wrote three lines per handshake
    to the operator's log (a probe's refused handshakes, two each: 104,000 lines). Warnings and
    errors of the same loggers pass."""

    QUIET = frozenset({"connection open", "connection closed", '%s - "WebSocket %s" [accepted]', '%s - "WebSocket %s" 403',
                       '%s - "WebSocket %s" %d', "connection rejected (%d %s)", "HTTP response sent (%d %s)"})

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.msg not in self.QUIET


class ClientCausedWarnings(logging.Filter):
    """Lets through at most one of each warning a client causes at will (`Invalid HTTP request
    received.` for every malformed request, `Unsupported upgrade request.`, and any warning of
    python-multipart, which parses only clients' bodies) per `every_s`; the next one that passes
    says how many were left out since. A hostile probe's malformed requests wrote 495,000 such
    lines (20 MB) to the operator's log in a few minutes, one per request, and malformed multipart
    bodies 500 lines in 1.8 s. Each request is still answered as before; only the log is spared."""

    MESSAGES = frozenset({"Invalid HTTP request received.", "Unsupported upgrade request."})
    WHOLE_LOGGERS = frozenset({"python_multipart"})  # (its messages are formatted with the client's bytes: one key per logger)

    def __init__(self, every_s: float = CLIENT_WARNING_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s, self.clock = every_s, clock
        self.passed: dict[str, float] = {}  # key -> when it last passed
        self.left_out: dict[str, int] = {}  # key -> how many were dropped since

    def key(self, record: logging.LogRecord) -> str | None:
        """What the rate applies to (None: a record this filter lets through as it is)."""
        if record.levelno > logging.WARNING or not isinstance(record.msg, str):
            return None
        if record.name.split(".")[0] in self.WHOLE_LOGGERS:
            return record.name
        return record.msg if record.msg in self.MESSAGES else None

    def filter(self, record: logging.LogRecord) -> bool:
        key = self.key(record)
        if key is None:
            return True
        now = self.clock()
        last = self.passed.get(key)
        if last is not None and now - last < self.every_s:
            self.left_out[key] = self.left_out.get(key, 0) + 1
            return False
        self.passed[key] = now
        if dropped := self.left_out.pop(key, 0):
            record.msg = f"{record.msg} ({dropped} more like it in the last {now - last:.0f} s, not logged: at most one every {self.every_s:g} s)"
        return True


def quiet_client_caused_output() -> None:
    """Installs `PerConnectionLines` and `ClientCausedWarnings` on uvicorn's logger and
    `ClientCausedWarnings` on python-multipart's (once; uvicorn's logging set-up keeps a logger's
    filters), and ignores Pillow's warnings: in the server they are about a client's upload
    (`Tag data larger than file` for each EXIF tag: one 60 KB JPEG wrote 10,000 raw lines to
    stderr), and the upload's size is checked by the server itself before decoding."""
    for name, guards in (("uvicorn.error", (PerConnectionLines, ClientCausedWarnings)), ("python_multipart.multipart", (ClientCausedWarnings,))):
        logger = logging.getLogger(name)
        for quiet in guards:
            if not any(isinstance(f, quiet) for f in logger.filters):
                logger.addFilter(quiet())
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


def raw_error(status: int, reason: str, code: str, message: str, path: str = "") -> bytes:
    """An answer written before any route runs, shaped as the routes' errors for `path` (the
    request's path as far as it was parsed: a v2 path's error is `{"error": "message"}`)."""
    body = json.dumps(error_payload(path, status, message, code), separators=(",", ":")).encode()  # compact, as the routes' JSON errors are
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


class WriteStallGuard:
    """Aborts a connection whose peer stops reading. Armed when the transport's write buffer goes
    over its high-water mark (the transport pauses writing), it looks every `timeout_s`: a buffer
    that has not shrunk since the last look means the peer read nothing for that long, and the
    connection is aborted (not closed: a close waits for the unsent bytes to be read). A slow
    reader that drains anything keeps its connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, timeout_s: float) -> None:
        self.loop, self.transport, self.timeout_s = loop, transport, timeout_s
        self.timer: asyncio.TimerHandle | None = None
        self.pending = 0

    def paused(self) -> None:
        if self.timer is None:
            self.pending = self.transport.get_write_buffer_size()
            self.timer = self.loop.call_later(self.timeout_s, self.look)

    def resumed(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def look(self) -> None:
        pending = self.transport.get_write_buffer_size()
        if pending and pending >= self.pending:
            self.timer = None
            self.transport.abort()
            return
        self.pending = pending
        self.timer = self.loop.call_later(self.timeout_s, self.look)


class WhenFlushed:
    """`FLUSHED_EXTENSION`'s callable: the protocol's `when_flushed`, held weakly. The bound method
    itself, kept in the request's scope, closed a reference cycle (protocol → scope → extensions →
    protocol): every closed connection's last request (its scope, its headers: 1.3 MB for 10,500
    header lines) waited for a full garbage collection, and RSS climbed by that much per request
    in between (a probe's 63 KB requests to /health/live: +130 MB per 100). Where the protocol is
    gone, so is its connection, and the callback runs at once."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: "StallGuardedWrites") -> None:
        self.protocol = weakref.ref(protocol)

    def __call__(self, callback: Callable[[], object]) -> None:
        protocol = self.protocol()
        if protocol is None:
            callback()
        else:
            protocol.when_flushed(callback)


class LingeringClose:
    """A request cycle's view of its connection's transport, whose `close` lingers while the
    request's body is still arriving: an answer refusing a body mid-way (413 past the size limit,
    431 for its trailers, 503 for a connection given up at the cap) says `Connection: close`, and
    uvicorn closed at once with the client still sending, which then lost the answer to a reset or
    a broken pipe. Now our side is shut after the answer and what still arrives is read and dropped
    for `REFUSED_LINGER_S` (`GuardedHttpProtocol.shut_and_linger`). Everything else is the
    transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpProtocol, cycle) -> None:
        # the cycle weakly: it holds this as its transport, and a strong reference back was a cycle
        self._transport, self._protocol, self._cycle = transport, protocol, weakref.ref(cycle)

    def close(self) -> None:
        cycle = self._cycle()
        if cycle is not None and cycle.more_body and not self._transport.is_closing():
            self._protocol.refused = True  # what still arrives is dropped
            self._protocol.loop.call_soon(self._protocol.shut_and_linger)  # (after the answer's own bookkeeping)
        else:
            self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class StallGuardedWrites:
    """The transport's flow-control calls, passed on to the protocol and to its `stall_guard`, and
    `when_flushed` (FLUSHED_EXTENSION) on top of them (a mixin for both protocols below, ahead of
    uvicorn's class in the bases)."""

    stall_guard: WriteStallGuard
    after_flush: list[Callable[[], object]]

    def writing_paused(self) -> bool:
        """The transport holds more than its high-water mark and the connection is still there."""
        raise NotImplementedError

    def when_flushed(self, callback: Callable[[], object]) -> None:
        """Runs `callback` once what was written so far has left the process: now if writing is
        not paused, else when the transport resumes writing (its buffer under the low-water mark)
        or the connection is lost (the stall guard aborts a peer that reads nothing)."""
        if self.writing_paused():
            self.after_flush.append(callback)
        else:
            callback()

    def run_after_flush(self) -> None:
        callbacks, self.after_flush = self.after_flush, []
        for callback in callbacks:
            callback()

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self.stall_guard.paused()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self.stall_guard.resumed()
        self.run_after_flush()


class GuardedHttpProtocol(StallGuardedWrites, HttpToolsProtocol):
    header_timeout_s: float = 10.0
    max_connections: int = 512
    send_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.address = client_share_key(self.client)  # once: the table asks for it several times a request
        self.stall_guard = WriteStallGuard(self.loop, transport, self.send_timeout_s)
        self.after_flush: list[Callable[[], object]] = []
        self.lost = False
        self.header_timer: asyncio.TimerHandle | None = None
        self.awaiting_headers = False
        self.header_bytes = 0  # read since the read in which the request began, while its headers are incomplete
        self.header_tail = b""  # the last bytes of the read before, while the headers are incomplete
        self.chunk_bodiless = False  # a chunk's size line was parsed and none of its data yet: the last chunk's trailers follow it
        self.trailer_bytes = 0  # read after the last chunk's size line that were no body (`count_trailers`)
        self.body_read = 0  # body bytes the parser gave in the current read
        self.messages_begun = 0  # requests the parser has begun on this connection
        self.refused = False  # answered 431 or 503, or pipelined past MAX_PIPELINED: what still arrives is dropped
        self.past_upgrade = False  # a request asked to switch to a protocol not served: what still arrives is dropped (`_unsupported_upgrade_warning`)
        self.lingering = False  # shut, reading and dropping until the close (shut_and_linger)
        self.waiting_since = self.loop.time()  # since it connected or its last answer went out
        self.busy_since = self.waiting_since  # since it connected, or began a request after waiting IDLE_EVICTABLE_S for one
        self.stalled_since = 0.0  # since its client stopped keeping up with its answer (writing paused)
        self.open_cycles: list = []  # the requests begun and not answered (the running one, and those pipelined behind it)
        if not self.slots().admit(self, self.waiting_since):
            self.refused = True
            transport.write(raw_error(503, "Service Unavailable", "too_many_connections",
                                      f"the server holds its limit of {self.max_connections} connections; retry later"))
            self.shut_and_linger()  # closed at once with the request unread, the client saw a reset, not the 503
            return
        self.arm_header_timer()

    def being_served(self) -> bool:
        """A request of this connection is running or queued."""
        return (self.cycle is not None and not self.cycle.response_complete) or bool(self.pipeline)

    def slots(self) -> ConnectionTable:
        """The connection slots of this server (one table per server state: per `--workers` front)."""
        table = getattr(self.server_state, "ganserve_slots", None)
        if table is None:
            table = self.server_state.ganserve_slots = ConnectionTable(self.max_connections)
        return table

    def gone(self) -> bool:
        return self.refused or self.transport is None or self.transport.is_closing()

    def make_room(self) -> None:
        """Closed for a newcomer at the cap: while waiting for a request, as a kept-alive
        connection's idle timeout closes it; while its request's body is still arriving, once the
        intake has answered it 503 (the request was never accepted); while its client is behind on
        reading its answer, aborted (a close would wait for the client to read what is buffered)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.response_started and cycle.more_body:
            self.stop_waiting_for_body(GAVE_UP_SLOT)
            return
        self.disarm_header_timer()
        if self.writing_paused():  # a client that has not kept up with its answer: a close would wait for it to read
            self.transport.abort()
            return
        self.transport.close()

    def stop_waiting_for_body(self, reason: str) -> None:
        """The request whose body is arriving is told to stop waiting for it (STOPPING_EXTENSION):
        its pending receive() returns an empty chunk, and the intake answers it 503 and closes."""
        self.cycle.scope.setdefault("extensions", {})[STOPPING_EXTENSION] = reason
        self.cycle.message_event.set()

    def pause_writing(self) -> None:
        """Its client has not kept up with its answer: at the cap, a newcomer of a lighter address may take its slot."""
        super().pause_writing()
        self.stalled_since = self.loop.time()
        self.slots().fell_behind(self)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.slots().caught_up(self)

    def _unsupported_upgrade_warning(self) -> None:
        """A request asking to switch to a protocol this server does not speak (`Upgrade: h2c`, a
        CONNECT): the HTTP parser stops at its headers as if the switch were made, so its body
        never reaches the request (the intake answers 400 where it declared one:
        `refuse_unsupported_upgrade`) and, arriving in a later read, was parsed as a request of its
        own: a body `GET /…` behind `Upgrade: h2c` was answered as a second request, one a proxy in
        front that forwards the upgrade headers never saw (h2c smuggling). The request is answered
        as it is; what the connection sends after it is dropped, and it closes after the answer."""
        super()._unsupported_upgrade_warning()
        self.past_upgrade = True

    def handle_websocket_upgrade(self) -> None:
        if (version := self.scope.get("http_version", "1.1")) != "1.1":
            # RFC 6455 §4.1: the opening handshake is an HTTP/1.1 request; websockets answered one
            # sent as HTTP/1.0 with 101, over a connection that version's proxies may not keep open
            self.disarm_header_timer()
            self.refused = True
            self.transport.write(raw_error(400, "Bad Request", "bad_request",
                                           f"a WebSocket handshake is an HTTP/1.1 request; this one says HTTP/{version[:8]}",
                                           self.path_so_far()))
            self.shut_and_linger()
            return
        if len(self.headers) > MAX_UPGRADE_HEADERS:
            # refused before websockets parses the request again, in Python: 10,500 header lines took
            # ~18 ms of the event loop there, 31-53 ms a handshake in all (a hostile probe: 16 clients
            # opening such handshakes held /health/live at ~0.5 s); a browser sends about 20
            self.disarm_header_timer()
            self.refused = True
            self.transport.write(raw_error(431, "Request Header Fields Too Large", "headers_too_large",
                                           f"a WebSocket handshake takes at most {MAX_UPGRADE_HEADERS} header fields; "
                                           f"this one has {len(self.headers)}", self.path_so_far()))
            self.shut_and_linger()
            return
        slots = self.slots()
        slots.remove(self)
        super().handle_websocket_upgrade()
        # the connection is the WebSocket protocol's now, and this one's `connection_lost` (which lets
        # go of the parser) never runs: the parser holds this protocol's callbacks and this protocol
        # the parser, and each stream's handshake waited for a full garbage collection
        self.parser, self.cycle = None, None
        if isinstance(stream := self.transport.get_protocol(), GuardedWebSocketProtocol):
            stream.hold_slot(slots)  # the transport and its slot pass to the WebSocket protocol

    def arm_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_timed_out)

    def disarm_header_timer(self) -> None:
        if getattr(self, "header_timer", None) is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def path_so_far(self) -> str:
        """The request's path as far as the parser has read it ("" before its request line): a
        refusal at this level is shaped for it (a v2 client was sent v1's error object)."""
        return bytes(getattr(self, "url", b"")).split(b"?", 1)[0].decode("latin-1")

    def send_400_response(self, msg: str) -> None:
        """The HTTP parser refused the request (a malformed request line or header, a framing it
        does not take such as `Transfer-Encoding: identity` or `chunked, chunked`): answered with
        the API's JSON error, as every other refusal is, not uvicorn's plain text, and closed."""
        self.transport.write(raw_error(400, "Bad Request", "bad_request",
                                       "the request is not valid HTTP/1.1 (its request line, a header or its body's framing)", self.path_so_far()))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.refused or self.past_upgrade:
            return  # the rest of a refused request: read and dropped until the connection closes
        first_part = None
        if self.awaiting_headers:
            self.header_bytes += self.header_part(data)
            if self.header_bytes > self.max_header_bytes:
                self.headers_too_large()
                return
        elif not self.being_served():
            # a request's first read, which begins it (on an idle connection the read starts with
            # the request): the count above starts once the parser has seen it begin, so a 140 KB
            # header sent in one read was served (a hostile probe; 431 came past ~200 KB), and 120 KB
            # sent as 60 KB and the rest (a re-probe): the first read's part is counted here
            self.header_bytes, self.header_tail = 0, b""
            first_part = self.header_part(data)
            if first_part > self.max_header_bytes:
                self.headers_too_large()
                return
        begun = self.messages_begun
        self.body_read = 0
        super().data_received(data)
        if (cycle := self.cycle) is not None and cycle.more_body and not isinstance(cycle.transport, LingeringClose):
            # a body still arriving after this read: only then can an answer come before its end. Made for
            # every request, the wrapper cost ~0.05 ms of the event loop each (`ganserve bench`, 32 clients:
            # 0.60 against 0.53 ms a request); nearly every small request arrives whole in one read
            cycle.transport = LingeringClose(self.transport, self, cycle)
        if self.chunk_bodiless and not self.refused:  # counted by the read: httptools builds one long trailer line piece by piece
            self.count_trailers(len(data) - self.body_read)
        # armed only for a request whose headers did not come whole: most arrive in one read, and a
        # timer made and cancelled for each of them was 1.2 % of the event loop's py-spy samples at 32 clients
        if self.awaiting_headers and not self.refused:
            if first_part is not None and self.messages_begun == begun + 1:  # begun in this read, alone (the parser's start reset the count)
                self.header_bytes = first_part
            self.arm_header_timer()  # a running timer keeps its start
            self.header_tail = data[-3:]  # their blank line, if it is split between this read and the next
        elif self.idle_without_timer():
            # bytes between requests that begin none (the empty lines RFC 9112 lets a server skip):
            # uvicorn stopped its keep-alive timer on them, so one "\r\n" after an answer kept the
            # connection open for good, below the connection cap (a hostile probe)
            self.arm_header_timer()

    def idle_without_timer(self) -> bool:
        """Between requests, with neither the keep-alive timer nor the header timer running; never
        once the connection is a WebSocket's (the upgrade hands the transport to another protocol,
        and a header timer armed here cut every upscale stream after `header_timeout_s`)."""
        return (self.timeout_keep_alive_task is None and self.header_timer is None and not self.refused and not self.pipeline
                and (self.cycle is None or self.cycle.response_complete) and self.transport.get_protocol() is self
                and not self.transport.is_closing())

    def header_part(self, data: bytes) -> int:
        """How much of a read belongs to the headers still arriving: up to the blank line that ends
        them where it is in this read (and within the cap), else all of it. A body in the same read
        is no header: an upload whose request line came in one read and the rest of its headers
        with 190 KB of body in the next was answered 431."""
        room = max(0, self.max_header_bytes - self.header_bytes)
        tail = self.header_tail
        window = tail + data[:room + 4]  # a blank line past the cap does not matter: the headers are over it
        ends = [at + len(blank) for blank in (b"\r\n\r\n", b"\n\n") if (at := window.find(blank)) >= 0]
        return max(0, min(ends) - len(tail)) if ends else len(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.messages_begun += 1
        self.awaiting_headers = True  # a kept-alive connection's next request
        self.header_bytes = 0
        self.header_tail = b""  # what was read before this request is none of its headers

    def on_headers_complete(self) -> None:
        self.awaiting_headers = False
        self.disarm_header_timer()
        if self.refused:
            return  # pipelined past the cap: not queued, its body (on_body) dropped with it
        if len(self.pipeline) >= MAX_PIPELINED:
            self.stop_pipelining()
            return
        now = self.loop.time()
        if not self.being_served() and now - self.waiting_since >= IDLE_EVICTABLE_S:
            # (a request pipelined behind a running one, or sent just after the last answer, keeps the
            # connection's age: a re-probe sent each next request 2 ms after the answer to stay young)
            self.busy_since = now
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is before:
            # a WebSocket handshake: no request cycle begins (the upgrade hands the connection over, or
            # `handle_websocket_upgrade` refuses it). Its None was kept here, and `connection_lost` then
            # failed on it before uvicorn's own clean-up: every refused handshake's protocol, and its
            # headers, stayed in memory for good (a probe's 10,500-line handshakes: +1.2 to 4 MB each)
            return
        self.open_cycles = [cycle for cycle in self.open_cycles if not cycle.response_complete] + [self.cycle]
        slots = self.slots()
        slots.began_serving(self)
        slots.began_receiving(self)  # until on_message_complete: the body is to come
        extensions = self.scope.setdefault("extensions", {})
        extensions[DISCONNECT_EXTENSION] = []
        extensions[FLUSHED_EXTENSION] = WhenFlushed(self)

    def writing_paused(self) -> bool:
        return self.flow.write_paused and not self.lost

    def stop_pipelining(self) -> None:
        """A connection with `MAX_PIPELINED` requests queued behind the one running: this request
        and every later one are dropped unread, and the connection closes once the queued ones are
        answered (RFC 9112 lets a server close a pipelining connection; its client retries what
        was not answered). uvicorn's queue had no bound here: 64-byte pipelined GETs cost ~2.8 KB
        each (40 MB of them took the server up 1.8 GB) and parsing them starved every other client."""
        self.refused = True  # read on and dropped from now on; on_response_complete closes after the last answer
        self.slots().remove(self)

    def on_response_complete(self) -> None:
        last = (self.refused or self.past_upgrade) and not self.pipeline  # pipelining stopped (or an upgrade), and nothing queued behind this answer
        self.waiting_since = self.loop.time()
        super().on_response_complete()
        if not self.being_served():  # (else a pipelined request began)
            self.slots().began_waiting(self)
        if last:
            self.shut_and_linger()

    def on_body(self, body: bytes) -> None:
        self.chunk_bodiless, self.trailer_bytes = False, 0
        self.body_read += len(body)
        if not self.refused:
            super().on_body(body)

    def on_chunk_header(self) -> None:
        self.chunk_bodiless = True  # until its data arrives; the last chunk has none, and its trailer fields follow

    def on_chunk_complete(self) -> None:
        self.chunk_bodiless, self.trailer_bytes = False, 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.awaiting_headers:  # a trailer field, after a chunked body: dropped and counted
            if not self.refused and self.cycle is not None:
                self.count_trailers(len(name) + len(value))
            return
        super().on_header(name, value)

    def count_trailers(self, nbytes: int) -> None:
        """Bytes of a chunked request's trailer section (an upper bound: its last chunk's size line
        may be among them); past `max_header_bytes` the request's body is not waited for any more
        (the intake answers 431, TRAILERS_TOO_LARGE) and what the connection still sends is
        dropped until the answer, then it closes."""
        self.trailer_bytes += nbytes
        if self.trailer_bytes > self.max_header_bytes and not self.refused:
            self.refused = True  # on_response_complete shuts the connection after the answer
            self.stop_waiting_for_body(TRAILERS_TOO_LARGE)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        self.slots().body_arrived(self)
        super().on_message_complete()
        # the body is whole: read on, so that a hang-up is seen while the request runs (uvicorn
        # resumes reading only when the app calls receive(), which the intake no longer does after
        # the body). Not while requests are queued behind it: uvicorn paused reading for them, and
        # reading on here queued a pipelined flood without end
        if not self.pipeline:
            self.flow.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_header_timer()
        self.slots().remove(self)
        if hasattr(self, "stall_guard"):
            self.stall_guard.resumed()
        cycles = [cycle for cycle in self.open_cycles if not cycle.response_complete]
        self.open_cycles = []
        super().connection_lost(exc)
        self.lost = True
        self.run_after_flush()
        for cycle in cycles:
            # uvicorn marks only the newest request gone: the one running ahead of pipelined ones wrote to the
            # closed transport, and each such hang-up logged two tracebacks (~7 KB: a re-probe wrote 15 MB)
            cycle.disconnected = True
            cycle.message_event.set()
            for stop in list(cycle.scope.get("extensions", {}).get(DISCONNECT_EXTENSION, ())):
                stop()
        # uvicorn's request cycle holds this protocol (its `on_response`), and this protocol its last
        # cycle, scope and headers, and the requests queued behind it: a reference cycle that kept each
        # closed connection's last request until a full garbage collection (`WhenFlushed`). Dropped
        # here, a connection's memory goes with its last reference (a running request keeps its own)
        self.cycle = None
        self.pipeline.clear()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, which waits for every request in progress: one whose body is
        still arriving is told to stop waiting for it (STOPPING_EXTENSION)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.response_started and cycle.more_body:
            self.stop_waiting_for_body(SHUTTING_DOWN)
        super().shutdown()

    def headers_too_large(self) -> None:
        """431, then our side of the connection shut; what the client still sends is read and
        dropped for `REFUSED_LINGER_S` before the close (closed at once with its bytes unread, the
        kernel resets the connection, and the client may lose the answer before reading it)."""
        self.disarm_header_timer()
        self.awaiting_headers, self.refused = False, True
        if not self.transport.is_closing():
            self.transport.write(raw_error(431, "Request Header Fields Too Large", "headers_too_large",
                                           f"the request's headers are over {self.max_header_bytes} bytes", self.path_so_far()))
            self.shut_and_linger()

    def shut_and_linger(self) -> None:
        """Our side shut after the last answer; what the client still sends is read and dropped
        (`refused`) for `REFUSED_LINGER_S`, then the close (closed with bytes unread, the kernel
        resets the connection, and the client may lose answers it had not read yet)."""
        if self.transport.is_closing() or self.lingering:
            return  # (a 431 to a pipelined request shuts before the running one's answer ends)
        self.lingering = True
        self.slots().remove(self)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(REFUSED_LINGER_S, self.transport.close)

    def headers_timed_out(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing() and not self.refused and self.transport.get_protocol() is self:
            self.transport.write(raw_error(408, "Request Timeout", "request_timeout",
                                           f"the request headers did not arrive within {self.header_timeout_s:g} s", self.path_so_far()))
            self.transport.close()


def json_refusal(refused: WebSocketResponse, path: str) -> WebSocketResponse:
    """websockets' plain-text refusal of a handshake as the API's JSON error (status, and headers
    such as `Sec-WebSocket-Version` on a version it does not speak, kept)."""
    text = refused.body.decode(errors="replace").split("\n\n")[0].strip()
    message = text.removeprefix("Failed to open a WebSocket connection: ").rstrip(".") or refused.reason_phrase
    body = json.dumps(error_payload(path, refused.status_code, f"not a WebSocket handshake this server accepts: {message}")).encode()
    headers = WebSocketHeaders([(key, value) for key, value in refused.headers.raw_items() if key.lower() not in ("content-type", "content-length")]
                               + [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return WebSocketResponse(refused.status_code, refused.reason_phrase, headers, body)


class RateBudget:
    """A token bucket: `burst` at once, refilled at `rate` a second (loop time)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class GuardedWebSocketProtocol(StallGuardedWrites, WebSocketsSansIOProtocol):
    send_timeout_s: float = 30.0
    max_messages_per_s: int = MAX_MESSAGES_PER_S  # (GANSERVE_STREAM_MAX_MESSAGES_PER_S)
    slots: ConnectionTable | None = None  # the server's, once the upgrade handed this connection's slot over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.address = client_share_key(self.client)  # as its HTTP connection was counted
        self.stall_guard = WriteStallGuard(self.loop, self.transport, self.send_timeout_s)
        self.after_flush = []
        self.fragments = 0
        now = self.loop.time()
        rate = self.max_messages_per_s
        self.message_budget = RateBudget(rate, 2 * rate, now)
        self.frame_budget = RateBudget(MAX_SMALL_FRAMES_PER_S, SMALL_FRAME_BURST, now)

    def data_received(self, data: bytes) -> None:
        """A read parsed a piece at a time, so a closed connection's rest is never parsed: at most
        `FEED_BYTES`, and no more bytes than `FEED_BYTES_PER_TOKEN` per message or small frame its
        budgets have left (at least 1 KiB). With 16 KiB pieces a connection on a few tokens had
        ~2,340 tiny frames parsed before the budget was looked at: a client reconnecting in a loop
        still held a core, ~5.9 ms per connection (a re-probe)."""
        start = 0
        while start < len(data):
            if self.transport.is_closing():
                return
            left = min(self.message_budget.tokens, self.frame_budget.tokens)
            piece = max(1024, min(FEED_BYTES, int(left) * FEED_BYTES_PER_TOKEN))
            super().data_received(data[start:start + piece])
            start += piece

    def over_budget(self, budget: RateBudget, what: str) -> bool:
        """Takes one from `budget` (messages, or small frames); past it, the connection is closed
        with 1008 and True returned (the frame is not handled)."""
        if self.transport.is_closing():
            return True
        if budget.take(self.loop.time()):
            return False
        self.fail(1008, f"more than {budget.rate:g} {what} a second")
        return True

    def over_message_budget(self) -> bool:
        return self.over_budget(self.message_budget, "messages")

    def fail(self, code: int, reason: str) -> None:
        """Closes the connection at once with `code` (the app is told it is gone)."""
        if not self.transport.is_closing():
            self.conn.fail(code, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()
        self.frames = []

    def hold_slot(self, slots: ConnectionTable) -> None:
        """Takes the upgraded HTTP connection's slot: a stream counts toward the connection cap,
        and never waits in line to be closed for a newcomer. Its opening bursts are what its
        address has earned (`ConnectionTable.opening_allowance`): a reconnect is no fresh burst."""
        self.slots, self.waiting_since = slots, self.loop.time()
        slots.add(self, waiting=False)
        share = slots.opening_allowance(self.address, self.loop.time())  # (never none: a client may always begin, at its rate)
        self.message_budget.tokens = max(MIN_OPENING_MESSAGES, self.message_budget.tokens * share)
        self.frame_budget.tokens = max(MIN_OPENING_SMALL_FRAMES, self.frame_budget.tokens * share)

    def gone(self) -> bool:
        return self.transport.is_closing()

    def make_room(self) -> None:
        self.transport.close()  # (never chosen: a stream is not in the waiting line)

    def handle_connect(self, event) -> None:
        """A handshake websockets refuses (no key, another protocol version) is answered with the
        API's JSON error, as every refusal of the app is (it was websockets' plain text)."""
        refused = self.conn.accept(event)  # (it only reads the request: uvicorn's own handshake accepts it again)
        if refused.status_code != 101:
            self.request = event
            self.handshake_initiated = self.handshake_complete = self.close_sent = True
            self.conn.send_response(json_refusal(refused, event.path.partition("?")[0]))
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
            return
        super().handle_connect(event)
        self.on_server_shutdown = []
        if (scope := getattr(self, "scope", None)) is not None:  # none when the upgrade request was refused
            scope.setdefault("extensions", {})[FLUSHED_EXTENSION] = WhenFlushed(self)
            scope["extensions"][SERVER_SHUTDOWN_EXTENSION] = self.on_server_shutdown

    def shutdown(self) -> None:
        """uvicorn's shutdown closes an open WebSocket at once with 1012, so an upscale stream's
        frame in flight, already accepted, was never answered. An app that asked to be told
        (`SERVER_SHUTDOWN_EXTENSION`) answers what it accepted and closes with 1001 itself, within
        the graceful-shutdown bound after which uvicorn cancels it."""
        callbacks = getattr(self, "on_server_shutdown", [])
        if callbacks and self.handshake_complete and self.initial_response is None and not self.close_sent and not self.transport.is_closing():
            self.stop_keepalive()
            for callback in callbacks:
                callback()
            return
        super().shutdown()

    def writing_paused(self) -> bool:
        return not self.writable.is_set() and not self.disconnected

    def connection_lost(self, exc: Exception | None) -> None:
        self.stall_guard.resumed()
        if self.slots is not None:
            self.slots.remove(self)
        super().connection_lost(exc)
        self.run_after_flush()
        # a stream's shutdown callback holds the stream, whose WebSocket holds this protocol: a cycle
        # that kept each closed stream's objects until a full garbage collection
        getattr(self, "on_server_shutdown", []).clear()

    async def send(self, message) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # a refused handshake (the API's JSON error as the HTTP answer) is this handshake's end:
            # uvicorn would otherwise log "ASGI callable returned without completing handshake" at
            # ERROR for every refusal, a log line any client could produce at will
            self.handshake_complete = True

    def handle_handshake_exception(self) -> None:
        """An upgrade request websockets cannot parse: the API's JSON 400 (it was plain text)."""
        self.conn.data_to_send()  # (websockets' own answer, if it queued one, is replaced)
        self.handshake_complete = self.close_sent = True
        refused = self.conn.reject(400, "the upgrade request could not be read")
        self.transport.write(json_refusal(refused, "").serialize())
        self.transport.close()

    def handle_ping(self) -> None:
        pong = self.conn.data_to_send()  # taken either way, or it would go out with the next write
        if self.over_message_budget():
            return
        if self.transport.get_write_buffer_size() < self.transport.get_write_buffer_limits()[1]:
            self.transport.write(b"".join(pong))

    def handle_pong(self, event) -> None:
        if not self.over_message_budget():
            super().handle_pong(event)

    def handle_text(self, event) -> None:
        if self.over_message_budget():
            return
        self.fragments = 1
        super().handle_text(event)

    def handle_bytes(self, event) -> None:
        if self.over_message_budget():
            return
        self.fragments = 1
        super().handle_bytes(event)

    def send_receive_event_to_app(self) -> None:
        """A text message that is not UTF-8 is closed with 1007, as uvicorn closes it, without the
        ERROR line and traceback uvicorn logs for it: a log entry any client could write at will."""
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                self.frames = []
                self.conn.send_close(1007, "a text message must be UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def handle_cont(self, event) -> None:
        if len(event.data) < SMALL_FRAME_BYTES and self.over_budget(self.frame_budget, "small frames"):
            return
        self.fragments += 1
        if self.fragments > MAX_FRAGMENTS:
            self.fail(1009, f"a message in more than {MAX_FRAGMENTS} frames")
            return
        super().handle_cont(event)


def guarded_protocol(header_timeout_s: float, max_connections: int, send_timeout_s: float = 30.0,
                     max_header_bytes: int = 64 * 1024) -> type[GuardedHttpProtocol]:
    """The HTTP protocol class uvicorn instantiates per connection, with the settings' values."""
    return type("ConfiguredHttpProtocol", (GuardedHttpProtocol,), {"header_timeout_s": header_timeout_s, "max_connections": max_connections,
                                                                   "send_timeout_s": send_timeout_s, "max_header_bytes": max_header_bytes})


def guarded_websocket_protocol(send_timeout_s: float, max_header_bytes: int = 64 * 1024,
                               max_messages_per_s: int = MAX_MESSAGES_PER_S) -> type[GuardedWebSocketProtocol]:
    """The WebSocket protocol class uvicorn instantiates per upgraded connection. websockets
    parses the upgrade request again with limits of its own (a line of 8 KiB, 128 headers: its
    `WEBSOCKETS_MAX_LINE_LENGTH` and `WEBSOCKETS_MAX_NUM_HEADERS`), so a 9 KB cookie opened every
    HTTP route and got 431 from the stream; a line may be as long as the HTTP protocol's own cap,
    which the request has already passed, and a handshake may carry `MAX_UPGRADE_HEADERS` fields."""
    websockets_http11.MAX_LINE_LENGTH = max_header_bytes
    websockets_http11.MAX_NUM_HEADERS = MAX_UPGRADE_HEADERS  # (GuardedHttpProtocol refuses more before websockets parses them)
    return type("ConfiguredWebSocketProtocol", (GuardedWebSocketProtocol,), {"send_timeout_s": send_timeout_s, "max_messages_per_s": max_messages_per_s})
