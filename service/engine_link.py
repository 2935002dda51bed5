"""The wire between front processes and the engine process (`ganserve serve --workers N`).

One Unix socket per front, messages as length-prefixed pickles (protocol 5). Both ends are
processes of this server started by the same supervisor, and the socket lives in a directory only
its user can open (0700), so pickle's trust assumption holds: nothing outside the server writes
to it. A message is a tuple whose first element names it:

front → engine
  ("submit", request_id, model, version, operation, graph, inputs, deadline, grid, host_share, protected_until)
                                                  items of one request; with a tile grid
                                                  (an upscale) the engine assembles their image;
                                                  host_share: the host work its admission counted;
                                                  protected_until: the server's deadline where the
                                                  client's (`deadline`) is shorter, else None
  ("cancel", request_id)                          its client left
  ("snapshot", when_loaded)                       the models' state, now or once every model is tried

engine → front
  ("result", request_id, index, output, timing)   one item's output (uint8 or float array), or
                                                  an assembled upscale's uint8 image (index 0)
  ("fail", request_id, index, error)              one item failed (error: `encode_error`)
  ("refused", request_id, error)                  the whole request was refused at submit
  ("snapshot", EngineSnapshot)                    the answer to a front's ask, in order
  ("models", EngineSnapshot)                      unasked, to every front: a load or unload happened

Deadlines travel as `time.monotonic()` values: on Linux CLOCK_MONOTONIC is one clock for every
process of the machine, so a deadline means the same instant on both ends.
"""
from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.batcher import DeadlineExceeded, QueueFull, RequestTooLarge, ShuttingDown
from service.errors import ApiError

HEADER = struct.Struct("!I")
MAX_MESSAGE_BYTES = 1 << 31  # a frame of the largest upscale output is ~50 MB; this only catches a broken stream


def pack(message: tuple) -> bytes:
    body = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(body)) + body


class MessageProtocol(asyncio.Protocol):
    """Either end of the link, as an asyncio protocol rather than streams: every complete message
    in what arrives is handed to `on_message` at once (no coroutine and two reads per message),
    and the messages sent in one turn of the event loop leave in one write (a batch of 16 items
    finishing is one system call to the front, not 16). Measured on the 2-core machine, single-image
    DCGAN through two fronts: see docs/benchmarks.md."""

    def __init__(self, on_message: Callable[[tuple], None], on_lost: Callable[[], None]) -> None:
        self.on_message, self.on_lost = on_message, on_lost
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.outgoing: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        received = self.received
        received += data
        offset, end = 0, len(received)
        while end - offset >= HEADER.size:
            (size,) = HEADER.unpack_from(received, offset)
            if size > MAX_MESSAGE_BYTES:
                self.transport.close()  # a broken stream: nothing after this can be framed
                return
            if end - offset - HEADER.size < size:
                break
            start = offset + HEADER.size
            message = pickle.loads(received[start : start + size])
            offset = start + size
            self.on_message(message)
        del received[:offset]

    def send(self, message: tuple) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self.flush)
        self.outgoing.append(pack(message))

    def flush(self) -> None:
        if self.outgoing and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def connection_lost(self, error: Exception | None) -> None:
        self.on_lost()

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()


def encode_error(error: BaseException) -> tuple:
    """An exception as plain data, for the kinds the request pipeline maps to answers."""
    if isinstance(error, ApiError):
        return ("api", error.status, error.message, error.code, dict(error.headers or {}))
    if isinstance(error, QueueFull):
        return ("queue_full", error.retry_after_s)
    if isinstance(error, RequestTooLarge):
        return ("too_large", str(error))
    if isinstance(error, DeadlineExceeded):
        return ("deadline",)
    if isinstance(error, ShuttingDown):
        return ("shutting_down",)
    return ("other", f"{type(error).__name__}: {error}")


def decode_error(data: tuple) -> Exception:
    kind = data[0]
    if kind == "api":
        _, status, message, code, headers = data
        return ApiError(status, message, code=code, headers=headers or None)
    if kind == "queue_full":
        return QueueFull(data[1])
    if kind == "too_large":
        return RequestTooLarge(data[1])
    if kind == "deadline":
        return DeadlineExceeded()
    if kind == "shutting_down":
        return ShuttingDown()
    return RuntimeError(data[1])


@dataclass
class ModelSnapshot:
    """What a front needs of one loaded model to validate, estimate and describe requests: all of
    it but the runtimes (which stay in the engine)."""

    entry: Any  # service.repository.ModelEntry
    state: str
    error: str | None
    config: Any  # service.model_config.ServingConfig | None
    costs: dict[str, Any]  # graph → service.costs.GraphCost
    limits: Any  # service.admission.ModelLimits | None
    latents: dict[str, Any]
    spreads: dict[str, float]
    parity: Any  # service.precision.PrecisionParity | None
    runtime: tuple[str, str] | None  # (name, device)
    lane_threads: int
    backlog_s: float  # the engine lane's backlog: every front's admitted work
    capture: dict[str, dict] = field(default_factory=dict)  # graph → captured shapes (service/graph_capture.py)
    precision_rejected: list = field(default_factory=list)  # service.precision.PrecisionParity: what `auto` tried and left
    running_s: float = 0.0  # how long the engine lane's longest-running batch has run (`Lane.running_for`)
    steady_demand: float = 0.0  # the engine lane's `Lane.steady_demand`


@dataclass
class EngineSnapshot:
    loaded: bool
    ready: bool
    draining: bool
    encoder_table: Any  # service.encoders.EncoderTable
    device: str
    models: dict[str, dict[int, ModelSnapshot]] = field(default_factory=dict)
    other_share: float = 0.0  # the engine's reading of the other processes' share of the cores (the fronts' among them)
    host_share: float = 0.0  # the engine's own work outside its lanes now (a projection job: `SharedDevice.host_share`)
