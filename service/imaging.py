"""Turning model outputs into response bytes: float tensors → uint8 → PNG/JPEG/WebP/npy.

Encoding is CPU work on the hot path, so it runs in a thread pool beside the event loop.
PNG uses zlib level 1: several times faster than the default level 6 for a few % more bytes.
"""
from __future__ import annotations

import io
import math
import re

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from service.encoders import PILLOW_ONLY, EncoderTable

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "npy": "application/x-npy", "gif": "image/gif"}
ACCEPT_FORMATS = {v: k for k, v in CONTENT_TYPES.items()} | {"image/jpg": "jpeg", "application/octet-stream": "npy"}
# decoding holds the RGB(A) image and converted copies: measured peaks (2048², `measure_peak`) 11 B/px
# for RGB, 18 for RGBA, LA and palette with transparency, +3–4 with an EXIF rotation, 14.5 for 16-bit grey
DECODE_BYTES_PER_PIXEL = 24


def to_uint8(batch: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """[N, C, H, W] floats in value_range → [N, H, W, C] uint8 (round half to even, as the
    runtimes' device-side conversion does). Images the runtime already converted pass through."""
    if batch.dtype == np.uint8:
        return batch
    low, high = value_range
    # one float temporary, worked in place: four fresh ones cost more than a 1024² JPEG's encoding
    scaled = np.subtract(batch, low, dtype=np.float32)
    scaled *= 255.0 / (high - low)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8).transpose(0, 2, 3, 1)


def tensor_to_uint8(batch, value_range: tuple[float, float]) -> np.ndarray:
    """`to_uint8` for a torch tensor, computed where the tensor is (on the GPU a quarter of the
    bytes then cross to the host): the same arithmetic, round half to even."""
    import torch

    low, high = value_range
    scaled = (batch.float() - low) * (255.0 / (high - low))
    return scaled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """[N, H, W, C] uint8 → one [H', W', C] image, `columns` per row (never more columns than
    images: a client's `columns` must not size an empty canvas)."""
    n, h, w, c = images.shape
    columns = min(columns or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        canvas[y : y + h, x : x + w] = images[i]
    return canvas


def encode(image: np.ndarray, fmt: str, encoders: EncoderTable = PILLOW_ONLY) -> bytes:
    """One [H, W, C] uint8 image (or an [N, H, W, C] stack for npy) → bytes, by the library the
    server's measured `encoders` table picks for the format and size (Pillow without one)."""
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, image, allow_pickle=False)
        return buffer.getvalue()
    if fmt not in ("png", "jpeg", "webp"):
        raise ValueError(f"unknown image format {fmt!r}")
    return encoders.encode(image, fmt)


def encode_animation(frames: np.ndarray, fmt: str, frame_ms: int) -> bytes:
    """[T, H, W, C] uint8 → an animated GIF or WebP that loops forever.

    An RGB frame goes into a GIF through Pillow's fast octree quantiser (256 colours): its default
    for RGB, median cut, took 13-71x as long (130 ms a 256² frame of noise, 322 ms a 1024² photo:
    120 frames held an encoder thread 15-39 s) for the same PSNR. WebP is written as still WebP is
    (quality 90, method 0): lossless, it took 8x as long at 1024² (351 ms a frame) for files 9x
    as large, where GIF's 256 colours are lossy anyway (`ganserve bench-animation`,
    bench/results/animation-latest.json)."""
    pictures = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    if fmt == "gif":
        pictures = [picture.quantize(256, method=Image.Quantize.FASTOCTREE) if picture.mode == "RGB" else picture for picture in pictures]
    buffer = io.BytesIO()
    options = {"quality": 90, "method": 0} if fmt == "webp" else {}
    pictures[0].save(buffer, format=fmt.upper(), save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0, **options)
    return buffer.getvalue()


UPLOAD_TYPES = {"image/png", "image/jpeg", "image/webp"}
UPLOAD_FORMATS = ["PNG", "JPEG", "WEBP"]  # what PIL may open: never its other plugins


EXIF_ORIENTATION = 0x0112
# an EXIF orientation → the transpose that shows the image as phones and browsers do (upright)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
SIDES_SWAPPED = {5, 6, 7, 8}


class UploadError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# A progressive JPEG's decoder walks every block of the image once per scan, and nothing bounds
# the scans: a 303 KB file of 10,000 empty 4096² scans took 13.4 s of a core, which no deadline
# stops (a decode cannot be cancelled) — its two of them held the whole decode pool. Encoders write
# 1 scan (baseline), 3 (one per component) or about 10 (libjpeg's progressive script).
MAX_JPEG_SCANS = 100
# Pillow walks a PNG's chunks and a JPEG's marker segments in Python, a few microseconds each, and
# keeps every JPEG segment it meets before the scan: an 8 MB upload of a 32x32 image made of 2 M empty
# APP1 segments (or 650 k empty PNG chunks) cost 4.2–5.0 s to open and as much again to decode, with
# 260 MB held, none of it in the pixels' cost (a hostile probe). Encoders write a few dozen, plus one
# IDAT chunk (or ICC/XMP segment) per 8–64 KB of data: past SEGMENTS_BASE + one per KiB of upload,
# the file is not opened (8 MB then walks at most ~9,200 of them: milliseconds).
SEGMENTS_BASE = 1024
# Pillow's header parser steps over fill bytes (0xFF) and garbage between segments one byte at a
# time in Python: 4 MB of them before the frame header cost 1.0-1.8 s to open (twice: probe, then
# decode). Encoders write none; past this many before the first scan the file is not opened (~30 ms).
MAX_JPEG_STRAY_BYTES = 64 * 1024
# A marker as libjpeg finds one (jdmarker.c `next_marker`): 0xFF, any more 0xFF (fill), then a code
# that is neither 0x00 (0xFF 0x00 is a stuffed data byte, skipped with other garbage) nor 0xFF; in a
# scan's entropy-coded data RSTn belongs to the data too. The look-behind lets a match start only
# at a run's first 0xFF, so a long run costs one pass, not one per byte of it (and it follows the
# leading literal, which keeps re's fast scan for it: 1.3 ms for a 4 MB JPEG, not 55).
FILL = re.compile(rb"\xff*")
MARKER_AFTER_SCAN = re.compile(rb"\xff(?<!\xff\xff)\xff*+[^\x00\xff\xd0-\xd7]")
MARKER_BETWEEN_SEGMENTS = re.compile(rb"\xff(?<!\xff\xff)\xff*+[^\x00\xff]")
NO_LENGTH_MARKERS = {0x01, 0xD8, *range(0xD0, 0xD8)}  # TEM, SOI, RSTn: markers without a length field
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def segment_limit(data: bytes) -> int:
    return SEGMENTS_BASE + len(data) // 1024


def next_marker(data: bytes, position: int, in_scan: bool) -> int | None:
    """Where the code byte of the next marker at or after `position` is, found as libjpeg finds it
    (`FILL`, `MARKER_AFTER_SCAN`); None past the end. The count read 0xFF 0xFF 0x00 as a fill byte
    and a marker 0x00 with a length, and jumped that far: libjpeg reads on, and decoded 20,000
    scans the count never saw (a 266 KB upload, 25 s of a core before any deadline could stop it)."""
    run_end = FILL.match(data, position).end()
    if position < run_end < len(data):
        code = data[run_end]
        if code != 0x00 and not (in_scan and 0xD0 <= code <= 0xD7):
            return run_end
    found = (MARKER_AFTER_SCAN if in_scan else MARKER_BETWEEN_SEGMENTS).search(data, run_end)
    return None if found is None else found.end() - 1


def jpeg_structure(data: bytes, max_scans: int, max_segments: int) -> tuple[int, int, int]:
    """(marker segments, scans, stray bytes before the first scan) a JPEG holds, counted without
    decoding until the segments or scans pass their limit, walked as libjpeg walks it
    (`next_marker`): each marker segment is skipped by its length, and a scan's entropy-coded data
    up to the next marker (so a thumbnail inside EXIF is not counted). Stray bytes are fill bytes
    and garbage between segments, which Pillow's header parser steps over one at a time."""
    position, segments, scans, stray, in_scan = 2, 0, 0, 0, False
    while scans <= max_scans and segments <= max_segments:
        code_at = next_marker(data, position, in_scan)
        if code_at is None:
            break
        if scans == 0:
            stray += max(0, code_at - 1 - position)  # (the bytes before the marker's own 0xFF)
        marker, in_scan = data[code_at], False
        if marker == 0xD9:  # end of image
            break
        segments += 1
        if marker in NO_LENGTH_MARKERS:
            position = code_at + 1
            continue
        position = code_at + 1 + int.from_bytes(data[code_at + 1:code_at + 3], "big")
        if marker == 0xDA:
            scans, in_scan = scans + 1, True
    return segments, scans, stray


def png_chunks(data: bytes, limit: int) -> int:
    """How many chunks a PNG holds, counted up to `limit` + 1 by their length fields."""
    position, chunks, size = len(PNG_SIGNATURE), 0, len(data)
    while position + 8 <= size and chunks <= limit:
        chunks += 1
        if data[position + 4:position + 8] == b"IEND":
            break
        position += 12 + int.from_bytes(data[position:position + 4], "big")
    return chunks


def check_structure(data: bytes) -> None:
    """422 for an upload whose opening or decoding would cost far more than its pixels say,
    checked before Pillow reads it: a JPEG past MAX_JPEG_SCANS scans, or a JPEG or PNG of more
    segments (chunks) than `segment_limit` allows for its size."""
    limit = segment_limit(data)
    if data[:3] == b"\xff\xd8\xff":
        segments, scans, stray = jpeg_structure(data, MAX_JPEG_SCANS, limit)
        if stray > MAX_JPEG_STRAY_BYTES:
            raise UploadError(422, f"the JPEG has {stray} bytes of padding or garbage between its header's segments (encoders write "
                                   f"none; at most {MAX_JPEG_STRAY_BYTES} are read): the parser steps over each, so it is not opened")
        if scans > MAX_JPEG_SCANS:
            raise UploadError(422, f"the JPEG has more than {MAX_JPEG_SCANS} scans (encoders write 1 to about 10); each costs a pass "
                                   "over the whole image, so it is not decoded")
        if segments > limit:
            raise UploadError(422, f"the JPEG has more than {limit} marker segments for its {len(data)} bytes (encoders write a few "
                                   "dozen); each costs the parser a step, so it is not opened")
    elif data.startswith(PNG_SIGNATURE) and png_chunks(data, limit) > limit:
        raise UploadError(422, f"the PNG has more than {limit} chunks for its {len(data)} bytes (encoders write a few dozen, and an "
                               "image's data in chunks of 8 KiB or more); each costs the parser a step, so it is not opened")


def open_upload(data: bytes) -> Image.Image:
    """PIL's lazy open: reads the header only, once `check_structure` has passed. 413 for images
    past PIL's decompression-bomb limit, 422 for anything that is not a PNG, JPEG or WebP."""
    check_structure(data)
    try:
        return Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError as error:
        raise UploadError(413, f"the image is far too large to decode ({error})")
    except UnidentifiedImageError:
        raise UploadError(422, "the upload is not a PNG, JPEG or WebP image")
    except Exception as error:  # recognised, but its header is broken or over Pillow's limits
        raise unreadable(error, "the image's header could not be read")


def unreadable(error: Exception, what: str) -> UploadError:
    """422 for an image Pillow recognised but could not read (`what`), Pillow's own limits named in
    ours: a PNG's compressed text or ICC-profile chunk inflating past MAX_TEXT_CHUNK (a 6 MiB
    profile in a 32² PNG, a probe; Pillow read it before the pixels or after, as the chunk lies).
    JPEG and WebP carry their profiles uncompressed, bounded by the upload's size."""
    if "MAX_TEXT_CHUNK" in str(error):
        return UploadError(422, f"{what}: one of the PNG's compressed text or ICC-profile chunks inflates past "
                                f"{PngImagePlugin.MAX_TEXT_CHUNK // 2**20} MiB (real ones are a few KiB)")
    if "MAX_TEXT_MEMORY" in str(error):  # (1,000 chunks each under the one-chunk cap: Pillow's words were all a client saw)
        return UploadError(422, f"{what}: the PNG's text chunks together inflate past {PngImagePlugin.MAX_TEXT_MEMORY // 2**20} MiB "
                                "(real ones are a few KiB)")
    return UploadError(422, f"{what} ({type(error).__name__}: {str(error)[:200]})")


def orientation(picture: Image.Image) -> int:
    """The EXIF orientation in the image's header (1, as stored, when there is none or its EXIF
    cannot be read). Only EXIF read with the header counts: a PNG's eXIf chunk after its pixels
    would be seen only once they are decoded, after the upload was sized (and its cost admitted)
    by `probe_upload`, which must agree with what `decode_upload` returns."""
    raw = picture.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is no reason to refuse the picture
        return 1
    return value if value in UPRIGHT else 1


def probe_upload(data: bytes) -> tuple[int, int]:
    """(width, height) of the image as it is shown (its EXIF orientation applied, as
    `decode_upload` applies it), from the header, without decoding its pixels."""
    picture = open_upload(data)
    width, height = picture.size
    if width < 1 or height < 1:
        raise UploadError(422, f"the image is {width}x{height} pixels")
    return (height, width) if orientation(picture) in SIDES_SWAPPED else (width, height)


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """An uploaded PNG/JPEG/WebP → RGB uint8 [H, W, 3] (alpha composited on black, grey expanded),
    upright as its EXIF orientation says (a phone's portrait photo is stored sideways with a tag:
    it was translated and upscaled lying on its side). Raises UploadError 422 for undecodable data
    and 413 past `max_pixels`, checked from the header before decoding."""
    picture = open_upload(data)
    upright = UPRIGHT.get(orientation(picture))
    width, height = picture.size
    if width * height > max_pixels:
        raise UploadError(413, f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels")
    try:
        picture.load()
    except Exception as error:
        raise unreadable(error, "the image could not be decoded")
    if picture.mode.startswith("I"):  # 16-bit grey PNG ("I;16", or "I"): Pillow's convert clips at 255 instead of scaling
        picture = Image.fromarray((np.asarray(picture) >> 8).clip(0, 255).astype(np.uint8), "L")  # (a gradient came out 99.6 % white)
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        picture = Image.alpha_composite(background, rgba)
    picture = picture.convert("RGB")
    return np.asarray(picture.transpose(upright) if upright is not None else picture)


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to size x size (bicubic)."""
    picture = Image.fromarray(image)
    side = min(picture.size)
    left, top = (picture.width - side) // 2, (picture.height - side) // 2
    return np.asarray(picture.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC))
