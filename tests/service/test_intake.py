"""The request intake's hang-up detection, both ways it is told (service/intake.py): by our HTTP
protocol's callback, or (under any other server) by a disconnect message from `receive()`."""
import asyncio

from service.http_protocol import DISCONNECT_EXTENSION
from service.intake import RequestIntake, context_of


def http_scope(extensions: dict | None = None) -> dict:
    scope = {"type": "http", "method": "POST", "path": "/v1/models/m/generate", "headers": [(b"content-length", b"2")], "app": None}
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
