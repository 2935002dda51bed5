"""uvicorn's HTTP protocol with the two guards uvicorn lacks:

- a **header timeout**: a connection that does not finish a request's headers within
  `header_timeout_s` of connecting (or of the request's first byte, on a kept-alive connection)
  gets 408 and is closed, so half-sent requests cannot hold sockets open for good;
- a **connection cap**: past `max_connections` open connections a new one is answered 503 (JSON,
  like every error) and closed before anything is read.

It also tells the request intake (service/intake.py) when a client hangs up mid-request:
callbacks the intake puts in `scope["extensions"][DISCONNECT_EXTENSION]` run when the
connection is lost before the response is complete. Without it the intake would watch with a task
per request, blocked on `receive()` (what it still does under another server).

The body's own timeout and size limit live in the ASGI middleware (service/intake.py), where
the answer can be JSON with the right status.
"""
from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DISCONNECT_EXTENSION = "ganserve.on_disconnect"  # a list of callables in the request's scope extensions


def raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


class GuardedHttpProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    max_connections: int = 512

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_timer: asyncio.TimerHandle | None = None
        self.awaiting_headers = False
        if len(self.connections) > self.max_connections:
            transport.write(raw_error(503, "Service Unavailable", "too_many_connections",
                                      f"the server holds its limit of {self.max_connections} connections; retry later"))
            transport.close()
            return
        self.arm_header_timer()

    def arm_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_timed_out)

    def disarm_header_timer(self) -> None:
        if getattr(self, "header_timer", None) is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # armed only for a request whose headers did not come whole: most arrive in one read, and a
        # timer made and cancelled for each of them was 1.2 % of the event loop's py-spy samples at 32 clients
        if self.awaiting_headers:
            self.arm_header_timer()  # a running timer keeps its start

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.awaiting_headers = True  # a kept-alive connection's next request

    def on_headers_complete(self) -> None:
        self.awaiting_headers = False
        self.disarm_header_timer()
        super().on_headers_complete()
        self.scope.setdefault("extensions", {})[DISCONNECT_EXTENSION] = []

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # the body is whole: read on, so that a hang-up is seen while the request runs (uvicorn
        # resumes reading only when the app calls receive(), which the intake no longer does after
        # the body; a pipelined request's headers pause reading again, as before)
        self.flow.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_header_timer()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            for stop in list(cycle.scope.get("extensions", {}).get(DISCONNECT_EXTENSION, ())):
                stop()

    def headers_timed_out(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.write(raw_error(408, "Request Timeout", "request_timeout",
                                           f"the request headers did not arrive within {self.header_timeout_s:g} s"))
            self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, with the settings' values."""
    return type("ConfiguredHttpProtocol", (GuardedHttpProtocol,), {"header_timeout_s": header_timeout_s, "max_connections": max_connections})
