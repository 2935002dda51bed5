"""A front process's registry (`ganserve serve --workers N`): the models as the engine describes
them, and batchers that hand items to the engine.

A front runs the whole HTTP app — parsing, validation, admission, the request pipeline, encoding,
metrics — but no runtime: `FrontRegistry.batcher` returns a `RemoteBatcher` whose `submit` has the
`DynamicBatcher`'s contract (all of a request's items or none; one future per item; the same
exceptions), and sends the items over the engine link (service/engine_link.py). The mirrored
models carry everything the routes read (entry, serving config, measured costs, limits, style
latents, direction spreads, precision parity, the runtime's name and device), refreshed from the
engine every `SNAPSHOT_INTERVAL_S` and at once when a load or unload has changed them.

Admission in a front compares a request's deadline with the larger of its own admitted backlog
(exact) and the engine lane's backlog (every front's work, as of the last snapshot, plus what the
fronts admitted since: `RemoteLane`); the engine's queue bound (429) and its deadline checks before
compute hold across fronts exactly.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.batcher import RequestState, ShuttingDown
from service.engine_link import EngineSnapshot, MessageProtocol, ModelSnapshot, decode_error
from service.errors import ApiError
from service.lanes import Booking, Claim, lane_share
from service.metrics import ServiceMetrics
from service.registry import LoadedModel, ModelRegistry
from service.settings import Settings
from service.tiling import TileGrid

log = logging.getLogger("ganserve.front")
SNAPSHOT_INTERVAL_S = 0.5
# an engine that has not answered a snapshot for this long is taken for hung (stopped, swapping, a
# native deadlock): the front answers unready and refuses new requests with 503, where it stayed
# ready and every request waited out its whole deadline for a 504
ENGINE_SILENT_S = 5.0
CONNECT_TIMEOUT_S = 120.0  # the engine process imports torch and binds its socket within this


def engine_silent_error(silent_s: float) -> ApiError:
    """What a front answers, at once, while its engine is silent: its requests would wait out their deadline."""
    return ApiError(503, f"the engine process has not answered for {silent_s:.0f} s; retry", headers={"Retry-After": "1"})


@dataclass(frozen=True)
class RuntimeLabel:
    """The engine's runtime as the routes describe it (the runtime itself stays in the engine)."""

    name: str
    device: str


class RemoteLane:
    """The part of a `Lane` admission reads: its threads, its backlog and its steady demand.

    A front sees the engine lane's backlog only as of the last snapshot (every
    `SNAPSHOT_INTERVAL_S`), so what every front admitted since is unseen. This front's share of it
    is exact; the other fronts' is taken to be as much again each (the kernel spreads connections
    evenly over the fronts' sockets). Without that term a burst split over N fronts was admitted N
    times over: two fronts admitted 16 upscales that could not all finish, and the last ones got
    504 at their deadline where one process answers 503 at once (found by a hostile probe)."""

    def __init__(self, name: str, threads: int, fronts: int = 1, share: float = 1.0) -> None:
        self.name = name
        self.threads = threads
        self.fronts = fronts
        self.share = share  # as `Lane.share`
        self.bookings: set[Booking] = set()  # this front's admitted requests (the engine rechecks what every front queued)
        self.claim: Claim | None = None  # as `Lane.claim`, for this front's refusals
        self.backlog_s = 0.0  # this front's admitted work on the model
        self.engine_backlog_s = 0.0  # every front's, as of the last snapshot
        self.admitted_since_snapshot_s = 0.0  # this front's admissions the last snapshot cannot have counted
        self.engine_running_since: float | None = None  # when the engine lane's longest-running batch began, by this clock
        self.engine_steady_demand = 0.0  # the engine lane's `steady_demand`, as of the last snapshot

    def add_backlog(self, seconds: float) -> None:
        self.backlog_s += seconds
        self.admitted_since_snapshot_s += seconds

    def remove_backlog(self, seconds: float) -> None:
        self.backlog_s = max(0.0, self.backlog_s - seconds)

    def observe(self, engine_backlog_s: float, engine_running_s: float = 0.0, steady_demand: float = 0.0) -> None:
        """A snapshot's figures: the engine lane's backlog, every front's admitted work in it, how
        long its longest-running batch has run (`Lane.running_for`) and its steady demand."""
        self.engine_backlog_s = engine_backlog_s
        self.engine_steady_demand = steady_demand
        self.admitted_since_snapshot_s = 0.0
        self.engine_running_since = time.monotonic() - engine_running_s if engine_running_s > 0 else None

    def running_for(self) -> float:
        """As `Lane.running_for`, from the last snapshot on: a silent engine's batch counts on."""
        return 0.0 if self.engine_running_since is None else time.monotonic() - self.engine_running_since

    def expected_wait_s(self) -> float:
        unseen = self.admitted_since_snapshot_s * self.fronts  # this front's since the snapshot, and as much from each other front
        return max(self.backlog_s, self.engine_backlog_s + unseen) / self.threads

    def steady_demand(self) -> float:
        """As `Lane.steady_demand`, every front's streams in it (half a second old: it moves over seconds)."""
        return self.engine_steady_demand

    def shutdown(self, wait: bool = True) -> None:
        pass


@dataclass(eq=False)
class PendingRequest:
    futures: list[asyncio.Future]
    request: RequestState
    seconds: list[float]  # each item's estimated compute: its share of the admitted backlog
    lane: RemoteLane
    compute_seen: float = 0.0  # the engine's compute seconds already added to the request's timing
    cancel_sent: bool = False


class EngineClient:
    """One front's connection to the engine: sends submits, routes each answer to its future."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.protocol = MessageProtocol(self.received, self.lost)
        self.pending: dict[int, PendingRequest] = {}
        self.ids = itertools.count(1)
        self.snapshots: asyncio.Queue[EngineSnapshot] = asyncio.Queue()
        self.on_models: Callable[[EngineSnapshot], None] = lambda snapshot: None
        self.connected = False

    async def connect(self) -> None:
        give_up = time.monotonic() + CONNECT_TIMEOUT_S
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.create_unix_connection(lambda: self.protocol, str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > give_up:
                    raise RuntimeError(f"no engine answered on {self.path} within {CONNECT_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.1)
        self.connected = True

    def send(self, message: tuple) -> None:
        if not self.connected:
            raise ShuttingDown()
        self.protocol.send(message)

    async def snapshot(self, when_loaded: bool = False) -> EngineSnapshot:
        """The engine's state now, or (`when_loaded`) once it has tried every model."""
        self.send(("snapshot", when_loaded))
        return await self.snapshots.get()

    def received(self, message: tuple) -> None:
        kind = message[0]
        if kind == "result":
            self.deliver(*message[1:])
        elif kind == "fail":
            self.fail_item(message[1], message[2], decode_error(message[3]))
        elif kind == "refused":
            if (pending := self.pending.get(message[1])) is not None:
                error = decode_error(message[2])
                for future in pending.futures:
                    if not future.done():
                        future.set_exception(error)
        elif kind == "snapshot":
            self.snapshots.put_nowait(message[1])
        elif kind == "models":  # a load or unload, told to every front as it happens (not an answer to an ask)
            self.on_models(message[1])

    def lost(self) -> None:
        """The engine has gone: what it held is lost (503), and this front is no longer ready."""
        if self.connected:
            log.error("the engine link closed")
        self.connected = False
        for pending in list(self.pending.values()):
            for future in pending.futures:
                if not future.done():
                    future.set_exception(ShuttingDown())

    def deliver(self, request_id: int, index: int, output: np.ndarray, timing: dict[str, float]) -> None:
        pending = self.pending.get(request_id)
        if pending is None:
            return
        self.settle(pending, index)
        if (mine := pending.request.timing) is not None and timing:
            mine["queue"] = max(mine.get("queue", 0.0), timing.get("queue", 0.0))
            compute = timing.get("compute", 0.0)
            mine["compute"] = mine.get("compute", 0.0) + compute - pending.compute_seen
            pending.compute_seen = compute
        future = pending.futures[index]
        if not future.done():
            future.set_result(output)

    def fail_item(self, request_id: int, index: int, error: Exception) -> None:
        pending = self.pending.get(request_id)
        if pending is None:
            return
        self.settle(pending, index)
        future = pending.futures[index]
        if not future.done():
            future.set_exception(error)

    @staticmethod
    def settle(pending: PendingRequest, index: int) -> None:
        """An item is done: its share of its request's admitted backlog leaves the lane (as
        DynamicBatcher.settle does in one process)."""
        share = min(pending.seconds[index], pending.request.lane_seconds)
        pending.request.lane_seconds -= share
        pending.lane.remove_backlog(share)

    def item_done(self, request_id: int, future: asyncio.Future) -> None:
        """A future the request no longer waits for (cancelled: its client left or its deadline
        passed) tells the engine to drop the request's queued items; once every future is done
        the request is forgotten."""
        pending = self.pending.get(request_id)
        if pending is None:
            return
        if future.cancelled() and not pending.cancel_sent and self.connected:
            pending.cancel_sent = True
            self.protocol.send(("cancel", request_id))
        if all(f.done() for f in pending.futures):
            del self.pending[request_id]

    async def close(self) -> None:
        self.connected = False
        self.protocol.close()


class RemoteBatcher:
    """A `DynamicBatcher`'s request side whose queue is in the engine. Upscale tiles are
    assembled into their image in the engine, where they were computed (`submit_tiles`)."""

    assembles_tiles = True

    def __init__(self, client: EngineClient, registry: "FrontRegistry", model: LoadedModel, operation: str, graph: str) -> None:
        self.client = client
        self.registry = registry
        self.name, self.version = model.entry.name, model.entry.version
        self.operation, self.graph = operation, graph

    def submit(self, inputs: list[dict[str, np.ndarray]], request: RequestState) -> list[asyncio.Future]:
        """One future per item, resolved by the item's output."""
        return self.send_request(inputs, request, None)

    def submit_tiles(self, inputs: list[dict[str, np.ndarray]], request: RequestState, grid: TileGrid) -> asyncio.Future:
        """An image's tiles; one future, resolved by the image the engine assembled from their
        outputs (uint8 [H·s, W·s, C]: service/upscaling.py `assemble_pixels`)."""
        (future,) = self.send_request(inputs, request, grid)
        return future

    def send_request(self, inputs: list[dict[str, np.ndarray]], request: RequestState, grid: TileGrid | None) -> list[asyncio.Future]:
        if self.registry.draining or not self.client.connected:
            raise ShuttingDown()
        model = self.registry.models.get(self.name, {}).get(self.version)
        if model is None:
            raise ApiError(503, f"model {self.name!r} v{self.version} is no longer served; retry", headers={"Retry-After": "1"})
        cost = model.costs.get(self.graph)
        seconds = [cost.item_seconds(cost.units(item)) if cost else 0.0 for item in inputs]
        if grid is not None:
            seconds = [sum(seconds)]  # one answer settles the whole image's share of the backlog
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in seconds]
        request_id = next(self.client.ids)
        self.client.pending[request_id] = PendingRequest(futures, request, seconds, model.lane)
        # (with the host work its admission was judged beside: a job's share promised in the engine reaches the fronts
        # with the next snapshot, and a request admitted before it is waited for by the job)
        self.client.send(("submit", request_id, self.name, self.version, self.operation, self.graph, inputs, request.deadline, grid,
                          self.registry.shared_device.host_share(), request.protected_until))
        done = functools.partial(self.client.item_done, request_id)
        for future in futures:
            future.add_done_callback(done)
        return futures


class FrontRegistry(ModelRegistry):
    """The registry of a front process: mirrors of the engine's models, remote batchers."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, link_path: Path, fronts: int) -> None:
        super().__init__(settings, metrics)
        self.client = EngineClient(link_path)
        self.client.on_models = self.models_told
        self.fronts = fronts
        self.engine_ready = False
        self.mirrored = False  # a first snapshot has been applied: the models are known
        self.device = "cpu"  # this process computes nothing; the models' own device is in their runtime label
        self.polling: asyncio.Task | None = None
        self.last_snapshot = time.monotonic()  # when the engine last answered a snapshot
        self.asked: collections.deque[float] = collections.deque()  # when each snapshot still awaited was asked for (answered in order)

    def engine_silent_s(self) -> float:
        """How long the engine has left a snapshot unanswered, once that is past ENGINE_SILENT_S;
        0 while it answers. Counted from the ask, not from the last answer: a front whose own
        loop stalled (5–10 s, short of the supervisor's kill) saw its last answer that long ago,
        and refused its first requests after the stall with a 503 blaming an engine that had
        answered all along. Before the periodic snapshots begin (loading), since the last answer."""
        now = time.monotonic()
        if self.polling is None:
            silent = now - self.last_snapshot
        else:
            silent = now - self.asked[0] if self.asked else 0.0
        return silent if silent > ENGINE_SILENT_S else 0.0

    def discover(self) -> None:
        """(the engine reads the repository; a front learns the models from its snapshots)"""

    async def load_all(self) -> None:
        """Mirrors the engine's models once it has tried them all. The first snapshot (at once)
        makes the models known as `loading`; the second is the engine's answer the moment its
        loading ends (every front waiting gets it in the same turn of the engine's loop), so no
        front lags the others by a polling interval: a client that saw one front ready finds the
        others ready too."""
        await self.client.connect()
        snapshot = await self.client.snapshot()
        self.apply(snapshot)
        while not snapshot.loaded:
            snapshot = await self.client.snapshot(when_loaded=True)
            self.apply(snapshot)
        self.encoder_table = snapshot.encoder_table.without_device_libraries()  # measured by the engine; a front has no GPU context
        self.settle_memory()
        self.loaded_event.set()
        self.polling = asyncio.create_task(self.follow_engine(), name="engine-snapshots")

    async def follow_engine(self) -> None:
        while self.client.connected:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            try:
                await self.refresh()
            except ShuttingDown:
                break

    async def refresh(self) -> None:
        self.asked.append(time.monotonic())
        try:
            snapshot = await self.client.snapshot()
        finally:
            self.asked.popleft()
        self.apply(snapshot)

    def models_told(self, snapshot: EngineSnapshot) -> None:
        """A load or unload in the engine, as it happened (before this front has mirrored the
        models once, start-up's snapshots bring them); this front's streams look whether their model is gone."""
        if self.loaded:
            self.apply(snapshot)
            self.models_changed()

    def derive_all_limits(self) -> None:
        """A front's limits are the engine's, from its snapshots (derived against the same shared budget)."""

    def apply(self, snapshot: EngineSnapshot) -> None:
        """Mirrors the engine's models; a mirror stays the same object while its entry does, so
        requests holding it keep their lane's backlog."""
        self.engine_ready = snapshot.ready and not snapshot.draining
        self.last_snapshot = time.monotonic()
        # the engine's reading: from here the engine's own compute would count as another process's
        self.shared_device.reported_other_share = snapshot.other_share
        self.shared_device.reported_host_share = snapshot.host_share
        self.mirrored = True
        models: dict[str, dict[int, LoadedModel]] = {}
        for name, versions in snapshot.models.items():
            for version, seen in versions.items():
                mirror = self.models.get(name, {}).get(version)
                if mirror is None or mirror.entry != seen.entry:
                    mirror = LoadedModel(seen.entry)
                    mirror.lane = RemoteLane(seen.entry.label, seen.lane_threads, self.fronts, lane_share(self.device, self.settings.intra_op_threads))
                update_mirror(mirror, seen)
                models.setdefault(name, {})[version] = mirror
        self.models = models

    def versions(self, name: str) -> dict[int, LoadedModel]:
        """(503, not 404, before this front has learnt which models the engine serves)"""
        if not self.mirrored:
            raise ApiError(503, "the server is starting: this front process has not heard from the engine yet; retry",
                           headers={"Retry-After": "1"})
        return super().versions(name)

    def missing_models(self) -> list[str]:
        """(none before this front has learnt which models the engine serves)"""
        return super().missing_models() if self.mirrored else []

    def stuck_lanes(self) -> dict[str, float]:
        """(the engine's lanes, from its snapshots; and the engine itself, once silent that long
        after its models loaded: while it loads, it answers no snapshot, and a front not live then
        would have an orchestrator restart a server loading large models, over and over)"""
        stuck = super().stuck_lanes()
        if self.polling is not None and (silent := self.engine_silent_s()) > self.settings.stuck_after_s:
            stuck["engine"] = round(silent, 1)
        return stuck

    def is_ready(self) -> bool:
        return (self.loaded and self.engine_ready and self.client.connected and not self.draining and not self.engine_silent_s()
                and self.memory.capacity > 0 and not self.stuck_lanes())  # (as its /health/live, not a snapshot later)

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """(503 at once while the engine is silent: its requests would wait out their deadline)"""
        if self.loaded and (silent := self.engine_silent_s()):
            raise engine_silent_error(silent)
        return super().get(name, version)

    def batcher(self, model: LoadedModel, operation: str, graph: str = "model") -> RemoteBatcher:
        key = f"{operation}/{graph}"
        if key not in model.batchers:
            if self.draining:
                raise ShuttingDown()
            model.batchers[key] = RemoteBatcher(self.client, self, model, operation, graph)
        return model.batchers[key]

    async def poll_repository(self, interval_s: float) -> None:
        """(the engine polls the repository)"""

    async def drain(self) -> None:
        """In-flight requests have been answered (the HTTP server waits for them first); the link
        closes and the pools stop."""
        self.draining = True
        if self.polling is not None:
            self.polling.cancel()
        await self.client.close()
        self.jobs.shutdown()
        self.encoders.shutdown(wait=True)


def update_mirror(mirror: LoadedModel, seen: ModelSnapshot) -> None:
    mirror.state, mirror.error, mirror.config = seen.state, seen.error, seen.config
    mirror.costs, mirror.limits, mirror.latents = seen.costs, seen.limits, seen.latents
    mirror.spreads, mirror.parity, mirror.mirrored_capture = seen.spreads, seen.parity, seen.capture
    mirror.precision_rejected = seen.precision_rejected
    mirror.runtime = RuntimeLabel(*seen.runtime) if seen.runtime else None
    mirror.lane.threads = seen.lane_threads
    mirror.lane.observe(seen.backlog_s, seen.running_s, seen.steady_demand)
