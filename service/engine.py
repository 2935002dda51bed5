"""The engine's end of the front↔engine link: batches form here, in one place per device.

In `ganserve serve --workers N` the engine process loads the models and owns the batchers, lanes
and runtimes, exactly as the single-process server does; the front processes parse, validate,
admit and encode, and hand each request's items over a Unix socket (service/engine_link.py).
Items from every front land in the same per-(model, version, operation) queues, so a batch
mixes the fronts' requests as it mixes one process's requests.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.admission import beside_s, engine_booking, is_slight, recheck_in_the_engine, slowdown
from service.batcher import DeadlineExceeded, RequestState
from service.engine_link import EngineSnapshot, MessageProtocol, ModelSnapshot, encode_error
from service.registry import LoadedModel, ModelRegistry
from service.tiling import TileGrid
from service.upscaling import assemble_pixels

log = logging.getLogger("ganserve.engine")


def model_snapshot(model: LoadedModel) -> ModelSnapshot:
    runtime = (model.runtime.name, model.runtime.device) if model.runtime else None
    return ModelSnapshot(model.entry, model.state, model.error, model.config, dict(model.costs), model.limits, dict(model.latents),
                         dict(model.spreads), model.parity, runtime, model.lane.threads if model.lane else 1,
                         model.lane.backlog_s if model.lane else 0.0, model.capture, list(model.precision_rejected),
                         model.lane.running_for() if model.lane else 0.0, model.lane.steady_demand() if model.lane else 0.0)


def engine_snapshot(registry: ModelRegistry) -> EngineSnapshot:
    """(asked for by every front every SNAPSHOT_INTERVAL_S: also when the engine's GPU memory gauge
    is refreshed, since a front's /metrics cannot read the engine's device)"""
    if registry.device == "cuda":
        import torch

        registry.metrics.gpu_memory.labels("cuda:0").set(torch.cuda.memory_allocated())
    models = {name: {v: model_snapshot(m) for v, m in versions.items()} for name, versions in registry.models.items()}
    return EngineSnapshot(registry.loaded, registry.is_ready(), registry.draining, registry.encoder_table, registry.device, models,
                          registry.shared_device.other_share(), registry.shared_device.host_share())


def host_array(output) -> np.ndarray:
    """An output as the front can take it: a NumPy array (a tensor a runtime kept where it
    computed it is copied to the host; a front has no GPU context to unpickle it into)."""
    return output if isinstance(output, np.ndarray) else output.cpu().numpy()


class FrontConnection:
    """One front's socket: submits its requests' items to the batchers and streams each item's
    output back as soon as it is computed."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.requests: dict[int, RequestState] = {}
        self.protocol = MessageProtocol(self.received, self.lost)
        self.send = self.protocol.send
        self.waiting: asyncio.Task | None = None  # a front's start-up snapshot, sent once loading ends
        self.assembling: set[asyncio.Task] = set()  # upscales whose tiles are being assembled into their image
        self.on_lost: Callable[[], None] = lambda: None

    def received(self, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            self.submit(*message[1:])
        elif kind == "cancel":
            if (state := self.requests.get(message[1])) is not None:
                state.cancelled = True  # what is still queued is dropped before compute
        elif kind == "snapshot":
            if message[1] and not self.registry.loaded:  # answered the moment loading ends
                self.waiting = asyncio.create_task(self.snapshot_when_loaded(), name="snapshot-when-loaded")
            else:
                self.send(("snapshot", engine_snapshot(self.registry)))

    async def snapshot_when_loaded(self) -> None:
        await self.registry.loaded_event.wait()
        self.send(("snapshot", engine_snapshot(self.registry)))

    def lost(self) -> None:
        """The front has gone (shut down or died): what it still had queued is dropped."""
        for state in self.requests.values():
            state.cancelled = True
        if self.waiting is not None:
            self.waiting.cancel()
        self.on_lost()

    def submit(self, request_id: int, name: str, version: int, operation: str, graph: str,
               inputs: list[dict[str, np.ndarray]], deadline: float, grid: TileGrid | None, host_share: float = 0.0,
               protected_until: float | None = None) -> None:
        """Queues a request's items. With a tile `grid` (an upscale), the outputs are assembled
        into the image here, where they were computed (on a GPU, on the device), and one uint8
        image goes back instead of every tile's floats; otherwise each item's output goes back
        as it is computed."""
        state = RequestState(deadline=deadline, timing={}, protected_until=protected_until)
        try:
            model = self.registry.get(name, version)
            batcher = self.registry.batcher(model, operation, graph)
            lane = batcher.lane
            beside = self.registry.lanes_beside(model)

            def recheck(seconds: float) -> None:
                wait, alone = lane.expected_wait_s(), seconds / lane.threads
                other, host = self.registry.shared_device.other_share(), self.registry.shared_device.host_share()
                slowed = slowdown(lane, other + host)
                loads = (other, host) if slowed > 1.0 else (0.0, 0.0)
                recheck_in_the_engine(name, wait * slowed, alone * slowed, deadline - time.monotonic(), beside_s(lane, wait + alone, beside) * slowed, *loads)

            items = batcher.submit_items(inputs, state, recheck)
        except Exception as error:
            self.send(("refused", request_id, encode_error(error)))
            return
        # the engine lane's backlog holds every front's admitted work (the fronts read it in snapshots);
        # the items take their shares off as they finish, as in the single-process server
        state.lane_seconds = sum(item.seconds for item in items)
        state.lane = batcher.lane
        # booked here too (the fronts book it on their mirrors, for their admission): the engine's
        # projection job does not start while it would push a request booked on its lanes past its deadline
        booking = engine_booking(lane, state.lane_seconds, state.protected_deadline, self.registry.shared_device, host_share)
        lane.bookings.add(booking)
        state.lane.add_backlog(state.lane_seconds)
        state.slight = is_slight(state.lane_seconds, lane.threads, state.protected_deadline - time.monotonic())  # as a single process marks it
        self.requests[request_id] = state
        remaining = [len(items)]

        def answered(index: int, future: asyncio.Future) -> None:
            # The batcher fails the items it drops (deadline, hang-up) with DeadlineExceeded; an assembled
            # upscale that stops (its deadline, its first failed tile) cancels the tiles still pending, whose
            # exception() would raise here: one logged traceback per tile, and the request never forgotten.
            # Read for every item: asyncio would log each other tile's failure as "never retrieved".
            error = DeadlineExceeded() if future.cancelled() else future.exception()
            if grid is None:
                if error is not None:
                    self.send(("fail", request_id, index, encode_error(error)))
                else:
                    self.send(("result", request_id, index, host_array(future.result()), state.timing))
            remaining[0] -= 1
            if not remaining[0]:
                self.requests.pop(request_id, None)
                lane.bookings.discard(booking)
                state.lane.remove_backlog(state.lane_seconds)  # what its items did not settle
                state.lane_seconds = 0.0

        for index, item in enumerate(items):
            item.future.add_done_callback(lambda f, i=index: answered(i, f))
        if grid is not None:
            task = asyncio.create_task(self.assemble(request_id, model, [item.future for item in items], state, grid))
            self.assembling.add(task)
            task.add_done_callback(self.assembling.discard)

    async def assemble(self, request_id: int, model: LoadedModel, futures: list[asyncio.Future], state: RequestState,
                       grid: TileGrid) -> None:
        try:
            image = await assemble_pixels(model, futures, state, grid, self.registry.encoders)
        except Exception as error:
            self.send(("fail", request_id, 0, encode_error(error)))
        else:
            self.send(("result", request_id, 0, image, state.timing))


class EngineLink:
    """The Unix socket the fronts connect to. A load or unload is told to every front at once
    (a `models` message with a snapshot): the fronts but the one that forwarded it learnt of it
    at their next snapshot, and answered 503 "unloaded" for up to SNAPSHOT_INTERVAL_S meanwhile."""

    def __init__(self, registry: ModelRegistry, path: Path) -> None:
        self.registry = registry
        self.path = path
        self.server: asyncio.base_events.Server | None = None
        self.fronts: set[FrontConnection] = set()
        registry.on_models_changed.append(self.tell_fronts)

    def connected(self) -> asyncio.Protocol:
        front = FrontConnection(self.registry)
        self.fronts.add(front)
        front.on_lost = lambda: self.fronts.discard(front)
        return front.protocol

    def tell_fronts(self) -> None:
        if self.fronts:
            snapshot = engine_snapshot(self.registry)
            for front in self.fronts:
                front.send(("models", snapshot))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(self.connected, path=str(self.path))
        os.chmod(self.path, 0o600)
        log.info("engine link listening on %s", self.path)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
