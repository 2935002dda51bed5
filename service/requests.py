"""What every batched endpoint shares: the deadline, disconnect watching, mapping batcher
outcomes to HTTP errors, and the request metrics."""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Awaitable, TypeVar

from fastapi import Request

from service.batcher import DeadlineExceeded, QueueFull, RequestState, ShuttingDown
from service.errors import ApiError
from service.imaging import UPLOAD_TYPES
from service.registry import ModelRegistry

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def require_json(request: Request) -> None:
    """(async so that FastAPI does not hand it to a worker thread for every request)"""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"send the request body as application/json (got {media or 'no content type'!r})")


async def watch_disconnect(request: Request, state: RequestState) -> None:
    """Returns when the client hangs up (the body is already read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            state.cancelled = True
            return


async def until_done_or_gone(request: Request, state: RequestState, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch_disconnect(request, state))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone()
    try:
        return task.result()
    except QueueFull as full:
        raise ApiError(429, "the model's queue is full; retry later", headers={"Retry-After": str(max(1, round(full.retry_after_s)))})
    except DeadlineExceeded:
        raise ApiError(504, "the request's deadline passed before its images were computed")
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"})


@asynccontextmanager
async def measured(request: Request, model: str, version: int, operation: str):
    """Times the request and counts its final status under the model's labels."""
    metrics = registry_of(request).metrics.bound(model, str(version), operation)
    started = time.perf_counter()
    status = 200
    try:
        yield
    except ApiError as error:
        status = error.status
        raise
    except ClientGone:
        status = 499
        raise
    except Exception:
        status = 500
        raise
    finally:
        metrics.requests(str(status)).inc()
        metrics.request_duration.observe(time.perf_counter() - started)


def new_request_state(request: Request) -> RequestState:
    return RequestState(deadline=time.monotonic() + registry_of(request).settings.request_timeout_s)


async def read_upload(request: Request) -> tuple[bytes, str]:
    """The uploaded image's bytes and media type: a raw image body, or the `file` part of a
    multipart form."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "the multipart body needs a 'file' part holding the image")
        return await upload.read(), (upload.content_type or "").lower()
    if media in UPLOAD_TYPES:
        return await request.body(), media
    raise ApiError(415, f"send the image as {sorted(UPLOAD_TYPES)} or multipart/form-data (got {media or 'no content type'!r})")
