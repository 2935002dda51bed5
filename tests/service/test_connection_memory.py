"""What a connection holds once it has closed: nothing. Our HTTP and WebSocket protocols (service/
http_protocol.py) are run by uvicorn in a process of their own (`python -m
tests.service.test_connection_memory REPOSITORY`: a server in the test's own process leaves its
threads and memory behind for the tests after it), with the garbage collector off, so that anything
a closed connection leaves behind shows as a protocol object still alive (a reference cycle waits for
a full collection, and holds the connection's last request, headers and all, until then: +1.3 MB
per request of 10,500 header lines, before)."""
import gc
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def alive(kind: type) -> int:
    count = 0
    for thing in gc.get_objects():
        try:
            count += isinstance(thing, kind)
        except ReferenceError:  # (a dead weak proxy)
            pass
    return count


def protocols_left_after_connections(repository: Path) -> dict[str, int]:
    """Serves `repository` in this process, opens and closes 10 connections (a generate and a GET
    each) and 10 upscale streams with the garbage collector off, and counts the protocols alive."""
    import httpx
    import uvicorn
    from websockets.sync.client import connect

    from service.app import create_app
    from service.http_protocol import GuardedHttpProtocol, GuardedWebSocketProtocol, guarded_protocol, guarded_websocket_protocol
    from service.settings import Settings

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
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
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
    for _ in range(10):
        with httpx.Client(base_url=url, timeout=30) as client:  # a connection each
            assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200
            assert client.get("/health/live").status_code == 200
        with connect(f"ws://127.0.0.1:{port}/v1/models/upx4/upscale/stream") as stream:
            assert '"ready"' in stream.recv(timeout=30)
    time.sleep(1.0)  # (the server's side of the last close)
    return {"http": alive(GuardedHttpProtocol), "websocket": alive(GuardedWebSocketProtocol)}


def test_closed_connections_and_streams_leave_no_protocol_behind(repository):
    run = subprocess.run([sys.executable, "-m", "tests.service.test_connection_memory", str(repository)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"http": 0, "websocket": 0}  # 10 and 10 before


if __name__ == "__main__":
    print(json.dumps(protocols_left_after_connections(Path(sys.argv[1]))), flush=True)
    sys.stdout.flush()
    import os

    os._exit(0)  # (the server's thread and the models' pools: nothing to wait for)
