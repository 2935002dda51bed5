"""Image-to-image endpoints: `translate` (pix2pix / CycleGAN) and `upscale` (super-resolution).

Both take the image as the raw request body (image/png, image/jpeg, image/webp) or as the `file`
part of a multipart form, and answer with the image in the format asked (`format` query
parameter, else the Accept header, else PNG).

- translate: the image is reflect-padded to the network's size multiple (or resized to it with
  `fit=resize`), translated in one forward pass, and cropped (resized) back to its own size.
- upscale: the image is cut into fixed-size overlapping tiles; every tile is one batcher item,
  so tiles of different requests share batches; the outputs are blended across the overlaps.
"""
from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from PIL import Image

from service.batcher import run_items
from service.errors import ApiError
from service.imaging import UploadError, decode_upload
from service.registry import IMAGE_TO_IMAGE, LoadedModel, ModelRegistry
from service.requests import ClientGone, measured, new_request_state, read_upload, registry_of, until_done_or_gone
from service.routes.v1 import choose_format, respond
from service.tiling import blend_tiles, cut_tiles, pad_to_multiple, plan_tiles

router = APIRouter(prefix="/v1", tags=["image-to-image"])
FORMAT_PATTERN = "^(png|jpeg|webp|npy)$"
IMAGE_BODY = {"requestBody": {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "multipart/form-data": {}}}}
IMAGE_RESPONSES = {200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/x-npy": {}}}}


def require_kind(model: LoadedModel, kind: str) -> None:
    entry = model.entry
    if entry.kind != kind:
        hint = f": POST to /v1/models/{entry.name}/{IMAGE_TO_IMAGE[entry.kind]}" if entry.kind in IMAGE_TO_IMAGE else ""
        raise ApiError(422, f"model {entry.name!r} is a {entry.kind} model, not a {kind} model{hint}")


async def decoded_upload(request: Request, registry: ModelRegistry) -> np.ndarray:
    data, _ = await read_upload(request)
    if not data:
        raise ApiError(422, "the request body is empty: send an image")
    try:
        return await asyncio.get_running_loop().run_in_executor(registry.encoders, decode_upload, data, registry.settings.max_upload_pixels)
    except UploadError as error:
        raise ApiError(error.status, str(error))


def model_input(image: np.ndarray, channels: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] → float32 [C, H, W] in [-1, 1]; one channel is the ITU-R 601 luma."""
    x = image.astype(np.float32) / 127.5 - 1
    if channels == 1:
        x = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize_chw(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a float [C, H, W] image, channel by channel."""
    return np.stack([np.asarray(Image.fromarray(c).resize((width, height), Image.Resampling.BICUBIC)) for c in x])


async def run_one(registry: ModelRegistry, model: LoadedModel, operation: str, items: list[np.ndarray], request: Request) -> list[np.ndarray]:
    state = new_request_state(request)
    work = run_items(registry.batcher(model, operation), [{"image": item} for item in items], state)
    return await until_done_or_gone(request, state, work)


@router.post("/models/{name}/translate", openapi_extra=IMAGE_BODY, responses=IMAGE_RESPONSES)
async def translate(name: str, request: Request, format: str | None = Query(None, pattern=FORMAT_PATTERN),
                    fit: str = Query("pad", pattern="^(pad|resize)$", description="pad (reflect) or resize to the size multiple"),
                    version: int | None = Query(None, ge=1)) -> Response:
    """Translate one image (pix2pix / CycleGAN A→B); the output has the input's size."""
    registry = registry_of(request)
    model = registry.get(name, version)
    require_kind(model, "translation")
    entry = model.entry
    async with measured(request, entry.name, entry.version, "translate"):
        fmt = choose_format(format, request.headers.get("accept"))
        image = await decoded_upload(request, registry)
        height, width = image.shape[:2]
        x = model_input(image, entry.spec["in_channels"])
        multiple = entry.spec["size_multiple"]
        if fit == "pad":
            x, _ = pad_to_multiple(x, multiple)
        else:
            x = resize_chw(x, max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple))
        try:
            (output,) = await run_one(registry, model, "translate", [x], request)
        except ClientGone:
            return Response(status_code=499)
        output = output[:, :height, :width] if fit == "pad" else resize_chw(output, height, width)
        return await respond(registry, entry, "translate", output[None], fmt, "grid", None, [])


@router.post("/models/{name}/upscale", openapi_extra=IMAGE_BODY, responses=IMAGE_RESPONSES)
async def upscale(name: str, request: Request, format: str | None = Query(None, pattern=FORMAT_PATTERN),
                  version: int | None = Query(None, ge=1)) -> Response:
    """Super-resolve one image by the model's scale, tile by tile (tiles batch across requests)."""
    registry = registry_of(request)
    model = registry.get(name, version)
    require_kind(model, "super_resolution")
    entry = model.entry
    settings = registry.settings
    async with measured(request, entry.name, entry.version, "upscale"):
        fmt = choose_format(format, request.headers.get("accept"))
        image = await decoded_upload(request, registry)
        height, width = image.shape[:2]
        if height * width > settings.max_upscale_input_pixels:
            raise ApiError(413, f"image of {width}x{height} pixels is over the upscale limit of {settings.max_upscale_input_pixels} input pixels")
        grid = plan_tiles(height, width, settings.upscale_tile, settings.upscale_overlap)
        tiles = cut_tiles(model_input(image, entry.spec["in_channels"]), grid)
        try:
            outputs = await run_one(registry, model, "upscale", tiles, request)
        except ClientGone:
            return Response(status_code=499)
        loop = asyncio.get_running_loop()
        output = await loop.run_in_executor(registry.encoders, blend_tiles, outputs, grid, entry.spec["scale"])
        response = await respond(registry, entry, "upscale", output[None], fmt, "grid", None, [])
        response.headers["X-Tiles"] = str(len(tiles))
        return response
