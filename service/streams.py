"""Real-time super-resolution over a WebSocket: a client app sends frames, the server answers
every frame, in order, with its upscale or a notice that it was dropped.

The protocol (`/v1/models/{name}/upscale/stream?format=jpeg`):

- after the handshake the server sends `{"type": "ready", "stream": slot, "model", "version",
  "scale", "format", "max_input_pixels", ...}`;
- the client sends each frame as one binary message (a PNG, JPEG or WebP image);
- the server answers every frame, in the order they arrived, with exactly one of
  - `{"type": "frame", "frame": n, "width", "height", "format", "bytes", "latency_ms", "stats"}`
    followed at once by one binary message holding the encoded image;
  - `{"type": "dropped", "frame": n, "superseded_by": m}`: the frame arrived while the stream was
    behind and a newer one (m) came before it could start (latest wins: a live feed wants the
    newest picture, not a growing backlog);
  - `{"type": "error", "frame": n, "status", "code", "error"}`: the frame was refused (not an
    image, over the model's limits, overloaded, …) with the same status and message the HTTP
    endpoint gives; the stream goes on.
- `stats` (fps over the last 5 s, p50/p99 latency over the last 256 frames, counts) also
  appear per open stream in /metrics.
- the server closes a stream with 1001 and a reason when it shuts down or the stream's model is
  unloaded (after answering the frames it holds: on an unload, the frame in flight with its
  image, a frame not yet started with an `error` notice, as an HTTP request not yet admitted is
  refused; frames sent after either are not read), and when the client sends no frame for
  `stream_idle_s`; a reload's new version takes over between frames.

A stream holds at most two frames (one being upscaled, one waiting), their bytes reserved from the
memory budget on arrival (a frame that does not fit is refused with 503), each admitted like an
HTTP request (deadline, lane backlog, memory budget), and its tiles share batches with every other
stream's and request's. An answer's bytes stay reserved until they have left the process (a
client that does not read holds them in the budget until the send timeout drops it). A stream
that sends no frame for `stream_idle_s` is closed (other messages, and frames refused for what
they are — not an image, over the model's limits — do not keep it open), and one
client address holds at most half of the streams the server takes (`max_streams`, and half of
`max_connections` at most; the whole server's under `--workers`: service/stream_slots.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from service.errors import ApiError
from service.http_protocol import FLUSHED_EXTENSION, SERVER_SHUTDOWN_EXTENSION
from service.intake import RequestContext, peer_host
from service.memory import OverBudget
from service.pipeline import deadline_of, execute_for, in_pool, with_encoding
from service.registry import ModelRegistry
from service.responses import encode_outputs
from service.upscaling import plan_upscale, upscale_upload
from service.uploads import probe

log = logging.getLogger("ganserve.streams")
STREAM_FORMATS = ("jpeg", "png", "webp")
LATENCY_WINDOW = 256  # frames the p50/p99 are taken over
FPS_WINDOW_S = 5.0
SERVER_REASONS = (429, 503, 504)  # refusals of a frame that keep its stream open as an answer would (the rest are the frame's fault)


@dataclass(frozen=True)
class Frame:
    number: int  # 1, 2, … in order of arrival
    data: bytes
    arrived: float  # time.monotonic()
    # an error notice answered in this frame's turn instead of computing it (its bytes did not fit the
    # memory budget, so none are kept): sent by the worker, it cannot overtake the frame before it
    refusal: dict | None = None


class LatestFrame:
    """The mailbox between a stream's reader and its worker. A frame that arrives while the worker
    is idle is handed to it at once (it is as good as started: a frame that follows it, in the same
    read, cannot supersede it — the first of two frames sent back to back to an idle stream was
    dropped); one that arrives while another is waiting replaces it (latest wins), and the replaced
    frames are remembered so that the worker answers them, in order, as dropped before it answers
    the newer one."""

    def __init__(self) -> None:
        self.handed: Frame | None = None  # taken by the idle worker, not yet started
        self.waiting: Frame | None = None
        self.superseded: list[int] = []
        self.closed = False
        self.worker_idle = False
        self.changed = asyncio.Event()

    @property
    def holds(self) -> bool:
        return self.handed is not None or self.waiting is not None

    def put(self, frame: Frame) -> Frame | None:
        """Hands `frame` to the idle worker, or leaves it waiting; returns the frame it superseded, if any."""
        self.changed.set()
        if self.worker_idle and self.handed is None:
            self.handed, self.worker_idle = frame, False
            return None
        replaced = self.waiting
        if replaced is not None:
            self.superseded.append(replaced.number)
        self.waiting = frame
        return replaced

    def close(self) -> list[Frame]:
        """No more frames; returns those left untaken."""
        self.closed = True
        self.changed.set()
        left = [frame for frame in (self.handed, self.waiting) if frame is not None]
        self.handed = self.waiting = None
        return left

    async def take(self) -> tuple[list[int], Frame | None]:
        """(frames dropped since the last take, the next frame), or ([], None) once closed."""
        while not self.holds and not self.closed:
            self.changed.clear()
            self.worker_idle = True
            try:
                await self.changed.wait()
            finally:
                self.worker_idle = False
        if self.closed:
            return [], None
        if self.handed is not None:
            frame, self.handed = self.handed, None
            return [], frame
        dropped, self.superseded = self.superseded, []
        frame, self.waiting = self.waiting, None
        return dropped, frame


class StreamStats:
    """A stream's running figures: what its client sees with every frame and /metrics shows."""

    def __init__(self) -> None:
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.answered_at: deque[float] = deque()
        self.started = time.monotonic()
        self.answered = self.dropped = self.errors = 0

    def record_answer(self, latency_s: float, now: float) -> None:
        self.answered += 1
        self.latencies.append(latency_s)
        self.answered_at.append(now)

    def fps(self, now: float) -> float:
        """Answers per second over the last FPS_WINDOW_S: the spacing of the answers in it (a
        stream slower than one frame per window keeps its last two answers' spacing)."""
        while len(self.answered_at) > 2 and self.answered_at[0] < now - FPS_WINDOW_S:
            self.answered_at.popleft()
        if len(self.answered_at) < 2:
            return len(self.answered_at) / max(now - self.started, 1e-3)
        return (len(self.answered_at) - 1) / max(self.answered_at[-1] - self.answered_at[0], 1e-6)

    def quantile_s(self, q: float) -> float:
        return float(np.quantile(np.fromiter(self.latencies, float), q)) if self.latencies else 0.0

    def summary(self, now: float) -> dict:
        return {"fps": round(self.fps(now), 2), "p50_ms": round(1000 * self.quantile_s(0.5), 2), "p99_ms": round(1000 * self.quantile_s(0.99), 2),
                "answered": self.answered, "dropped": self.dropped, "errors": self.errors}


class UpscaleStream:
    """One open stream: a reader task fills the mailbox, the worker answers frames one by one."""

    def __init__(self, websocket: WebSocket, registry: ModelRegistry, name: str, version: int | None, fmt: str, stream_id: str) -> None:
        self.websocket, self.registry = websocket, registry
        self.name, self.version, self.format, self.id = name, version, fmt, stream_id
        self.mailbox = LatestFrame()
        self.gone = asyncio.Event()  # the client left
        self.frame_context: RequestContext | None = None  # the frame in flight: told when the client leaves
        self.sending = asyncio.Lock()  # a frame's header and image go out back to back
        self.stats = StreamStats()
        self.busy = False
        # (loop time) when the stream last did work: opened, or a frame answered or refused for the
        # server's reasons. A frame that is no image (422/415) is no work: a client sending a few
        # junk bytes a minute held a slot for good (a re-probe)
        self.last_work = asyncio.get_running_loop().time()
        # why the stream closes once the frames it holds are answered (the server shuts down, or its model
        # was unloaded); from then on nothing more is read
        self.ending: str | None = None
        self.closing: asyncio.Task | None = None
        told = websocket.scope.get("extensions", {}).get(SERVER_SHUTDOWN_EXTENSION)
        if told is not None:  # our WebSocket protocol says when, instead of closing the stream at once (service/http_protocol.py)
            told.append(self.server_stopping)
        metrics = registry.metrics
        self.fps_gauge = metrics.stream_fps.labels(name, stream_id)
        self.latency_gauges = {"p50_ms": metrics.stream_latency.labels(name, stream_id, "0.5"), "p99_ms": metrics.stream_latency.labels(name, stream_id, "0.99")}

    async def run(self) -> None:
        metrics = self.registry.metrics
        metrics.streams_open.labels(self.name).inc()
        self.registry.on_models_changed.append(self.models_changed)
        reader = asyncio.create_task(self.read())
        try:
            await self.answer_frames()
        finally:
            self.registry.on_models_changed.remove(self.models_changed)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            metrics.streams_open.labels(self.name).dec()
            # NaN: under --workers the multiprocess files keep a series (it cannot be removed there),
            # and a closed slot must not go on showing its last stream's figures (its next stream overwrites them)
            for gauge in (self.fps_gauge, *self.latency_gauges.values()):
                gauge.set(float("nan"))
            if metrics.multiprocess():
                return
            for labels in ((self.name, self.id, "0.5"), (self.name, self.id, "0.99")):
                with contextlib.suppress(KeyError):
                    metrics.stream_latency.remove(*labels)
            with contextlib.suppress(KeyError):
                metrics.stream_fps.remove(self.name, self.id)

    async def read(self) -> None:
        """Frames into the mailbox until the client leaves, goes idle or the server drains."""
        idle_s = self.registry.settings.stream_idle_s
        number = 0
        try:
            while True:
                try:  # only work restarts the idle time: text messages, each answered with an error, held a slot forever
                    async with asyncio.timeout_at(self.last_work + idle_s):
                        message = await self.websocket.receive()
                except TimeoutError:
                    if self.busy or self.mailbox.holds:
                        self.worked()  # its frames are still being answered: idle from then on
                        continue
                    await self.close(1001, f"no frame for {idle_s:g} s")
                    return
                if message["type"] == "websocket.disconnect":
                    return
                if self.ending:  # frames sent after the stream began to end are not taken (the close says why)
                    continue
                if message.get("bytes") is not None:
                    number += 1
                    data = message["bytes"]
                    try:  # a waiting frame's bytes count against the memory budget like a request body
                        self.registry.memory.try_reserve(len(data))
                        arrived = Frame(number, data, time.monotonic())
                    except OverBudget as error:
                        arrived = Frame(number, b"", time.monotonic(), refusal={  # as the intake answers a body
                            "status": 413, "code": "too_expensive",
                            "error": f"this frame is {len(data)} bytes; the server's memory budget for requests is "
                                     f"{error.capacity / 2**20:.0f} MiB (GANSERVE_MEMORY_BUDGET less what the loaded models hold)"}
                            if error.permanent else {
                            "status": 503, "code": "overloaded", "retry_after_s": 1,
                            "error": "the server's memory budget is taken by requests in flight; this frame was not kept"})
                    replaced = self.mailbox.put(arrived)
                    if replaced is not None:
                        self.registry.memory.release(len(replaced.data))
                else:
                    await self.send({"type": "error", "frame": None, "status": 422, "code": "invalid_request",
                                     "error": "send each frame as one binary message holding a PNG, JPEG or WebP image"})
        except (WebSocketDisconnect, RuntimeError):  # the socket closed under us
            return
        finally:
            self.left()

    def worked(self) -> None:
        self.last_work = asyncio.get_running_loop().time()

    def server_stopping(self) -> None:
        self.end("the server is shutting down")

    def models_changed(self) -> None:
        """A load or unload (told by the registry; under --workers by the engine, through the
        front's mirror): a stream whose model is gone ends."""
        if self.ending is None and (reason := self.model_gone()):
            self.end(reason)

    def model_gone(self) -> str | None:
        """Why the model this stream upscales with is gone for good, else None. A reload's
        replacement takes over between frames, but an unloaded model comes back only when someone
        loads it: its stream stayed open and answered every frame 503 for as long as frames came."""
        try:
            model = self.registry.resolve(self.name, self.version)
        except ApiError as error:  # (a --workers front not yet mirroring the engine says 503: not gone)
            return f"{error.message}: this stream ends" if error.status == 404 else None
        if model.state == "unloaded":
            return f"model {self.name[:60]!r} was unloaded: this stream ends (connect again once it is loaded)"
        return None

    def end(self, reason: str) -> None:
        """The stream closes with `reason`: an idle one now, a busy one after the frames it holds."""
        self.ending = reason
        if not self.busy and not self.mailbox.holds:  # (the task kept: the loop holds tasks only weakly)
            self.closing = asyncio.get_running_loop().create_task(self.close(1001, reason))

    def left(self) -> None:
        """The client is gone: the frame in flight is stopped (its queued tiles dropped), nothing more is read."""
        self.gone.set()
        for untaken in self.mailbox.close():
            self.registry.memory.release(len(untaken.data))
        if self.frame_context is not None:
            self.frame_context.client_left()

    async def answer_frames(self) -> None:
        while True:
            dropped, frame = await self.mailbox.take()
            if frame is None:
                return
            self.busy = True  # from the take: a shutdown meanwhile must wait for this frame
            try:
                for number in dropped:
                    self.stats.dropped += 1
                    self.count("dropped", self.served_version())
                    await self.send({"type": "dropped", "frame": number, "superseded_by": frame.number})
                await self.answer(frame)
            finally:
                self.busy = False
            if self.ending is None and (reason := self.model_gone()):  # (a front may answer a frame before it is told)
                self.ending = reason
            if (self.ending or self.registry.draining) and not self.mailbox.holds:
                await self.close(1001, self.ending or "the server is shutting down")
                return

    async def answer(self, frame: Frame) -> None:
        registry = self.registry
        if frame.refusal is not None:  # the memory budget's refusal: the server's reason, so work all the same
            self.worked()
            self.stats.errors += 1
            self.count("error", self.served_version())
            await self.send({"type": "error", "frame": frame.number} | frame.refusal)
            return
        ctx = self.frame_context = RequestContext(frame.arrived, reserved=len(frame.data),  # the bytes reserved on arrival
                                                  client=peer_host(self.websocket.scope))
        version, held = "", 0
        try:
            model = registry.get(self.name, self.version)  # per frame: a reloaded model takes over between frames
            version = str(model.entry.version)
            width, height = await probe(registry, frame.data, deadline_of(registry, ctx))
            plan = plan_upscale(model, width, height)
            cost = with_encoding(registry, plan.cost, self.format, width * height * model.entry.spec["scale"] ** 2)
            output = await execute_for(registry, ctx, model, cost, lambda state: upscale_upload(registry, model, frame.data, plan, state))
            started = time.perf_counter()
            content, _ = await in_pool(registry, encode_outputs, output[None], tuple(model.entry.spec["value_range"]), self.format, "grid", None, [],
                                       registry.encoder_table)
            ctx.timing["encode"] = time.perf_counter() - started
            registry.metrics.encode_duration.labels(self.name, version, "upscale_stream").observe(ctx.timing["encode"])
            held = min(ctx.reserved, len(content))  # the answer's bytes: reserved until they have left the process
        except ApiError as error:
            if error.status == 499:  # the client left: nobody to answer
                return
            if error.status in SERVER_REASONS:
                self.worked()
            self.stats.errors += 1
            self.count("error", version)
            retry = "Retry-After" in error.headers and not self.ending  # (the stream closes next: no retry on it)
            await self.send({"type": "error", "frame": frame.number, "status": error.status, "code": error.code, "error": error.message}
                            | ({"retry_after_s": int(error.headers["Retry-After"])} if retry else {}))
            return
        except Exception as error:  # a broken model answers this frame with 500, never ends the stream
            self.worked()
            log.exception("stream %s frame %d", self.id, frame.number, exc_info=error)
            self.stats.errors += 1
            self.count("error", version)
            await self.send({"type": "error", "frame": frame.number, "status": 500, "code": "internal",
                             "error": f"internal error ({type(error).__name__}); the server's log has the details"})
            return
        finally:
            self.frame_context = None
            registry.memory.release(ctx.reserved - held)
            ctx.encoded(registry.encoding)
        self.worked()
        scale = model.entry.spec["scale"]
        now = time.monotonic()
        self.stats.record_answer(now - frame.arrived, now)
        stats = self.stats.summary(now)
        header = {"type": "frame", "frame": frame.number, "width": width * scale, "height": height * scale, "format": self.format,
                  "bytes": len(content), "latency_ms": round(1000 * (now - frame.arrived), 2),
                  "timing_ms": {stage: round(1000 * seconds, 2) for stage, seconds in ctx.timing.items()}, "stats": stats}
        try:
            await self.send(header, content)
        finally:
            self.release_when_sent(held)
        self.count("answered", version)
        registry.metrics.stream_frame_duration.labels(self.name, version).observe(time.monotonic() - frame.arrived)
        self.fps_gauge.set(stats["fps"])  # the figures the client was sent, computed once
        for key, gauge in self.latency_gauges.items():
            gauge.set(stats[key] / 1000)

    def release_when_sent(self, nbytes: int) -> None:
        """Gives `nbytes` back to the memory budget once the answer has left the process (our
        WebSocket protocol says when: service/http_protocol.py), at once under another server."""
        flushed = self.websocket.scope.get("extensions", {}).get(FLUSHED_EXTENSION)
        if flushed is None:
            self.registry.memory.release(nbytes)
        else:
            flushed(lambda: self.registry.memory.release(nbytes))

    def served_version(self) -> str:
        """The version the stream's frames go to now (a label for frames no model touched: dropped,
        or refused on arrival); "" while none is served (unloaded)."""
        try:
            return str(self.registry.get(self.name, self.version).entry.version)
        except ApiError:
            return ""

    def count(self, outcome: str, version: str = "") -> None:
        self.registry.metrics.stream_frames.labels(self.name, version, outcome).inc()

    async def send(self, message: dict, image: bytes | None = None) -> None:
        """A notice (and the image it announces); a client that has gone is no error."""
        if self.gone.is_set():
            return
        async with self.sending:
            try:
                await self.websocket.send_json(message)
                if image is not None:
                    await self.websocket.send_bytes(image)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.left()

    async def close(self, code: int, reason: str) -> None:
        reason = reason.encode()[:123].decode(errors="ignore")  # (a close frame holds at most 123 bytes of reason)
        async with self.sending:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.websocket.close(code, reason)
        self.left()
