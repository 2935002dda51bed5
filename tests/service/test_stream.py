"""Streaming super-resolution over a real WebSocket (the `websockets` client) against the real
server: every frame answered once and in order, latest-wins dropping while the client is behind,
the same pixels as the HTTP endpoint, refusals as the API's errors, per-stream metrics, the
stream cap, the idle timeout and a clean shutdown with a stream open; and, from a raw socket,
the clients a library would not be: one that never reads, one that fragments without end."""
import base64
import contextlib
import io
import json
import os
import signal
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.serving import running_server

STREAM = "/v1/models/upx4/upscale/stream"


def frame(height: int, width: int, seed: int) -> bytes:
    """A smooth picture (small as PNG, so a burst of them arrives in a few milliseconds)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // width + seed * 17) % 256, y * 255 // height, np.full_like(x, seed * 40 % 256)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def ws_url(server, path: str = STREAM) -> str:
    return server.url.replace("http://", "ws://") + path


def answers(ws, count: int) -> list[dict]:
    """The next `count` frame answers; an answered frame's image is attached as `image`."""
    found = []
    while len(found) < count:
        message = json.loads(ws.recv(timeout=30))
        if message["type"] == "frame":
            message["image"] = ws.recv(timeout=30)
            assert isinstance(message["image"], bytes) and len(message["image"]) == message["bytes"]
        found.append(message)
    return found


def test_every_frame_is_answered_in_order_and_a_burst_drops_all_but_the_latest(server):
    with connect(ws_url(server) + "?format=png", max_size=2**24) as ws:
        ready = json.loads(ws.recv(timeout=30))
        assert ready["type"] == "ready" and ready["scale"] == 4 and ready["format"] == "png"
        for seed in range(10):  # sent at once: the server is still on an early frame when the rest arrive
            ws.send(frame(128, 128, seed))
        got = answers(ws, 10)
    assert [a["frame"] for a in got] == list(range(1, 11))
    kinds = [a["type"] for a in got]
    assert kinds[-1] == "frame"  # the latest always wins (even the first may be superseded before the worker takes it)
    assert "dropped" in kinds and set(kinds) <= {"frame", "dropped"}
    for answer in got:
        if answer["type"] == "dropped":
            assert answer["superseded_by"] > answer["frame"]
        else:
            assert Image.open(io.BytesIO(answer["image"])).size == (512, 512)
    last = got[-1]["stats"]
    assert last["answered"] == kinds.count("frame") and last["dropped"] == kinds.count("dropped") and last["p99_ms"] >= last["p50_ms"] > 0
    # dropped frames are counted under the version the stream serves (they were counted under version "")
    assert server.metric("ganserve_stream_frames_total", model="upx4", version="1", outcome="dropped") >= kinds.count("dropped")
    assert server.metric("ganserve_stream_frames_total", model="upx4", version="", outcome="dropped") == 0


def test_a_streamed_frame_has_the_pixels_of_the_http_upscale(server):
    image = frame(70, 90, 3)
    with connect(ws_url(server) + "?format=png", max_size=2**24) as ws:
        ws.recv(timeout=30)
        ws.send(image)
        (answer,) = answers(ws, 1)
    with server.client() as client:
        response = client.post("/v1/models/upx4/upscale", content=image, headers={"content-type": "image/png"}, params={"format": "png"})
    streamed, posted = (np.asarray(Image.open(io.BytesIO(data)), dtype=int) for data in (answer["image"], response.content))
    assert streamed.shape == posted.shape == (280, 360, 3)
    assert np.abs(streamed - posted).max() <= 1  # tiles may share batches of other sizes: float noise, never a seam


def test_bad_frames_are_refused_with_the_api_status_and_the_stream_goes_on(server):
    huge = frame(1100, 1000, 1)  # over the 1024² upscale input limit
    with connect(ws_url(server), max_size=2**24) as ws:
        ws.recv(timeout=30)
        ws.send(b"not an image")
        got = answers(ws, 1)
        ws.send(huge)
        got += answers(ws, 1)
        ws.send("a text message is not a frame")
        notice = json.loads(ws.recv(timeout=30))
        ws.send(frame(32, 48, 2))
        got += answers(ws, 1)
    assert [(a["frame"], a["type"], a.get("status")) for a in got] == [(1, "error", 422), (2, "error", 413), (3, "frame", None)]
    assert "1000x1100" in got[1]["error"]  # width x height
    assert notice["type"] == "error" and notice["frame"] is None and notice["status"] == 422
    assert got[2]["format"] == "jpeg" and Image.open(io.BytesIO(got[2]["image"])).format == "JPEG"


@pytest.mark.parametrize("path, status", [("/v1/models/nope/upscale/stream", 404), ("/v1/models/edges/upscale/stream", 422),
                                          ("/v1/models/upx4/upscale/stream?format=gif", 422), ("/v1/models/upx4/upscale/stream?version=0", 422),
                                          # digits str.isdigit() takes and int() does not (both once a 500)
                                          ("/v1/models/upx4/upscale/stream?version=%C2%B2", 422), ("/v1/models/upx4/upscale/stream?version=" + "9" * 4301, 422),
                                          # an option the stream does not take, or one given twice (each once accepted without a word)
                                          ("/v1/models/upx4/upscale/stream?scale=8", 422), ("/v1/models/upx4/upscale/stream?format=png&format=jpeg", 422),
                                          # no WebSocket endpoint there (once an empty text/plain 403)
                                          ("/v1/models/upx4/generate", 404), ("/static/playground.css", 404), ("/nope", 404)])
def test_a_refused_handshake_is_the_api_error(server, path, status):
    with pytest.raises(InvalidStatus) as refused:
        with connect(ws_url(server, path)):
            pass
    assert refused.value.response.status_code == status
    assert json.loads(refused.value.response.body)["error"]["message"]
    assert "without completing handshake" not in server.process.log_path.read_text(errors="replace")  # no ERROR line per refusal


def test_a_stream_a_browser_opens_from_another_sites_page_is_refused(server):
    """No CORS applies to WebSockets: a probe's page elsewhere opened 20 streams through its
    visitor's browser, read the upscales of its frames and took the visitor's share of the slots
    (the visitor's own stream then 503). A page of this server (an Origin naming its Host) and a
    client sending no Origin open theirs."""
    host = server.url.removeprefix("http://")
    for origin in ("http://elsewhere.example", f"http://{host}.evil.example", "null"):
        with pytest.raises(InvalidStatus) as refused:
            with connect(ws_url(server), origin=origin):
                pass
        assert refused.value.response.status_code == 403, origin
        assert "another site" in json.loads(refused.value.response.body)["error"]["message"]
    for origin in (f"http://{host}", None):
        with connect(ws_url(server) + "?format=png", origin=origin, max_size=2**24) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "ready"
            ws.send(frame(16, 16, 1))
            assert answers(ws, 1)[0]["type"] == "frame", origin


def test_a_plain_http_get_of_the_stream_says_it_is_a_websocket_endpoint(server):
    """It was a bare 404, as if nothing were there."""
    with server.client() as client:
        for method in ("GET", "HEAD"):
            answer = client.request(method, "/v1/models/upx4/upscale/stream")
            assert answer.status_code == 426 and answer.headers["upgrade"] == "websocket", method
        assert "WebSocket endpoint" in client.get("/v1/models/upx4/upscale/stream").json()["error"]["message"]
        assert client.get("/v1/models/nope/upscale/stream").status_code == 404  # as the handshake answers
        assert client.get("/v1/models/edges/upscale/stream").status_code == 422


def test_open_streams_report_their_fps_and_latency_in_metrics(server):
    with connect(ws_url(server)) as ws:
        stream = json.loads(ws.recv(timeout=30))["stream"]
        for seed in range(3):
            ws.send(frame(40, 40, seed))
            answers(ws, 1)
        assert server.metric("ganserve_stream_fps", stream=stream) > 0
        assert server.metric("ganserve_stream_latency_seconds", stream=stream, quantile="0.99") > 0
        assert server.metric("ganserve_streams_open", model="upx4") >= 1
        in_flight = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                     if line.startswith("ganserve_requests_in_flight{") and 'operation="upscale_stream"' in line and 'model="upx4"' in line]
        assert in_flight and float(in_flight[0].rsplit(" ", 1)[1]) == 0  # its frames were counted, and every one is answered
    assert server.metric("ganserve_stream_frames_total", model="upx4", outcome="answered") >= 3
    deadline = time.monotonic() + 10
    while f'stream="{stream}"' in httpx.get(f"{server.url}/metrics").text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f'stream="{stream}"' not in httpx.get(f"{server.url}/metrics").text  # a closed stream's series are gone


def test_the_stream_cap_the_idle_timeout_and_a_clean_shutdown_with_a_stream_open(repository):
    with running_server(repository, max_streams=1, stream_idle_s=1, models=["upx4"]) as server:
        url = ws_url(server)
        with connect(url) as first:
            first.recv(timeout=30)
            with pytest.raises(InvalidStatus) as refused:
                with connect(url):
                    pass
            assert refused.value.response.status_code == 503 and "Retry-After" in refused.value.response.headers
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                first.recv(timeout=30)
            assert closed.value.rcvd.code == 1001 and time.monotonic() - started < 10
        with connect(url) as second:  # the slot is free again
            second.recv(timeout=30)
            second.send(frame(32, 32, 1))
            answers(second, 1)
            stopping = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                second.recv(timeout=30)
        # uvicorn re-raises the signal once it has shut down cleanly, as process managers expect
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM) and time.monotonic() - stopping < 10


def test_only_frames_keep_a_stream_open_and_one_client_holds_half_the_streams(repository):
    """A hostile probe held every stream slot without sending a frame: each text message (answered
    with an error notice) restarted the idle timer, and one address could open all the slots. Now
    only a frame keeps a stream open, and one client address holds at most half of them, so
    another client still gets one."""
    with running_server(repository, max_streams=2, stream_idle_s=1, models=["upx4"]) as server:
        url = ws_url(server)
        with connect(url) as chatty:
            chatty.recv(timeout=30)
            with pytest.raises(InvalidStatus) as refused:  # this address holds its share: 1 of 2
                with connect(url):
                    pass
            assert refused.value.response.status_code == 503 and "share" in json.loads(refused.value.response.body)["error"]["message"]
            elsewhere = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), source_address=("127.0.0.2", 0))
            with connect(url, sock=elsewhere) as other:  # another client address gets the other slot
                assert json.loads(other.recv(timeout=30))["type"] == "ready"
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                while time.monotonic() - started < 15:  # neither is a frame to upscale: each answered with an error notice
                    for junk in ("still here", b"", b"not an image"):  # (binary junk, too, once kept the stream open: a re-probe)
                        chatty.send(junk)
                        assert json.loads(chatty.recv(timeout=30))["type"] == "error"
                    time.sleep(0.2)
            assert closed.value.rcvd.code == 1001 and "no frame" in closed.value.rcvd.reason and time.monotonic() - started < 5


def test_a_stream_outlives_the_header_timeout(repository):
    """A timer for the empty lines a client may send between HTTP requests was also armed on the
    upgrade that began a stream, and cut every stream after the header timeout (10 s by default)
    with an HTTP 408 written into the WebSocket (a hostile probe). Here the timeout is 1 s."""
    with running_server(repository, header_timeout_s=1, models=["upx4"]) as server:
        with connect(ws_url(server), max_size=2**24) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "ready"
            got = []
            for seed in range(4):
                time.sleep(0.8)
                ws.send(frame(32, 32, seed))
                got += answers(ws, 1)
    assert [a["type"] for a in got] == ["frame"] * 4


def test_an_open_stream_holds_a_connection_slot_and_is_never_closed_to_make_room(repository):
    """At the connection cap a connection waiting for a request is closed for a newcomer; a
    stream's connection is handed its slot at the upgrade and never waits in that line, however
    long it has been quiet. Since no newcomer can take a stream's connection, streams are half the
    cap at most, and one client's half of those (16 streams of one address, then 4 streams of each
    of 4 addresses, filled a cap of 16: two re-probes)."""
    with running_server(repository, max_connections=4, models=["upx4"]) as server:
        host, port = server.url.removeprefix("http://").split(":")

        def from_address(address: str) -> socket.socket:
            return socket.create_connection((host, int(port)), source_address=(address, 0))

        with connect(ws_url(server), max_size=2**24) as stream:
            assert json.loads(stream.recv(timeout=30))["type"] == "ready"
            with pytest.raises(InvalidStatus) as over_share:  # the client's share: 1 of the cap's 2 streams
                with connect(ws_url(server)):
                    pass
            assert over_share.value.response.status_code == 503 and b"its share" in over_share.value.response.body
            with connect(ws_url(server), max_size=2**24, sock=from_address("127.0.0.2")) as second:
                assert json.loads(second.recv(timeout=30))["type"] == "ready"
                with pytest.raises(InvalidStatus) as over_limit:  # half the cap
                    with connect(ws_url(server), sock=from_address("127.0.0.3")):
                        pass
                assert over_limit.value.response.status_code == 503 and b"half of GANSERVE_MAX_CONNECTIONS" in over_limit.value.response.body
                with from_address("127.0.0.3") as waiting, from_address("127.0.0.3"):  # the cap is full
                    time.sleep(1.2)  # everyone quiet past the idle bound
                    assert httpx.get(f"{server.url}/health/live").status_code == 200
                    waiting.settimeout(5)
                    assert waiting.recv(1) == b""  # the waiting connection made room, not a stream
                for quiet, seed in ((stream, 1), (second, 2)):
                    quiet.send(frame(32, 32, seed))
                    assert answers(quiet, 1)[0]["type"] == "frame"
        for _ in range(5):  # streams opened and closed give their slots back
            with connect(ws_url(server)) as passing:
                passing.recv(timeout=30)
        with httpx.Client() as first, httpx.Client() as other:
            assert first.get(f"{server.url}/health/live").status_code == other.get(f"{server.url}/health/live").status_code == 200


def test_a_frame_in_flight_when_the_server_stops_is_answered_before_the_stream_closes(repository):
    """uvicorn closed an open stream at once with 1012 on SIGTERM, and the frame it had accepted
    was never answered (HTTP requests in flight were). The frame here waits out a 1.5 s batching
    delay when the signal comes."""
    with running_server(repository, max_queue_delay_ms=1500, models=["upx4"]) as server:
        with connect(ws_url(server)) as ws:
            ws.recv(timeout=30)  # ready
            ws.send(frame(32, 32, 3))
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            (answered,) = answers(ws, 1)
            assert answered["type"] == "frame" and answered["frame"] == 1
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd.code == 1001
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)



@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "--workers 2"])
def test_unloading_the_model_answers_the_frame_in_flight_then_ends_its_streams(repository, workers):
    """A stream whose model was unloaded over the repository extension stayed open and answered
    every frame 503 for as long as frames came (a hostile probe). It now ends with 1001 saying
    so, an idle one at once, before the unload has finished its accepted work; a busy one once its
    frame in flight is answered with its image (here a 600² frame, seconds of compute) and the
    frame waiting behind it, never started, with an error notice (no retry: the stream ends). Under --workers the stream is in a front and the unload in the engine, which told the
    fronts only once the model's accepted work had finished: meanwhile their streams took frames
    and answered each 503 (a re-probe). Once the model is loaded again, a new stream serves it."""
    with running_server(repository, model_control=True, stream_idle_s=30, models=["upx4"], workers=workers) as server, \
            server.client() as client, ThreadPoolExecutor(1) as pool:
        with connect(ws_url(server)) as idle, connect(ws_url(server), max_size=2**26) as busy:
            idle.recv(timeout=30)
            busy.recv(timeout=30)
            sent = time.monotonic()
            busy.send(frame(600, 600, 3))
            time.sleep(0.5)
            busy.send(frame(32, 32, 4))  # waits behind the first
            time.sleep(0.2)
            unloading = time.monotonic()
            unload = pool.submit(client.post, "/v2/repository/models/upx4/unload")
            with pytest.raises(ConnectionClosed) as idle_closed:
                idle.recv(timeout=30)
            idle_closed_at = time.monotonic()
            in_flight, waiting = answers(busy, 2)
            with pytest.raises(ConnectionClosed) as busy_closed:
                busy.recv(timeout=30)
            assert unload.result().status_code == 200
        assert idle_closed.value.rcvd.code == busy_closed.value.rcvd.code == 1001
        assert "unloaded" in idle_closed.value.rcvd.reason and "unloaded" in busy_closed.value.rcvd.reason
        answered_at = sent + in_flight["latency_ms"] / 1000  # (the server's latency: from the frame's arrival)
        assert idle_closed_at < answered_at - 0.5, (idle_closed_at - unloading, answered_at - unloading)  # not once the accepted frame is done
        assert in_flight["type"] == "frame" and in_flight["frame"] == 1
        assert waiting["type"] == "error" and waiting["frame"] == 2 and waiting["status"] == 503 and "retry_after_s" not in waiting, waiting
        assert client.post("/v2/repository/models/upx4/load").status_code == 200
        with connect(ws_url(server)) as again:
            assert json.loads(again.recv(timeout=30))["type"] == "ready"
            again.send(frame(32, 32, 4))
            assert answers(again, 1)[0]["type"] == "frame"


def raw_stream(server, receive_buffer: int = 4096, path: str = STREAM, source: str | None = None) -> socket.socket:
    """A stream opened by hand (a tiny receive buffer, the handshake read, nothing else), so the
    test decides what is read and what is sent; `source`: the client address it comes from."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    if source is not None:
        sock.bind((source, 0))
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame."""
    mask = os.urandom(4)
    size = len(payload)
    length = bytes([0x80 | size]) if size < 126 else struct.pack(">BH", 0x80 | 126, size) if size < 1 << 16 else struct.pack(">BQ", 0x80 | 127, size)
    masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), size)).tobytes()
    return bytes([(0x80 if fin else 0) | opcode]) + length + mask + masked


def close_code(sock: socket.socket) -> int:
    """Reads the server's (unmasked) frames until its close frame; returns the close code."""
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            assert chunk, "closed without a close frame"
            data += chunk
        return data

    while True:
        opcode, size = exactly(2)
        size &= 0x7F
        size = struct.unpack(">H", exactly(2))[0] if size == 126 else struct.unpack(">Q", exactly(8))[0] if size == 127 else size
        payload = exactly(size)
        if opcode & 0x0F == 0x8:
            return struct.unpack(">H", payload[:2])[0]


def test_a_text_message_that_is_not_utf8_closes_the_stream_with_1007_and_no_error_in_the_log(server):
    sock = raw_stream(server)
    sock.settimeout(30)
    sock.sendall(client_frame(0x1, b"\xff\xfe not text"))
    assert close_code(sock) == 1007
    sock.close()
    assert "Invalid UTF-8" not in server.process.log_path.read_text(errors="replace")  # once an ERROR and a traceback per message


def test_streams_opened_and_closed_in_a_loop_write_nothing_per_connection_to_the_log(server):
    """The server keeps no access log; each handshake wrote three INFO lines (`"WebSocket …"
    [accepted]`, `connection open`, `connection closed`), so a client reconnecting in a loop
    filled the operator's log."""
    for _ in range(5):
        with connect(ws_url(server)) as ws:
            ws.send(json.dumps({"type": "hello"}))
        with pytest.raises(InvalidStatus) as refused:  # a refused handshake wrote two lines
            connect(ws_url(server, "/v1/models/nope/upscale/stream")).close()
        assert refused.value.response.status_code == 404
    time.sleep(0.5)  # the server's side of the last close
    log = server.process.log_path.read_text(errors="replace")
    assert "[accepted]" not in log and "connection open" not in log and "connection closed" not in log
    assert '"WebSocket ' not in log and "connection rejected" not in log


def test_a_stream_is_not_compressed_even_when_the_client_offers_it(server):
    """permessage-deflate was negotiated: an 8 KB message inflated to 7.9 MiB on the event loop
    (~24 ms each), so one stream sending such messages starved every other client. Frames are
    PNG/JPEG/WebP, which deflate cannot shrink anyway."""
    with connect(ws_url(server)) as ws:  # the websockets client offers permessage-deflate
        assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"


def test_a_client_that_stops_reading_is_disconnected_and_its_stream_slot_freed(repository):
    """A client that sends and never reads filled the server's buffers, and its stream's reader
    waited on a send for good: it held its slot (all 32 of them, a hostile probe found) for as
    long as it kept the socket. Now the connection is aborted after `send_timeout_s` without
    progress, and the slot comes back."""
    with running_server(repository, max_streams=1, send_timeout_s=1, models=["upx4"]) as server:
        stalled = raw_stream(server)
        stalled.settimeout(2)
        with pytest.raises(OSError):  # each text message earns an error notice it never reads; the server stops reading
            for _ in range(2_000_000):
                stalled.sendall(client_frame(0x1, b"x"))
        deadline = time.monotonic() + 20
        while True:
            try:
                with connect(ws_url(server)) as fresh:  # max_streams 1: refused while the stalled stream holds the slot
                    assert json.loads(fresh.recv(timeout=30))["type"] == "ready"
                break
            except InvalidStatus as refused:
                assert refused.response.status_code == 503 and time.monotonic() < deadline
                time.sleep(0.2)
        stalled.close()


def test_an_answer_the_client_does_not_read_stays_in_the_memory_budget_until_it_is_dropped(repository):
    """A frame's answer was released from the budget when handed to the socket; now its bytes stay
    reserved until they leave the process, here until the stalled client is dropped."""
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(noise, format="PNG")
    with running_server(repository, send_timeout_s=2, models=["upx4"]) as server:
        stalled = raw_stream(server, path=STREAM + "?format=png")  # 1600² of noise: ~6 MB of PNG (past what loopback's kernel buffers take), never read
        stalled.sendall(client_frame(0x2, noise.getvalue()))
        deadline = time.monotonic() + 60
        while server.metric("ganserve_stream_frames_total", outcome="answered") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        held = server.metric("ganserve_memory_reserved_bytes")
        assert held > 3e6, held  # the frame is over, its answer sits unread in the server
        deadline = time.monotonic() + 30
        while server.metric("ganserve_memory_reserved_bytes") > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.metric("ganserve_memory_reserved_bytes") == 0  # dropped after 2 s without progress: all given back
        stalled.close()


@pytest.mark.parametrize("piece,code", [(b"", 1008), (bytes(1024), 1009)], ids=["empty pieces", "1 KiB pieces"])
def test_a_message_in_endless_fragments_closes_the_connection(server, piece, code):
    """Empty continuation frames carry no bytes for `max_size` to count; parsed without end they
    stalled the event loop. Small ones are counted against the connection's small-frame budget
    (1008 past it); past MAX_FRAGMENTS frames of any size for one message the server closes with 1009."""
    from service.http_protocol import MAX_FRAGMENTS

    sock = raw_stream(server, receive_buffer=1 << 16)
    sock.settimeout(30)
    sock.recv(4096)  # ready
    with contextlib.suppress(OSError):  # the server may reset the connection before the last frames are written
        sock.sendall(client_frame(0x2, b"\x89PNG", fin=False) + client_frame(0x0, piece, fin=False) * (MAX_FRAGMENTS + 10))
    received = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            received += chunk
    close = received.find(b"\x88")  # a close frame: opcode 8, FIN
    assert close >= 0 and struct.unpack(">H", received[close + 2 : close + 4])[0] == code
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/health/live").status_code == 200

def test_a_frame_that_does_not_fit_the_memory_budget_is_refused_and_the_stream_goes_on(repository):
    # below what the loaded models hold: nothing fits, and the server says so (unready, 413: retrying cannot help)
    with running_server(repository, memory_budget=64 * 2**20, wait=False) as server:
        server.wait_loaded()
        with connect(ws_url(server)) as ws:
            ws.recv(timeout=30)
            ws.send(frame(32, 32, 1))
            refused = json.loads(ws.recv(timeout=30))
            ws.send(frame(32, 32, 2))
            again = json.loads(ws.recv(timeout=30))
    assert (refused["type"], refused["frame"], refused["status"], refused["code"]) == ("error", 1, 413, "too_expensive")
    assert (again["frame"], again["status"]) == (2, 413)


def test_a_frame_refused_for_memory_waits_its_turn_like_any_frame():
    """Its 503 goes through the stream's mailbox, so it is answered after the frame before it and
    is superseded like any waiting frame when a newer one arrives first (never overtaking)."""
    import asyncio

    from service.streams import Frame, LatestFrame

    async def turns() -> list:
        mailbox = LatestFrame()
        mailbox.put(Frame(1, b"png", 0.0))
        first = await mailbox.take()  # frame 1 is being upscaled
        mailbox.put(Frame(2, b"", 0.1, refusal={"status": 503, "code": "overloaded"}))
        second = await mailbox.take()  # the refusal, in its turn after frame 1
        mailbox.put(Frame(3, b"", 0.2, refusal={"status": 503, "code": "overloaded"}))
        mailbox.put(Frame(4, b"png", 0.3))
        third = await mailbox.take()  # a newer frame came before the refusal's turn: it is dropped, not answered out of order
        return [first, second, third]

    (no_drop, one), (none_dropped, refused), (dropped, latest) = asyncio.run(turns())
    assert (no_drop, one.number, none_dropped, refused.number, refused.refusal["status"]) == ([], 1, [], 2, 503)
    assert (dropped, latest.number, latest.refusal) == ([3], 4, None)


def test_the_first_of_two_frames_sent_back_to_back_to_an_idle_stream_is_answered_not_dropped():
    """Two frames read in one go (one TCP segment): the second superseded the first before the
    idle worker woke to take it, so an idle stream dropped a frame it was never behind on."""
    import asyncio

    from service.streams import Frame, LatestFrame

    async def turns() -> list:
        mailbox = LatestFrame()
        worker = asyncio.create_task(mailbox.take())
        await asyncio.sleep(0)  # the worker waits, idle
        mailbox.put(Frame(1, b"png", 0.0))
        mailbox.put(Frame(2, b"png", 0.0))  # before the worker has run again
        first = await worker
        mailbox.put(Frame(3, b"png", 0.1))  # the worker is busy with 1: 2 and 3 wait, latest wins
        return [first, await mailbox.take(), await mailbox.take() if mailbox.holds else None]

    (no_drop, one), (dropped, three), rest = asyncio.run(turns())
    assert (no_drop, one.number, dropped, three.number, rest) == ([], 1, [2], 3, None)


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def rest_of(sock: socket.socket) -> bytes:
    """What is left to read until the server closes or resets the connection."""
    received = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(1 << 16):
            received += chunk
    return received


def close_code_in(sock: socket.socket) -> int | None:
    """The close code of the server's close frame among what is left to read; None where none
    came: a server that closes with a flood unread resets the connection, and the kernel drops
    what it had not sent yet, the close frame with it."""
    received = rest_of(sock)
    close = received.rfind(b"\x88\x02") if b"\x88\x02" in received else received.rfind(b"\x88")
    return struct.unpack(">H", received[close + 2 : close + 4])[0] if close >= 0 and len(received) >= close + 4 else None


@pytest.mark.parametrize("opcode,payload", [(0x2, b"x"), (0x1, b"x"), (0x9, bytes(125))], ids=["one-byte frames", "text", "pings"])
def test_a_flood_of_small_messages_is_closed_with_1008_after_its_burst(server, opcode, payload):
    """30,000 one-byte frames every half second (8 MB in 20 s, a hostile probe) held the event
    loop for seconds at a time: another client's requests waited up to 7.0 s. Each message is
    work (parsed, handed to the stream, answered): past a burst of twice
    `GANSERVE_STREAM_MAX_MESSAGES_PER_S` at more than that the connection is closed with 1008, and what is left of its read is not
    parsed. (A flood of pings that were never read grew the server by 37 MB before pongs were
    skipped while the write buffer is full; it is now closed as any flood is.)"""
    from service.http_protocol import MAX_MESSAGES_PER_S

    def one_frame_answered() -> None:
        with connect(ws_url(server), max_size=2**24) as fresh:
            assert json.loads(fresh.recv(timeout=30))["type"] == "ready"
            fresh.send(frame(8, 8, 1))
            assert answers(fresh, 1)[0]["type"] == "frame"

    one_frame_answered()  # what a first stream allocates is not the flood's
    handled_before = sum(server.metric("ganserve_stream_frames_total", outcome=o) for o in ("answered", "dropped", "error"))
    before = rss_bytes(server.process.pid)
    flood = raw_stream(server, receive_buffer=1 << 16)
    flood.settimeout(10)
    with contextlib.suppress(OSError):  # the server may reset the connection before all of it is written
        flood.sendall(client_frame(opcode, payload) * 200_000)
    answered = rest_of(flood)  # until the server closed it (1008, or a reset that dropped the close frame)
    flood.close()
    time.sleep(0.5)
    handled = sum(server.metric("ganserve_stream_frames_total", outcome=o) for o in ("answered", "dropped", "error")) - handled_before
    handled += answered.count(b'"type":"error"') + answered.count(b"\x8a\x7d")  # text's error notices, pings' pongs
    assert handled <= 2 * MAX_MESSAGES_PER_S + 10, handled  # of 200,000 messages sent
    assert rss_bytes(server.process.pid) - before < 10e6
    one_frame_answered()  # the server goes on


def handshake(server, headers: str, version: str = "1.1") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a hand-written upgrade request to the stream."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {STREAM} HTTP/{version}\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{headers}\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:])
        while len(body) < int(fields.get("Content-Length", 0)) and (chunk := sock.recv(4096)):
            body += chunk
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


def test_a_handshake_websockets_refuses_is_the_api_json_error_and_a_large_cookie_opens_the_stream(server):
    """A missing key or another protocol version were refused in websockets' plain text; a 9 KB
    cookie line (an SSO cookie) or 130 headers got 431 from websockets' own 8 KiB / 128-header
    limits where every HTTP route served them (the server's header cap is 64 KiB)."""
    key = f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
    status, fields, body = handshake(server, "Sec-WebSocket-Version: 13\r\n")
    assert status == 400 and fields["content-type"] == "application/json" and "Sec-WebSocket-Key" in json.loads(body)["error"]["message"]
    status, fields, body = handshake(server, key + "Sec-WebSocket-Version: 8\r\n")
    assert status == 400 and fields["content-type"] == "application/json" and "Sec-WebSocket-Version" in json.loads(body)["error"]["message"]
    large = key + "Sec-WebSocket-Version: 13\r\n" + f"Cookie: session={'c' * 9000}\r\n" + "".join(f"X-Extra-{i}: {i}\r\n" for i in range(130))
    status, _, _ = handshake(server, large)
    assert status == 101
    # RFC 6455 §4.1: an HTTP/1.1 request (websockets switched an HTTP/1.0 one)
    status, fields, body = handshake(server, key + "Sec-WebSocket-Version: 13\r\n", version="1.0")
    assert status == 400 and fields["content-type"] == "application/json" and "HTTP/1.1" in json.loads(body)["error"]["message"]
    # but not 5,000 of them: websockets parses a handshake's headers again, in Python (~18 ms of the
    # event loop for 10,500 lines; a probe's 16 clients held /health/live at ~0.5 s)
    log = Path(server.process.log_path)
    logged = log.stat().st_size
    for _ in range(5):
        status, fields, body = handshake(server, key + "Sec-WebSocket-Version: 13\r\n" + "".join(f"X-{i}: 1\r\n" for i in range(5_000)))
        assert status == 431 and fields["content-type"] == "application/json" and "header fields" in json.loads(body)["error"]["message"]
    time.sleep(0.5)
    # (the first version of this refusal failed in connection_lost before uvicorn's clean-up: each
    # refused handshake's protocol and headers stayed in memory, +1.2 MB each, with a traceback logged)
    assert "Traceback" not in log.read_bytes()[logged:].decode(errors="replace")


def test_a_client_reconnecting_in_a_loop_gets_no_fresh_burst_each_time(server):
    """Each new connection started with a whole burst: hanging up and reconnecting sent ~272,000
    frames a second from one socket (a re-probe). An address's first 16 streams open with a whole
    burst; after that, one whole burst a second between them."""
    from service.connection_table import STREAM_OPENING_BURST
    from service.http_protocol import MAX_MESSAGES_PER_S

    burst = client_frame(0x2, b"x") * (2 * MAX_MESSAGES_PER_S - 20)  # within one connection's burst
    codes = []
    for _ in range(int(STREAM_OPENING_BURST) + 8):
        sock = raw_stream(server, receive_buffer=1 << 16, source="127.0.0.77")  # (an address of its own: the shared server's 127.0.0.1 keeps its openings)
        sock.settimeout(10)
        with contextlib.suppress(OSError):
            sock.sendall(burst)
            sock.shutdown(socket.SHUT_WR)
        codes.append(close_code_in(sock))  # (the close frame goes out at once: nothing else is queued before it)
        sock.close()
    assert codes[: int(STREAM_OPENING_BURST)].count(1008) == 0 and codes.count(1008) >= 4, codes  # the later ones, opened faster than one a second, had no whole burst
    # a client of that address that sends within its rate is still served, a frame in 512-byte fragments
    # and a backlog of 20 frames included (at 16 tokens a stream behind such a NAT was closed on its first frame)
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.bind(("127.0.0.77", 0))
    sock.connect((host, int(port)))
    picture = frame(32, 32, 5)
    with connect(ws_url(server), sock=sock, max_size=2**24) as fresh:
        assert json.loads(fresh.recv(timeout=30))["type"] == "ready"
        fresh.send(iter([picture[i : i + 512] for i in range(0, len(picture), 512)]))
        for _ in range(20):
            fresh.send(picture)
        got = answers(fresh, 21)
    assert [a["frame"] for a in got] == list(range(1, 22)) and got[-1]["type"] == "frame"


def test_a_large_frame_sent_in_4_kib_fragments_is_not_a_flood(server):
    """A 480 KB frame in 4 KiB fragments, 30 times a second, is 3,540 frames a second: it was
    closed with 1008 after 89 frames (when its frames had used up the connection's burst). Fragments of 1 KiB or more count by their bytes only."""
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise, format="PNG")
    data = noise.getvalue() + bytes(480_000 - len(noise.getvalue()))  # (a PNG with trailing bytes: Pillow reads it)
    pieces = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    with connect(ws_url(server), max_size=2**24) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        for _ in range(60):
            ws.send(iter(pieces))  # one message in 118 fragments: 7,080 frames in all, sent as fast as they go
        got = answers(ws, 60)
    assert [a["frame"] for a in got] == list(range(1, 61)) and {a["type"] for a in got} <= {"frame", "dropped"}
