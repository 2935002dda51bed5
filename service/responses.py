"""Turning an operation's float images into the response: format negotiation (a `format`
parameter, else the Accept header, else PNG; 406 when Accept names nothing we can produce),
uint8 conversion, encoding (inline when small, else in the encoder pool) and the encode metric."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import time

import numpy as np
from fastapi import Response

from service.encoders import PILLOW_ONLY, EncoderTable
from service.errors import ApiError
from service.imaging import ACCEPT_FORMATS, CONTENT_TYPES, encode, encode_animation, grid, to_uint8

IMAGE_FORMATS = ("png", "jpeg", "webp", "npy")
ANY_MEDIA = {"*/*", "image/*", "application/*", "application/json"}  # no preference among our formats
# Encoding a single small image takes less time than handing it to a pool thread and back
# (measured on the 2-core machine: 140 µs to PNG-encode 32x32 inline, 250 µs through the pool),
# so those stay on the event loop; larger payloads go to the pool.
INLINE_ENCODE_MAX_VALUES = 64 * 64 * 3


QVALUE = re.compile(r"0(\.\d{0,3})?|1(\.0{0,3})?")  # RFC 9110's weight: 0 to 1, three decimals at most


def accepted_media(accept: str) -> list[str]:
    """The media types of an Accept header in the client's order of preference (q=0 dropped, and
    a range whose weight is no RFC 9110 qvalue, such as `q=2` or `q=1e400`, which outranked every
    well-formed one)."""
    ranked = []
    for position, part in enumerate(accept.split(",")):
        media, *params = [p.strip() for p in part.split(";")]
        quality = 1.0
        for param in params:
            if param.lower().startswith("q="):
                quality = float(param[2:]) if QVALUE.fullmatch(param[2:]) else 0.0
        if media and quality > 0:
            ranked.append((-quality, position, media.lower()))
    return [media for _, _, media in sorted(ranked)]


def choose_format(explicit: str | None, accept: str | None, allowed: tuple[str, ...] = IMAGE_FORMATS) -> str:
    """The response format: `explicit` (already validated), else the first allowed one the Accept
    header names, else the default (the first allowed). 406 when Accept names only formats this
    operation cannot produce."""
    if explicit:
        return explicit
    if not accept or not accept.strip():
        return allowed[0]
    for media in accepted_media(accept):
        if media in ANY_MEDIA:
            return allowed[0]
        fmt = ACCEPT_FORMATS.get(media)
        if fmt in allowed:
            return fmt
    offered = ", ".join(CONTENT_TYPES[f] for f in allowed)
    shown = accept if len(accept) <= 120 else accept[:120] + "…"  # never the client's whole header back
    raise ApiError(406, f"cannot answer with {shown!r}: this operation produces {offered} (or pass format=)", code="not_acceptable")


def encode_response(images: np.ndarray, fmt: str, layout: str, columns: int | None, tags: list[int],
                    encoders: EncoderTable = PILLOW_ONLY, tag_name: str = "seed") -> tuple[bytes, str]:
    """Runs in the encoder pool: one image → its bytes (a one-item JSON list when the client
    asked for a list: a client that parses the list broke on a lone image); several → grid, npy
    stack or JSON list, each item tagged `tag_name`: its seed, or its index in the request's
    strengths, cells or frames."""
    if fmt == "npy":
        return encode(images, "npy"), CONTENT_TYPES["npy"]
    if len(images) == 1 and layout != "list":
        return encode(images[0], fmt, encoders), CONTENT_TYPES[fmt]
    if layout == "list":
        payload = [{tag_name: s, "data": base64.b64encode(encode(img, fmt, encoders)).decode()} for s, img in zip(tags, images)]
        return json.dumps({"format": fmt, "images": payload}).encode(), "application/json"
    return encode(grid(images, columns), fmt, encoders), CONTENT_TYPES[fmt]


def encode_outputs(outputs: np.ndarray, value_range: tuple[float, float], fmt: str, layout: str, columns: int | None, tags: list[int],
                   encoders: EncoderTable = PILLOW_ONLY, tag_name: str = "seed") -> tuple[bytes, str]:
    return encode_response(to_uint8(outputs, value_range), fmt, layout, columns, tags, encoders, tag_name)


def encode_frames(frames: np.ndarray, value_range: tuple[float, float], fmt: str, frame_ms: int) -> bytes:
    """Runs in the encoder pool: float frames → uint8 → an animation."""
    return encode_animation(to_uint8(frames, value_range), fmt, frame_ms)


async def respond(registry, entry, operation: str, outputs: np.ndarray, fmt: str, layout: str = "grid", columns: int | None = None,
                  tags: list[int] | None = None, ctx=None, tag_name: str = "seed") -> Response:
    """float images [N, C, H, W] → uint8 → encoded (inline when small, else in the encoder pool) →
    Response. `ctx`: the request's context, whose encoding leaves the pool's backlog once done.
    Tags that are seeds are also sent as `X-Seeds`; other tags (`index`: edit's strengths, a
    style-mix's cells, frames) only name the items of a JSON list (they were sent as seeds)."""
    tags = tags or []
    value_range = tuple(entry.spec["value_range"])
    started = time.perf_counter()
    if outputs.size <= INLINE_ENCODE_MAX_VALUES:
        content, media_type = encode_outputs(outputs, value_range, fmt, layout, columns, tags, registry.encoder_table, tag_name)
    else:
        content, media_type = await asyncio.get_running_loop().run_in_executor(registry.encoders, encode_outputs, outputs, value_range, fmt, layout,
                                                                               columns, tags, registry.encoder_table, tag_name)
    encoded = time.perf_counter() - started
    if ctx is not None:
        ctx.encoded(registry.encoding)
    registry.metrics.bound(entry.name, str(entry.version), operation).encode_duration.observe(encoded)
    headers = {"X-Model-Version": str(entry.version), "Server-Timing": f"encode;dur={1000 * encoded:.2f}"} | ({"X-Seeds": ",".join(map(str, tags[:64]))} if tags and tag_name == "seed" else {})
    return Response(content, media_type=media_type, headers=headers)


async def respond_animation(registry, entry, frames: np.ndarray, fmt: str, frame_ms: int, ctx=None) -> Response:
    """float frames [T, C, H, W] → an animated GIF or WebP, converted and encoded in the encoder
    pool (the conversion on the event loop held it 494 ms for 120 frames at 1024²)."""
    started = time.perf_counter()
    content = await asyncio.get_running_loop().run_in_executor(registry.encoders, encode_frames, frames, tuple(entry.spec["value_range"]), fmt, frame_ms)
    encoded = time.perf_counter() - started
    if ctx is not None:
        ctx.encoded(registry.encoding)
    registry.metrics.bound(entry.name, str(entry.version), "interpolate").encode_duration.observe(encoded)
    return Response(content, media_type=CONTENT_TYPES[fmt], headers={"X-Model-Version": str(entry.version), "Server-Timing": f"encode;dur={1000 * encoded:.2f}"})
