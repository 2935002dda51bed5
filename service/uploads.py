"""Uploaded images, from bytes to model input, the same way for every operation that takes one
(translate, upscale, projection): read (a raw image body or a multipart `file` part), size read
from the header and checked before a pixel is decoded, decoded off the event loop, converted
(ITU-R 601 luma for one-channel models) and padded."""
from __future__ import annotations

from concurrent.futures import Executor

import numpy as np
from fastapi import Request
from PIL import Image

from service.errors import ApiError
from service.imaging import UPLOAD_TYPES, UploadError, decode_upload, fit_square, probe_upload
from service.pipeline import declared_media, in_pool
from service.tiling import pad_to

IMAGE_BODY = {"requestBody": {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "multipart/form-data": {}}}}  # for OpenAPI
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def upload_media(request: Request) -> str:
    """The upload's media type, 415 where it is no image type we decode nor a multipart form."""
    media = declared_media(request)
    if media != "multipart/form-data" and media not in UPLOAD_TYPES:
        raise ApiError(415, f"send the image as {sorted(UPLOAD_TYPES)} or multipart/form-data (got {media or 'no content type'!r})")
    return media


async def read_upload(request: Request) -> bytes:
    """The uploaded image's bytes: a raw image body, or the `file` part of a multipart form."""
    media = upload_media(request)
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as error:  # malformed multipart, too many parts
            raise ApiError(422, f"the multipart body could not be read: {getattr(error, 'detail', error)}")
        upload = form.get("file")
        if isinstance(upload, str):  # a part without a filename is a plain field to the parser
            raise ApiError(422, "the multipart body's 'file' part has no filename: send the image as a file part "
                                "(Content-Disposition: form-data; name=\"file\"; filename=\"image.png\")")
        if upload is None:
            if not form:  # no part ended: the parser keeps only parts closed by a boundary
                raise ApiError(422, "the multipart body holds no complete part: send the image as a part named 'file', "
                                    "and end the body with the closing boundary (--<boundary>--)")
            raise ApiError(422, f"the multipart body needs a 'file' part holding the image (it has {sorted(form.keys())[:8]})")
        data = await upload.read()
        if not data:
            raise ApiError(422, "the multipart body's 'file' part is empty: put the image's bytes in it")
    else:
        data = await request.body()
    if not data:
        raise ApiError(422, "the request body is empty: send an image")
    return data


async def probe(registry, data: bytes, deadline: float | None = None) -> tuple[int, int]:
    """(width, height) from the header, checked against the server's upload limit (413); 504
    where the encoder pool is busy past the request's `deadline` (`in_pool`)."""
    try:
        width, height = await in_pool(registry, probe_upload, data, deadline=deadline)
    except UploadError as error:
        raise ApiError(error.status, str(error))
    limit = registry.settings.max_upload_pixels
    if width * height > limit:
        raise ApiError(413, f"image of {width}x{height} pixels is over the limit of {limit} pixels")
    return width, height


def prepared_input(data: bytes, max_pixels: int, channels: int, size: tuple[int, int] | None = None, fit: str = "pad") -> np.ndarray:
    """(runs in the encoder pool) decode → model input [C, H, W] → mirror-padded (`fit="pad"`)
    or resized (`fit="resize"`) to `size`, or square-fitted to it (`fit="square"`, projection)."""
    image = decode_upload(data, max_pixels)
    if fit == "square":
        return to_model_input(fit_square(image, size[0]), channels)
    x = to_model_input(image, channels)
    if size is None:
        return x
    return pad_to(x, *size) if fit == "pad" else resize_chw(x, *size)


async def prepare(registry, data: bytes, channels: int, size: tuple[int, int] | None = None, fit: str = "pad",
                  pool: Executor | None = None, deadline: float | None = None) -> np.ndarray:
    """`prepared_input` off the event loop (in the registry's encoder pool, or `pool`; 504 where
    its turn has not come by `deadline`), its upload errors as API errors."""
    try:
        return await in_pool(registry, prepared_input, data, registry.settings.max_upload_pixels, channels, size, fit, deadline=deadline, pool=pool)
    except UploadError as error:
        raise ApiError(error.status, str(error))


def to_model_input(image: np.ndarray, channels: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] → float32 [C, H, W] in [-1, 1]; one channel is the luma."""
    x = image.astype(np.float32) / 127.5 - 1
    if channels == 1:
        x = (x @ LUMA)[..., None]
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize_chw(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a float [C, H, W] image, channel by channel."""
    return np.stack([np.asarray(Image.fromarray(c).resize((width, height), Image.Resampling.BICUBIC)) for c in x])
