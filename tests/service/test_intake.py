"""The request intake (service/intake.py): its hang-up detection, both ways it is told (by our
HTTP protocol's callback, or under any other server by a disconnect message from `receive()`),
and the memory an answer holds until it has left the process."""
import asyncio
import contextlib
import datetime
import email.utils
import socket
import time

import numpy as np

from bench.stalled import stalled_request
from service.http_protocol import DISCONNECT_EXTENSION
from service.intake import RequestIntake, context_of
from tests.serving import running_server


def http_scope(extensions: dict | None = None) -> dict:
    scope = {"type": "http", "method": "POST", "path": "/v1/models/m/generate", "headers": [(b"host", b"test"), (b"content-length", b"2")], "app": None}
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


class App:
    """An ASGI app that runs until its request's client is seen to leave (or 2 s pass)."""

    state = type("State", (), {})()

    def __init__(self) -> None:
        self.left = False

    async def __call__(self, scope, receive, send) -> None:
        assert (await receive())["body"] == b"{}"
        try:
            await asyncio.wait_for(context_of(scope).disconnected.wait(), 2)
            self.left = True
        except TimeoutError:
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def run(scope: dict, hang_up) -> tuple[bool, int]:
    """(the app saw the hang-up, how often the intake called receive())."""
    app = App()
    scope["app"] = app
    calls = 0
    gone = asyncio.Event()

    async def receive():
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    async def scenario():
        task = asyncio.create_task(RequestIntake(app, max_body_bytes=1024, body_timeout_s=5)(scope, receive, send))
        await asyncio.sleep(0.05)
        hang_up(gone)
        await task

    asyncio.run(scenario())
    return app.left, calls


def test_our_protocols_callback_reports_a_hang_up_without_a_task_waiting_on_receive():
    callbacks: list = []
    left, receives = run(http_scope({DISCONNECT_EXTENSION: callbacks}), lambda gone: [stop() for stop in list(callbacks)])
    assert left and receives == 1  # the body only: nothing sat on receive() for the rest of the request


def test_under_another_server_a_disconnect_message_reports_the_hang_up():
    left, receives = run(http_scope(), lambda gone: gone.set())
    assert left and receives == 2


def stalled_answer(server, side: int = 128, batch: int = 1) -> socket.socket:
    """A v2 infer to the x4 SR model asking for its output as JSON (3x512x512 values, ~8 MB as
    orjson writes them: more than the kernel's socket buffers take),
    sent on a socket with a tiny receive window that the test then never reads. At the upscale
    tile's side (96) the graph runs in the arena its tiles keep; any other side gives it back
    (service/runtimes.py `ArenaKeeper`), and the process's resident memory falls by it."""
    x = np.random.default_rng(side).uniform(-1, 1, (batch, 3, side, side)).astype(np.float32)
    return stalled_request(server.url, "upx4", {"image": x})


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_an_answer_its_client_does_not_read_stays_in_the_memory_budget_until_the_client_is_dropped(repository):
    """Answers were released from the budget when handed to the socket: clients that asked for big
    answers and read none held them in the server, outside the budget, until the send timeout
    (a hostile probe's 225 such clients: RSS 711 → 2,854 MB under a 2 GB budget). Now an answer's
    bytes stay reserved until they leave the process, here until the stalled clients are dropped."""
    with running_server(repository, send_timeout_s=3, models=["upx4"]) as server:
        reserved = lambda: server.metric("ganserve_memory_reserved_bytes")  # noqa: E731
        answered = lambda: server.metric("ganserve_requests_total", model="upx4", operation="infer", status="200")  # noqa: E731
        idle = reserved()
        stalled = [stalled_answer(server) for _ in range(2)]
        try:
            assert wait_for(lambda: answered() == 2, 60)  # both computed and handed to the socket: the requests are over
            assert reserved() >= idle + 2 * 3e6, f"{reserved() - idle:.0f} bytes held"  # yet most of their two ~8 MB answers are still held
            assert server.metric("ganserve_memory_budget_bytes") > 0
            assert wait_for(lambda: reserved() <= idle, 30), f"{reserved() - idle:.0f} bytes still held"  # aborted after 3 s without progress
            for sock in stalled:  # dropped by the server: the rest of the answer never comes
                sock.settimeout(10)
                with contextlib.suppress(OSError):
                    while sock.recv(1 << 20):
                        pass
        finally:
            for sock in stalled:
                sock.close()
        with server.client() as client:  # the budget is whole again: the same request, read, is answered
            x = np.zeros((1, 3, 32, 32), np.float32)
            response = client.post("/v2/models/upx4/infer", json={"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                                               "data": x.ravel().tolist()}]})
            assert response.status_code == 200, response.text
        assert reserved() <= idle


def test_a_range_header_the_server_cannot_use_is_ignored_and_a_usable_one_is_served(server):
    """Starlette answered a malformed Range (`bytes=5-1`, `chars=0-5`) with a plain-text 400, the
    one error of the API that was not JSON (a hostile probe); RFC 9110 lets a server ignore a Range
    it cannot use, and the intake drops it: the whole file, 200. A well-formed Range past the
    file's end is 416, as JSON like every other error (a later probe found it empty text/plain)."""
    with server.client() as client:
        whole = client.get("/static/playground.css")
        assert whole.status_code == 200 and len(whole.content) > 10
        for unusable in ("bytes=5-1", "chars=0-5", "bytes=", "bytes=a-b", "bytes=1-" + "9" * 5000):
            answer = client.get("/static/playground.css", headers={"Range": unusable})
            assert answer.status_code == 200 and answer.content == whole.content, (unusable, answer.status_code, answer.text[:80])
        part = client.get("/static/playground.css", headers={"Range": "bytes=0-9"})
        assert part.status_code == 206 and part.content == whole.content[:10]
        # Range in two header fields is ignored too (the first was served: a proxy in front may read the other)
        twice = client.get("/static/playground.css", headers=[("Range", "bytes=0-9"), ("Range", "bytes=20-29")])
        assert twice.status_code == 200 and twice.content == whole.content, (twice.status_code, twice.headers)
        # a usable Range past the file's end: 416, which Starlette sent as an empty text/plain, is the API's JSON error
        for path in ("/static/playground.css", "/v1/models/digits/samples.png"):
            size = len(client.get(path).content)
            for unsatisfiable in ("bytes=99999999-", "bytes=-0"):
                answer = client.get(path, headers={"Range": unsatisfiable})
                assert answer.status_code == 416 and answer.headers["content-type"] == "application/json", (path, unsatisfiable, answer.headers)
                assert answer.json()["error"]["code"] == "range_not_satisfiable" and f"of {size} bytes" in answer.json()["error"]["message"]
                assert answer.headers["content-range"] == f"bytes */{size}"
                head = client.head(path, headers={"Range": unsatisfiable})
                assert head.status_code == 416 and head.content == b""


def test_a_file_is_412_where_the_requests_if_match_or_if_unmodified_since_does_not_hold(server):
    """Starlette reads neither precondition, so `Range` with `If-Match` naming an old file's tag (a
    client resuming a download of the file it had) got a range of the current file, 206 (a probe).
    RFC 9110 §13.2.2: the precondition comes first, and a false one is 412 (JSON, as every error)."""
    with server.client() as client:
        for path in ("/", "/static/playground.css", "/v1/models/digits/samples.png"):
            whole = client.get(path)
            etag, modified = whole.headers["etag"], whole.headers["last-modified"]
            assert client.get(path, headers={"If-Match": etag, "Range": "bytes=0-9"}).content == whole.content[:10], path
            for held in ({"If-Match": "*"}, {"If-Match": f'"other", {etag}'}, {"If-Unmodified-Since": modified},
                         {"If-Unmodified-Since": "not a date"}):
                assert client.get(path, headers=held).status_code == 200, (path, held)
            earlier = email.utils.format_datetime(email.utils.parsedate_to_datetime(modified) - datetime.timedelta(days=1), usegmt=True)
            for failed in ({"If-Match": '"other"'}, {"If-Match": f"W/{etag}"}, {"If-Unmodified-Since": earlier},
                           {"If-Match": '"other"', "If-None-Match": etag}):
                for method in ("GET", "HEAD"):
                    answer = client.request(method, path, headers={**failed, "Range": "bytes=0-9"})
                    assert answer.status_code == 412, (method, path, failed, answer.status_code)
                    assert method == "HEAD" or answer.json()["error"]["code"] == "precondition_failed"
        assert client.get("/v1/models", headers={"If-Match": '"other"'}).status_code == 200  # (no validator: ignored, as before)


def test_a_file_is_304_where_the_request_says_the_client_holds_it(server):
    """`samples.png` and the playground page are `FileResponse`s, which Starlette sends whole
    whatever the request's validators say (a probe: 200 with 94 KB for a matching `If-None-Match`,
    206 for one with a `Range`), where /static answered 304. Now all three answer 304 alike."""
    with server.client() as client:
        for path in ("/", "/static/playground.css", "/v1/models/digits/samples.png"):
            whole = client.get(path)
            etag, modified = whole.headers["etag"], whole.headers["last-modified"]
            later = email.utils.format_datetime(email.utils.parsedate_to_datetime(modified) + datetime.timedelta(days=1), usegmt=True)
            for held in ({"If-None-Match": etag}, {"If-None-Match": f'"other", W/{etag}'}, {"If-None-Match": "*"},
                         {"If-None-Match": etag, "Range": "bytes=0-9"}, {"If-Modified-Since": later}):
                answer = client.get(path, headers=held)
                assert answer.status_code == 304 and answer.content == b"" and answer.headers["etag"] == etag, (path, held, answer.status_code)
            for changed in ({"If-None-Match": '"other"'}, {"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}):
                answer = client.get(path, headers=changed)
                assert answer.status_code == 200 and answer.content == whole.content, (path, changed)


def exchange(server, *parts: bytes, gap_s: float = 0.3) -> list[bytes]:
    """The status lines a connection answers to `parts` sent `gap_s` apart, read until it closes."""
    host, port = server.url.removeprefix("http://").split(":")
    answered = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for part in parts:
            sock.sendall(part)
            time.sleep(gap_s)
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := sock.recv(65536):
                answered += chunk
    return [line for line in answered.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def test_a_body_behind_an_upgrade_the_server_does_not_speak_is_never_read_as_a_request_of_its_own(server):
    """`Connection: Upgrade` with `Upgrade: h2c` makes the HTTP parser stop at the headers as if the
    protocol had switched: a body in the same read was lost (valid JSON answered "needs a JSON
    body"), and one in a later read was parsed as a second request, which a proxy in front that
    forwards the upgrade headers never saw (h2c smuggling; a probe's smuggled GET was answered
    404 "unknown model 'SMUGGLED-REQUEST'"). Now such a request is 400 and the connection closes;
    one without a body is served, the upgrade ignored, and the connection closes after it."""
    host = server.url.removeprefix("http://")
    smuggled = b"GET /v1/models/SMUGGLED/samples.png HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n"
    upgrade = f"Host: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    head = f"POST /v1/models/digits/generate HTTP/1.1\r\n{upgrade}Content-Type: application/json\r\nContent-Length: {len(smuggled)}\r\n\r\n"
    assert exchange(server, head.encode(), smuggled) == [b"HTTP/1.1 400 Bad Request"]  # one answer: the smuggled GET was not read
    body = b'{"seed": 1}'
    head = f"POST /v1/models/digits/generate HTTP/1.1\r\n{upgrade}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    assert exchange(server, head.encode() + body) == [b"HTTP/1.1 400 Bad Request"]
    get = f"GET /v1/models/digits HTTP/1.1\r\n{upgrade}\r\n".encode()
    assert exchange(server, get + smuggled) == [b"HTTP/1.1 200 OK"]  # served; what followed it on the connection was not
    with server.client() as client:
        assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200  # and the server goes on


def test_a_request_two_parsers_could_read_two_ways_is_400(server):
    """RFC 9112 §3.2: an HTTP/1.1 request carries exactly one Host; two (or none) were served, as were
    two Content-Types, the route reading the first and the intake's checks the last; a request line
    saying HTTP/2.0 was served as 1.1 (a probe). A proxy in front and this server could disagree on
    them (GANSERVE_ALLOWED_HOSTS checks the Host)."""
    host = server.url.removeprefix("http://")
    body = b'{"seed": 1}'
    tail = f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    for head, status in ((f"Host: {host}\r\nHost: evil.example\r\nContent-Type: application/json\r\n", b"400"),
                         ("Content-Type: application/json\r\n", b"400"),
                         (f"Host: {host}\r\nContent-Type: application/json\r\nContent-Type: image/png\r\n", b"400"),
                         (f"Host: {host}\r\nContent-Type: application/json\r\n", b"200")):
        answered = exchange(server, b"POST /v1/models/digits/generate HTTP/1.1\r\n" + head.encode() + b"Connection: close\r\n" + tail, gap_s=0)
        assert len(answered) == 1 and answered[0].split()[1] == status, (head, answered)
    assert exchange(server, f"GET /health/live HTTP/2.0\r\nHost: {host}\r\n\r\n".encode(), gap_s=0)[0].split()[1] == b"505"
    assert exchange(server, b"GET /health/live HTTP/1.0\r\n\r\n", gap_s=0)[0].split()[1] == b"200"  # (1.0 needs no Host)


def test_a_closed_connections_request_is_freed_with_it_not_at_the_next_full_garbage_collection(server):
    """uvicorn's request cycle and our protocol held each other (and the scope's flush callback held
    the protocol), so each closed connection's last request, its headers with it, waited for a full
    garbage collection: a probe's 63 KB requests of 10,500 header lines raised RSS by ~1.3 MB each
    (+130 MB per 100) for as long as none came. Now a connection's memory goes when it closes."""
    host = server.url.removeprefix("http://")
    headers = b"".join(b"a%d:b\r\n" % (i % 10) for i in range(10_000))
    request = f"GET /health/live HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode() + headers + b"\r\n"

    def rss() -> int:
        return int(next(line for line in open(f"/proc/{server.process.pid}/status") if line.startswith("VmRSS")).split()[1]) * 1024

    assert exchange(server, request, gap_s=0) == [b"HTTP/1.1 200 OK"]
    before = rss()
    for _ in range(150):
        assert exchange(server, request, gap_s=0) == [b"HTTP/1.1 200 OK"]
    assert rss() - before < 40e6, (rss() - before) / 1e6  # +190 MB before
