"""What a connection and a request hold once they are done: nothing. Our HTTP and WebSocket
protocols (service/http_protocol.py) are run by uvicorn in a process of their own (`python -m
tests.service.test_connection_memory REPOSITORY`: a server in the test's own process leaves its
threads and memory behind for the tests after it), with the garbage collector off, while the test
drives it from outside, so that anything left behind shows: a protocol object still alive, or
objects only a reference cycle holds (a cycle waits for a full collection, and held a closed
connection's last request, headers and all, until then: +1.3 MB per request of 10,500 header
lines, before). The client is the test's process, so its own cycles (httpx makes ~47 a request)
are not counted."""
import gc
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image
from websockets.sync.client import connect


def alive(kind: type) -> int:
    count = 0
    for thing in gc.get_objects():
        try:
            count += isinstance(thing, kind)
        except ReferenceError:  # (a dead weak proxy)
            pass
    return count


def serve_and_count(repository: Path) -> None:
    """Serves `repository` in this process on a free port, printed as the first line, and answers
    each line of stdin: `begin` collects what start-up left and turns the collector off; `count`
    prints the protocols alive and the objects only reference cycles hold since `begin`."""
    import uvicorn

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
    print(port, flush=True)
    for line in sys.stdin:
        if line.strip() == "begin":
            gc.collect()
            gc.disable()
            print("ok", flush=True)
        elif line.strip() == "count":
            gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept in gc.garbage, to be counted
            gc.collect()
            cyclic = [f"{type(thing).__module__}.{type(thing).__qualname__}" for thing in gc.garbage]
            print(json.dumps({"http": alive(GuardedHttpProtocol), "websocket": alive(GuardedWebSocketProtocol),
                              "cyclic": len(cyclic), "cyclic_kinds": sorted(set(cyclic))[:20]}), flush=True)


def png(side: int) -> bytes:
    encoded = io.BytesIO()
    Image.new("RGB", (side, side), (40, 160, 90)).save(encoded, "PNG")
    return encoded.getvalue()


def requests_of_each_kind(url: str) -> None:
    """A connection each: a generate, its 422 and 404, an upscale, a v2 inference, a GET; and an upscale stream."""
    picture = png(16)
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200
        assert client.post("/v1/models/digits/generate", json={"seed": "one"}).status_code == 422
        assert client.post("/v1/models/nothing/generate", json={"seed": 1}).status_code == 404
        assert client.post("/v1/models/upx4/upscale", content=picture, headers={"content-type": "image/png"}).status_code == 200
        assert client.post("/v2/models/digits/infer", json={"inputs": [{"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}).status_code == 200
        assert client.get("/health/live").status_code == 200
    with connect(url.replace("http://", "ws://") + "/v1/models/upx4/upscale/stream") as stream:
        assert '"ready"' in stream.recv(timeout=30)
        stream.send(picture)
        assert '"frame"' in stream.recv(timeout=30)
        assert isinstance(stream.recv(timeout=30), bytes)


def test_closed_connections_requests_and_streams_leave_nothing_for_the_collector(repository):
    server = subprocess.Popen([sys.executable, "-m", "tests.service.test_connection_memory", str(repository)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=Path(__file__).parents[2])
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        requests_of_each_kind(url)  # (first uses import and build what stays: not counted)

        def ask(command: str) -> str:
            server.stdin.write(command + "\n")
            server.stdin.flush()
            return server.stdout.readline()

        assert ask("begin").strip() == "ok"
        for _ in range(10):
            requests_of_each_kind(url)
        time.sleep(1.0)  # (the server's side of the last close)
        left = json.loads(ask("count"))
    finally:
        server.kill()
        server.wait()
    # 10 and 10 protocols before, each holding its connection's last request
    assert (left["http"], left["websocket"], left["cyclic"]) == (0, 0, 0), left


def test_a_workers_server_keeps_no_reference_cycles_in_its_engine_or_fronts(repository, tmp_path, monkeypatch):
    """Under `--workers 2` every process runs with the collector off (a `sitecustomize` hook,
    tests/service/collector_hook) and counts, on the test's signal, what only reference cycles
    hold: between twenty rounds of every kind of request and ten more, nothing new in the
    supervisor, the engine or either front (the rounds before may make one-time things: a front's
    first stream imports websockets' handshake code, ~300 objects in cycles)."""
    from bench.server import process_roles
    from tests.serving import running_server

    hook = Path(__file__).parent / "collector_hook"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("GANSERVE_TEST_CYCLES_DIR", str(tmp_path))

    def counts(stamp: str) -> dict[int, int]:
        (tmp_path / "count").write_text(stamp)
        deadline = time.monotonic() + 30
        found: dict[int, int] = {}
        while time.monotonic() < deadline and len(found) < len(roles):
            time.sleep(0.2)
            for pid in roles:
                lines = (tmp_path / f"{pid}.txt").read_text().split("\n") if (tmp_path / f"{pid}.txt").exists() else []
                found.update({pid: int(line.split()[1]) for line in lines if line.startswith(stamp + " ")})
        return found

    with running_server(repository, workers=2, models=["digits", "upx4"]) as server:
        roles = process_roles(server.process.pid)
        assert sorted(roles.values()) == ["engine", "front", "front", "supervisor"]
        for _ in range(20):  # (each round's connections reach one front: both have had their first of each within 20, but by 2^-19)
            requests_of_each_kind(server.url)
        before = counts("after-20")
        for _ in range(10):
            requests_of_each_kind(server.url)
        after = counts("after-30")
    assert len(before) == len(after) == 4, (before, after)
    assert {roles[pid]: after[pid] - before[pid] for pid in roles} == {roles[pid]: 0 for pid in roles}, (before, after)


if __name__ == "__main__":
    serve_and_count(Path(sys.argv[1]))
    os._exit(0)  # (the server's thread and the models' pools: nothing to wait for)
