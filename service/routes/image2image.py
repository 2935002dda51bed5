"""Image-to-image endpoints: `translate` (pix2pix / CycleGAN) and `upscale` (super-resolution).

Both take the image as the raw request body (image/png, image/jpeg, image/webp) or as the `file`
part of a multipart form, and answer with the image in the format asked (`format` query
parameter, else the Accept header, else PNG). The image's size is read from its header and
checked against the model's limits (GET /v1/models/{name} lists them) before it is decoded.

- translate: the image is mirror-padded to the network's size multiple (or resized to it with
  `fit=resize`), translated in one forward pass, and cropped (resized) back to its own size.
- upscale: the image is cut into fixed-size overlapping tiles; every tile is one batcher item,
  so tiles of different requests share batches; each tile's output is blended into the canvas
  as it comes back.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from service.admission import translate_bytes_per_pixel
from service.batcher import run_items
from service.errors import error_responses
from service.imaging import DECODE_BYTES_PER_PIXEL
from service.pipeline import (KnownQueryRoute, begin, checked_on_headers, context, estimate, execute, off_loop, query_value, registry_of,
                              request_deadline, require_kind, with_encoding)
from service.responses import choose_format, respond
from service.schemas import VERSION_TEXT, ImageFormat, VersionText
from service.tiling import padded_size, resized_size
from service.upscaling import over_limit, plan_upscale, upscale_upload
from service.uploads import IMAGE_BODY, prepare, probe, read_upload, resize_chw, upload_media

router = APIRouter(prefix="/v1", tags=["image-to-image"], route_class=KnownQueryRoute)  # 422 for a query parameter an operation does not take
IMAGE_RESPONSES = {200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/x-npy": {}}},
                   **error_responses(404, 406, 413, 415, 422, 429, 503, 504)}


def image_upload_to(kind: str, operation: str) -> Callable[[Request], None]:
    """The refusals an upload of an image to `operation` gets from its path, query and headers
    alone (`checked_on_headers`): 404 or 503 for the model or its `version`, 422 for its kind, 415
    for the body's type, 406 for an `Accept` it cannot answer (without `format=`)."""
    def check(request: Request) -> None:
        require_kind(begin(request, request.path_params["name"], operation, query_value(request, "version", VERSION_TEXT)), kind)
        upload_media(request)
        if "format" not in request.query_params:  # (a valid one is what is answered, whatever Accept says)
            choose_format(None, request.headers.get("accept"))
    return check


@router.post("/models/{name}/translate", openapi_extra=IMAGE_BODY, responses=IMAGE_RESPONSES)
@checked_on_headers(image_upload_to("translation", "translate"))
async def translate(name: str, request: Request, format: ImageFormat | None = Query(None),
                    fit: Literal["pad", "resize"] = Query("pad", description="pad (mirror) or resize to the size multiple"),
                    version: Annotated[VersionText | None, Query()] = None) -> Response:
    """Translate one image (pix2pix / CycleGAN A→B); the output has the input's size."""
    registry = registry_of(request)
    model = begin(request, name, "translate", version)
    require_kind(model, "translation")
    entry = model.entry
    fmt = choose_format(format, request.headers.get("accept"))
    data = await read_upload(request)
    width, height = await probe(registry, data, request_deadline(request))
    multiple, channels = entry.spec["size_multiple"], entry.spec["in_channels"]
    size = padded_size(height, width, multiple) if fit == "pad" else resized_size(height, width, multiple)
    over_limit(model, width, height, size[0] * size[1])
    cost = model.costs.get("model")
    units = cost.units_for_pixels(size[0] * size[1]) if cost else 1.0
    resident = height * width * DECODE_BYTES_PER_PIXEL + size[0] * size[1] * translate_bytes_per_pixel(max(channels, entry.spec["channels"]))

    async def work(state) -> np.ndarray:
        x = await prepare(registry, data, channels, size, fit)
        (output,) = await run_items(registry.batcher(model, "translate"), [{"image": x}], state)
        return output

    output = await execute(request, model, with_encoding(registry, estimate(model, "model", [units], resident), fmt, height * width), work)
    output = output[:, :height, :width] if fit == "pad" else await off_loop(request, resize_chw, output, height, width)
    return await respond(registry, entry, "translate", output[None], fmt, ctx=context(request))


@router.post("/models/{name}/upscale", openapi_extra=IMAGE_BODY, responses=IMAGE_RESPONSES)
@checked_on_headers(image_upload_to("super_resolution", "upscale"))
async def upscale(name: str, request: Request, format: ImageFormat | None = Query(None),
                  version: Annotated[VersionText | None, Query()] = None) -> Response:
    """Super-resolve one image by the model's scale, tile by tile (tiles batch across requests)."""
    registry = registry_of(request)
    model = begin(request, name, "upscale", version)
    require_kind(model, "super_resolution")
    entry = model.entry
    fmt = choose_format(format, request.headers.get("accept"))
    data = await read_upload(request)
    width, height = await probe(registry, data, request_deadline(request))
    plan = plan_upscale(model, width, height)
    cost = with_encoding(registry, plan.cost, fmt, width * height * entry.spec["scale"] ** 2)
    output = await execute(request, model, cost, lambda state: upscale_upload(registry, model, data, plan, state))
    response = await respond(registry, entry, "upscale", output[None], fmt, ctx=context(request))
    response.headers["X-Tiles"] = str(plan.tiles)
    return response
