"""The edge ganserve puts in Ray's HTTP proxy (service/ray_serving/edge.py), driven as the proxy
drives it (ASGI scopes and messages), without a cluster: the limits a hostile probe found missing
under Ray. The same middleware through a real Ray proxy: tests/ray/test_ray_serve.py."""
from __future__ import annotations

import asyncio
import json

from service.ray_serving.edge import ProxyEdge

LIMITS = {"max_header_bytes": 4096, "max_body_bytes": 1 << 20, "body_timeout_s": 0.5, "body_budget_bytes": 4 << 20}


class RecordingApp:
    """The ingress's place: records what reached it, and answers 200 once told to."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict, bytes]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((scope, body))
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def http_scope(address: str = "10.0.0.1", headers: list[tuple[bytes, bytes]] | None = None, path: str = "/v1/models/m/upscale") -> dict:
    return {"type": "http", "method": "POST", "path": path, "headers": headers or [], "client": (address, 40000)}


class Client:
    """One request's side of the connection: the body as chunks, then silence (or a hang-up)."""

    def __init__(self, chunks: list[bytes], complete: bool = True, hang_up: bool = False) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()
        for index, chunk in enumerate(chunks):
            self.messages.put_nowait({"type": "http.request", "body": chunk, "more_body": not complete or index < len(chunks) - 1})
        if hang_up:
            self.messages.put_nowait({"type": "http.disconnect"})
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        return await self.messages.get()

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)

    def error(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"))


def run(coroutine):
    return asyncio.run(coroutine)


def test_headers_past_the_limit_are_431_json_and_never_reach_the_ingress():
    async def scenario():
        app = RecordingApp()
        edge = ProxyEdge(app, **LIMITS)
        client = Client([b"{}"])
        await edge(http_scope(headers=[(b"x-pad", b"a" * 5000)]), client.receive, client.send)
        return app, client

    app, client = run(scenario())
    assert client.status == 431 and client.error()["error"]["code"] == "headers_too_large" and not app.seen


def test_the_clients_request_id_and_timeout_headers_are_dropped_and_the_body_arrives_whole():
    """Ray's proxy took the client's X-Request-Id as the id in every log line (60 KB ids: 12 MB of
    log per 200 requests) and its X-Request-Timeout-Seconds as the request's timeout."""
    async def scenario():
        app = RecordingApp()
        edge = ProxyEdge(app, **LIMITS)
        client = Client([b"abc", b"def", b"g"])
        headers = [(b"x-request-id", b"z" * 1000), (b"x-request-timeout-seconds", b"0"), (b"content-type", b"image/png")]
        await edge(http_scope(headers=headers), client.receive, client.send)
        return app, edge, client

    app, edge, client = run(scenario())
    (scope, body), = app.seen
    assert body == b"abcdefg" and client.status == 200
    assert [name for name, _ in scope["headers"]] == [b"content-type"]
    assert edge.ledger.total == 0 and not edge.ledger.by_address


def test_one_address_holds_a_quarter_of_the_body_budget_and_another_is_still_served():
    """Bodies held a byte short of complete filled the ingress (3.8 GiB) from one address."""
    async def scenario():
        app = RecordingApp()
        edge = ProxyEdge(app, **(LIMITS | {"body_timeout_s": 5}))
        quarter = LIMITS["body_budget_bytes"] // 4
        piece = b"x" * (quarter // 2 - 10)
        holders = [Client([piece], complete=False) for _ in range(3)]  # bodies that never finish
        tasks = [asyncio.create_task(edge(http_scope("10.0.0.1"), c.receive, c.send)) for c in holders]
        await asyncio.sleep(0.05)
        other = Client([b"y" * 1000])
        await edge(http_scope("10.0.0.2"), other.receive, other.send)
        held_then = dict(edge.ledger.by_address)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return holders, other, held_then, edge

    holders, other, held_then, edge = run(scenario())
    statuses = sorted(str(c.status) for c in holders)
    assert statuses == ["503", "None", "None"], statuses  # the third would pass the address's quarter
    refused = next(c for c in holders if c.status == 503)
    assert dict((k.decode(), v.decode()) for k, v in refused.sent[0]["headers"])["retry-after"] == "1"
    assert other.status == 200
    assert held_then == {"10.0.0.1": 2 * (LIMITS["body_budget_bytes"] // 8 - 10)}
    assert edge.ledger.total == 0, "a request cancelled by the proxy (its client gone) keeps nothing counted"


def test_a_slow_body_is_408_a_declared_oversize_body_413_and_a_hang_up_answered_by_nobody():
    async def scenario():
        edge = ProxyEdge(RecordingApp(), **LIMITS)
        slow = Client([b"x" * 10], complete=False)
        await edge(http_scope(), slow.receive, slow.send)
        oversize = Client([b"x"])
        await edge(http_scope(headers=[(b"content-length", str(LIMITS["max_body_bytes"] + 1).encode())]), oversize.receive, oversize.send)
        chunked_over = Client([b"x" * (LIMITS["max_body_bytes"] // 2)] * 3)
        await edge(http_scope(), chunked_over.receive, chunked_over.send)
        gone = Client([b"x" * 100], complete=False, hang_up=True)
        await edge(http_scope(), gone.receive, gone.send)
        return edge, slow, oversize, chunked_over, gone

    edge, slow, oversize, chunked_over, gone = run(scenario())
    assert slow.status == 408 and slow.error()["error"]["code"] == "request_timeout"
    assert oversize.status == 413 and chunked_over.status == 413
    assert gone.sent == []
    assert edge.ledger.total == 0 and not edge.ledger.by_address


def test_a_newcomer_behind_the_same_address_takes_the_body_arriving_longest_once_it_is_old():
    """A client behind the same NAT as one holding bodies a byte short got 503 for every request
    (the address's quarter was full): the oldest of those bodies, arriving a while, makes room."""
    async def scenario():
        app = RecordingApp()
        edge = ProxyEdge(app, **(LIMITS | {"body_timeout_s": 5}), evictable_after_s=0.1)
        quarter = LIMITS["body_budget_bytes"] // 4
        holders = [Client([b"x" * (quarter // 2 - 10)], complete=False) for _ in range(2)]
        tasks = []
        for holder in holders:
            tasks.append(asyncio.create_task(edge(http_scope("10.0.0.1"), holder.receive, holder.send)))
            await asyncio.sleep(0.02)
        early = Client([b"y" * 1000])
        await edge(http_scope("10.0.0.1"), early.receive, early.send)  # before they are old: no room made
        await asyncio.sleep(0.15)
        neighbour = Client([b"y" * 1000])
        await edge(http_scope("10.0.0.1"), neighbour.receive, neighbour.send)
        await asyncio.sleep(0.01)
        statuses = [holder.status for holder in holders]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return early, neighbour, statuses, edge

    early, neighbour, statuses, edge = run(scenario())
    assert early.status == 503
    assert neighbour.status == 200
    assert statuses == [503, None], "the body arriving longest was answered 503 and its bytes given to the neighbour"
    assert edge.ledger.total == 0 and not edge.ledger.arriving


def test_with_the_budget_full_a_light_address_takes_the_heaviest_addresss_arriving_body():
    async def scenario():
        app = RecordingApp()
        app.release.clear()  # complete bodies stay in flight until released
        edge = ProxyEdge(app, **(LIMITS | {"body_timeout_s": 5}))
        quarter = LIMITS["body_budget_bytes"] // 4
        holders = [Client([b"x" * (quarter - 100 - i)], complete=False) for i in range(4)]  # four addresses, near their quarters
        tasks = [asyncio.create_task(edge(http_scope(f"10.0.1.{i}"), h.receive, h.send)) for i, h in enumerate(holders)]
        await asyncio.sleep(0.02)
        light = Client([b"y" * 1000])
        served = asyncio.create_task(edge(http_scope("10.0.2.1"), light.receive, light.send))
        await asyncio.sleep(0.02)
        taken = [h.status for h in holders]
        second = Client([b"z" * 2000])  # fits beside the light body, which is complete and in flight
        also_served = asyncio.create_task(edge(http_scope("10.0.2.2"), second.receive, second.send))
        await asyncio.sleep(0.02)
        app.release.set()
        await asyncio.gather(served, also_served)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return taken, light, second, edge

    taken, light, second, edge = run(scenario())
    assert taken == [503, None, None, None], taken  # the heaviest address's body (10.0.1.0 held the most)
    assert light.status == 200 and second.status == 200
    assert edge.ledger.total == 0


def test_bodies_complete_and_in_flight_are_never_taken_the_newcomer_gets_503():
    async def scenario():
        app = RecordingApp()
        app.release.clear()
        edge = ProxyEdge(app, **(LIMITS | {"body_timeout_s": 5}))
        quarter = LIMITS["body_budget_bytes"] // 4
        in_flight = [Client([b"x" * (quarter - 10)]) for _ in range(4)]
        tasks = [asyncio.create_task(edge(http_scope(f"10.0.1.{i}"), c.receive, c.send)) for i, c in enumerate(in_flight)]
        await asyncio.sleep(0.02)
        newcomer = Client([b"y" * 1000])
        await edge(http_scope("10.0.2.1"), newcomer.receive, newcomer.send)
        app.release.set()
        await asyncio.gather(*tasks)
        return in_flight, newcomer, edge

    in_flight, newcomer, edge = run(scenario())
    assert newcomer.status == 503 and [c.status for c in in_flight] == [200] * 4
    assert edge.ledger.total == 0
