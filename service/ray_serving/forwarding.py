"""One HTTP request carried from the ingress to a model replica and run there through the
replica's own ganserve app (its intake middleware, routes, pipeline, batcher and error handlers),
in process, with no second HTTP hop: the request and the answer cross Ray as plain bytes."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class ForwardedRequest:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] = ("127.0.0.1", 0)


@dataclass
class ForwardedResponse:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == wanted), None)


async def call_asgi(app, request: ForwardedRequest) -> ForwardedResponse:
    """Runs `request` through the ASGI `app` and collects its whole answer. The body is handed over
    in one message; once the answer is complete, `receive` reports a disconnect (as a server does
    after the response), so nothing in the app waits on it."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query, "root_path": "", "headers": request.headers,
        "client": request.client, "server": ("ganserve-replica", 80),
    }
    delivered = False
    done = asyncio.Event()
    answer = ForwardedResponse(500)
    chunks: list[bytes] = []

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer.status, answer.headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    answer.body = b"".join(chunks)
    return answer
