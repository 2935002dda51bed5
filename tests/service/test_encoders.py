"""The encoder choice: both libraries write what the other would (PNG pixel for pixel, JPEG and WebP
within their loss), and the server keeps the faster one per format and size as measured."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.encoders import FORMATS, PROBE_SIDES, measure_encoders, opencv_encode, pillow_encode, probe_frame


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("channels", [3, 1])
def test_both_libraries_encode_the_same_picture(fmt, channels):
    frame = probe_frame(96)[..., :channels] if channels == 3 else probe_frame(96)[..., :1]
    mode = "L" if channels == 1 else "RGB"  # WebP has no grey mode: it decodes as RGB
    decoded = [np.asarray(Image.open(io.BytesIO(encode(frame, fmt))).convert(mode)) for encode in (pillow_encode, opencv_encode)]
    expected = frame[..., 0] if channels == 1 else frame
    for pixels in decoded:
        assert pixels.shape == expected.shape
        error = np.abs(pixels.astype(int) - expected.astype(int))
        assert error.max() == 0 if fmt == "png" else error.mean() < 6  # the probe's noise costs lossy formats ~4.5 levels
    if fmt == "jpeg":
        assert np.array_equal(decoded[0], decoded[1])  # one libjpeg-turbo, one quality: the same picture


def test_the_measured_table_keeps_the_faster_library_per_format_and_size():
    table = measure_encoders(2)
    assert set(table.choices) == {(fmt, size) for fmt in FORMATS for size in PROBE_SIDES}
    for (fmt, size), library in table.choices.items():
        rates = table.measured[f"{fmt}/{size}"]
        assert rates[library] == max(rates.values())
    large = probe_frame(200)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(table.encode(large, "png")))), large)
    assert all(table.measured[f"prepare/{size}"]["numpy"] > 0 for size in PROBE_SIDES)  # what precedes every encoding, in the estimate too
    assert table.seconds("npy", 1024 * 1024) > 0 and table.seconds("png", 1024 * 1024) > table.seconds("npy", 1024 * 1024)


def test_a_gpu_encoder_is_a_candidate_only_where_it_works_and_never_in_a_front():
    import torch

    from service.encoders import EncoderTable, available_libraries

    if not torch.cuda.is_available():  # on a CUDA host it joins only after its probe decodes (bench/gpu_session.sh)
        assert "nvjpeg" not in available_libraries()
    engine = EncoderTable({("jpeg", "large"): "nvjpeg", ("png", "large"): "opencv"},
                          {"jpeg/large": {"pillow": 90.0, "opencv": 400.0, "nvjpeg": 2000.0}, "png/large": {"pillow": 10.0, "opencv": 30.0}})
    front = engine.without_device_libraries()
    assert front.choices == {("jpeg", "large"): "opencv", ("png", "large"): "opencv"}  # the fastest host library measured beside it
    large = probe_frame(200)
    decoded = np.asarray(Image.open(io.BytesIO(front.encode(large, "jpeg"))))
    assert np.abs(decoded.astype(int) - large.astype(int)).mean() < 6


def png_row_filters(png: bytes) -> set[int]:
    """The filter type byte of every row of a PNG (0 none, 1 sub, 2 up, 3 average, 4 Paeth)."""
    import struct
    import zlib

    position, compressed, height = 8, b"", 0
    while position < len(png):
        length, kind = struct.unpack(">I4s", png[position:position + 8])
        if kind == b"IHDR":
            height = struct.unpack(">I", png[position + 12:position + 16])[0]
        if kind == b"IDAT":
            compressed += png[position + 8:position + 8 + length]
        position += 12 + length
    rows = zlib.decompress(compressed)
    stride = len(rows) // height
    return {rows[row * stride] for row in range(height)}


@pytest.mark.parametrize("channels", [3, 1])
def test_opencv_writes_png_with_the_fast_settings_and_loses_nothing(channels):
    """Level 1 alone let libpng try every filter on every row (1.6-3.4x slower from 64² to 1024²
    for files as large or larger, bench-encoding): each row is now filtered against the one above."""
    frame = probe_frame(200)[..., :channels]
    encoded = opencv_encode(frame, "png")
    assert png_row_filters(encoded) == {2}
    assert png_row_filters(pillow_encode(frame, "png")) != {2}  # the check can tell: Pillow's libpng still picks per row
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded))).reshape(frame.shape), frame)


def test_an_opencv_that_cannot_choose_the_filter_still_writes_png(monkeypatch):
    """A host's own OpenCV before 4.12 (the GPU machines' image brings its own, of a version not
    known here) has no filter option: asked for it, every PNG would fail, and the start-up
    measurement with it."""
    import cv2

    monkeypatch.delattr(cv2, "IMWRITE_PNG_FILTER")
    frame = probe_frame(64)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(opencv_encode(frame, "png")))), frame)
    assert measure_encoders(1).choices[("png", "small")] in ("opencv", "pillow")
