"""The v1 REST API: model listing and image generation."""
from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.batcher import run_items
from service.errors import ApiError
from service.imaging import CONTENT_TYPES, encode, format_from_accept, grid, to_uint8
from service.operations import MAX_SEED, generate_inputs, resolve_label
from service.registry import IMAGE_TO_IMAGE, LoadedModel
from service import style
from service.requests import ClientGone, measured, new_request_state, registry_of, require_json, until_done_or_gone

router = APIRouter(prefix="/v1", tags=["v1"])
# Encoding a single small image takes less time than handing it to a pool thread and back
# (measured on the 2-core machine: 140 µs to PNG-encode 32x32 inline, 250 µs through the pool),
# so those stay on the event loop; larger payloads go to the pool.
INLINE_ENCODE_MAX_VALUES = 64 * 64 * 3


class GenerateRequest(BaseModel):
    """Either `seeds` (one image per seed) or `n` images from `seed`, `seed + 1`, …"""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    seeds: list[int] | None = Field(None, min_length=1, description="one image per seed")
    n: int | None = Field(None, ge=1, description="number of images, seeded seed, seed+1, …")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    class_label: int | str | None = Field(None, alias="class", description="class index or name (conditional models)")
    version: int | None = Field(None, ge=1)
    format: str | None = Field(None, pattern="^(png|jpeg|webp|npy)$", description="default: from Accept, else png")
    layout: str = Field("grid", pattern="^(grid|list)$", description="several images: one grid image, or a JSON list of base64 images")
    columns: int | None = Field(None, ge=1, le=1024)
    truncation_psi: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="style models: pull w toward w_avg (1 = off)")

    @model_validator(mode="after")
    def check(self) -> "GenerateRequest":
        if self.seeds is not None and self.n is not None:
            raise ValueError("give either seeds or n, not both")
        if self.seeds is not None and any(s < 0 or s > MAX_SEED for s in self.seeds):
            raise ValueError(f"seeds must be between 0 and {MAX_SEED}")
        return self

    def seed_list(self) -> list[int]:
        return self.seeds if self.seeds is not None else [self.seed + i for i in range(self.n or 1)]


def describe(model: LoadedModel) -> dict:
    spec = model.entry.spec
    return {
        "version": model.entry.version, "state": model.state, "error": model.error,
        "runtime": model.runtime.name if model.runtime else None, "device": model.runtime.device if model.runtime else None,
        "kind": spec["kind"], "resolution": spec.get("resolution"), "channels": spec.get("channels"),
        "class_names": spec.get("class_names", []), "formats": sorted(spec.get("formats", {})),
        **({"direction_spreads": model.spreads} if model.spreads else {}),
    }


@router.get("/models")
async def list_models(request: Request) -> dict:
    registry = registry_of(request)
    return {"models": [
        {"name": name, "latest_version": max(versions), "versions": sorted(versions), "ready": any(m.ready for m in versions.values()), **describe(versions[max(versions)])}
        for name, versions in sorted(registry.models.items())
    ]}


@router.get("/models/{name}")
async def model_detail(name: str, request: Request) -> dict:
    versions = registry_of(request).versions(name)
    return {"name": name, "ready": any(m.ready for m in versions.values()),
            "versions": [{**describe(m), "spec": m.entry.spec} for _, m in sorted(versions.items())]}


def choose_format(body_format: str | None, accept: str | None) -> str:
    return body_format or format_from_accept(accept) or "png"


def encode_response(images: np.ndarray, fmt: str, layout: str, columns: int | None, seeds: list[int]) -> tuple[bytes, str]:
    """Runs in the encoder pool: one image → its bytes; several → grid, npy stack or JSON list."""
    if fmt == "npy":
        return encode(images, "npy"), CONTENT_TYPES["npy"]
    if len(images) == 1:
        return encode(images[0], fmt), CONTENT_TYPES[fmt]
    if layout == "list":
        payload = [{"seed": s, "data": base64.b64encode(encode(img, fmt)).decode()} for s, img in zip(seeds, images)]
        return json.dumps({"format": fmt, "images": payload}).encode(), "application/json"
    return encode(grid(images, columns), fmt), CONTENT_TYPES[fmt]


@router.post("/models/{name}/generate", dependencies=[Depends(require_json)],
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/x-npy": {}, "application/json": {}}}})
async def generate(name: str, body: GenerateRequest, request: Request) -> Response:
    """Images for seeds. One image comes back as image bytes; several as one grid image
    (`layout=grid`, the default), a JSON list of base64 images (`layout=list`), or an npy stack
    [N, H, W, C] uint8 (`format=npy`)."""
    registry = registry_of(request)
    model = registry.get(name, body.version)
    entry = model.entry
    async with measured(request, entry.name, entry.version, "generate"):
        seeds = body.seed_list()
        limit = registry.settings.max_images_per_request
        if len(seeds) > limit:
            raise ApiError(422, f"{len(seeds)} images asked; at most {limit} per request")
        if body.seeds is None and body.seed + len(seeds) - 1 > MAX_SEED:
            raise ApiError(422, "seed + n runs past the largest seed")
        label = resolve_label(entry, body.class_label)
        fmt = choose_format(body.format, request.headers.get("accept"))
        state = new_request_state(request)
        if entry.kind in IMAGE_TO_IMAGE:
            raise ApiError(422, f"model {entry.name!r} is a {entry.kind} model: POST an image to /v1/models/{entry.name}/{IMAGE_TO_IMAGE[entry.kind]}")
        if entry.kind == "style":
            work = style_images(registry, model, seeds, body.truncation_psi, state)
        else:
            if body.truncation_psi != 1.0:
                raise ApiError(422, "truncation_psi applies to style models only")
            work = run_items(registry.batcher(model, "generate"), generate_inputs(entry, seeds, label), state)
        try:
            outputs = await until_done_or_gone(request, state, work)
        except ClientGone:
            return Response(status_code=499)
        return await respond(registry, entry, "generate", np.stack(outputs), fmt, body.layout, body.columns, seeds)


async def style_images(registry, model: LoadedModel, seeds: list[int], psi: float, state) -> np.ndarray:
    w = await style.seeds_to_w(registry, model, seeds, psi, state)
    return await style.synthesize(registry, model, style.broadcast(model, w), state)


async def respond(registry, entry, operation: str, outputs: np.ndarray, fmt: str, layout: str, columns: int | None, tags: list[int]) -> Response:
    """float images → uint8 → encoded (inline when small, else in the encoder pool) → Response."""
    images = to_uint8(outputs, tuple(entry.spec["value_range"]))
    started = time.perf_counter()
    if images.size <= INLINE_ENCODE_MAX_VALUES:
        content, media_type = encode_response(images, fmt, layout, columns, tags)
    else:
        content, media_type = await asyncio.get_running_loop().run_in_executor(registry.encoders, encode_response, images, fmt, layout, columns, tags)
    registry.metrics.bound(entry.name, str(entry.version), operation).encode_duration.observe(time.perf_counter() - started)
    headers = {"X-Model-Version": str(entry.version)} | ({"X-Seeds": ",".join(map(str, tags[:64]))} if tags else {})
    return Response(content, media_type=media_type, headers=headers)
