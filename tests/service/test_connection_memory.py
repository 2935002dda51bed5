"""What a connection holds once it has closed: nothing. Our HTTP and WebSocket protocols (service/
http_protocol.py) are run in this process by uvicorn, with the garbage collector off, so that
anything a closed connection leaves behind shows as a protocol object still alive (a reference
cycle waits for a full collection, and holds the connection's last request, headers and all, until
then: +1.3 MB per request of 10,500 header lines, before)."""
import gc
import socket
import threading
import time

import httpx
import uvicorn
from websockets.sync.client import connect

from service.app import create_app
from service.http_protocol import GuardedHttpProtocol, GuardedWebSocketProtocol, guarded_protocol, guarded_websocket_protocol
from service.settings import Settings


def alive(kind: type) -> int:
    count = 0
    for thing in gc.get_objects():
        try:
            count += isinstance(thing, kind)
        except ReferenceError:  # (a dead weak proxy)
            pass
    return count


def test_closed_connections_and_streams_leave_no_protocol_behind(repository):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(repository=repository, models="digits,upx4", port=port, intra_op_threads=1, encoder_threads=1)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                           http=guarded_protocol(settings.header_timeout_s, settings.max_connections,
                                                                 settings.send_timeout_s, settings.max_header_bytes),
                                           ws=guarded_websocket_protocol(settings.send_timeout_s, settings.max_header_bytes,
                                                                         settings.stream_max_messages_per_s),
                                           ws_max_size=settings.max_body_bytes, ws_per_message_deflate=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        gc.collect()
        gc.disable()
        try:
            for _ in range(10):
                with httpx.Client(base_url=url, timeout=30) as client:  # a connection each
                    assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200
                    assert client.get("/health/live").status_code == 200
                with connect(f"ws://127.0.0.1:{port}/v1/models/upx4/upscale/stream") as stream:
                    assert '"ready"' in stream.recv(timeout=30)
            time.sleep(1.0)  # (the server's side of the last close)
            assert (alive(GuardedHttpProtocol), alive(GuardedWebSocketProtocol)) == (0, 0)
        finally:
            gc.enable()
    finally:
        server.should_exit = True
        thread.join(30)
