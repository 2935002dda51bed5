"""A minimal HTTP/1.1 keep-alive client for the load generator.

On a machine where the load generator shares the cores with the server, the client's own CPU
per request decides what is measured: httpx spends ~0.5 ms of Python per request, about what
the server spends, so a 2-core run measured the client as much as the server. This client
writes a prebuilt request and reads the status line, the headers and a Content-Length (or
chunked) body with asyncio streams: a few tens of microseconds per request."""
from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit


def prebuilt_request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def request_bytes(host: str, path: str, request: dict) -> bytes:
    """httpx-style keyword arguments (`json=` or `content=` with `headers=`) → the request's bytes
    (query parameters go in `path`)."""
    if "params" in request:
        raise ValueError("put query parameters in the path")
    if "json" in request:
        return prebuilt_request(host, path, json.dumps(request["json"]).encode(), {"Content-Type": "application/json"})
    return prebuilt_request(host, path, request["content"], request.get("headers", {}))


class KeepAliveConnection:
    """One client's connection, reopened when the server closes it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """(status, body) of one request. A kept-alive connection the server closed while it sat
        idle (its keep-alive timeout) is reopened and the request sent again, once, as httpx
        does; any other failure is the request's."""
        reused = self.writer is not None
        try:
            return await self.exchange(raw)
        except (asyncio.IncompleteReadError, ConnectionResetError) as error:
            if not reused or getattr(error, "partial", b""):
                raise
        return await self.exchange(raw)

    async def exchange(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines if ":" in line)}
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = await self.read_chunked()
            else:
                body = await self.reader.read()
                headers["connection"] = "close"
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, body

    async def read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append(await self.reader.readexactly(size + 2))
            if size == 0:
                return b"".join(p[:-2] for p in parts)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None
