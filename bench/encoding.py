"""`ganserve bench-encoding`: how the encoding estimate admission uses (service/encoders.py
`EncoderTable.seconds`, from the rates measured at start-up on a 64² and a 384² probe frame)
compares with what encoding takes, at the sizes the server answers with.

The server measures its encoders at start-up; this does the same (`measure_encoders` with the
server's default thread count), then answers as `respond` does, on one thread: a photo
(scikit-image's astronaut, resized) as a generator's float output, 1 and 4 of them at each side,
converted to uint8, laid out as a grid and encoded (GIF: the 4 as an animation), and reports the
estimate over the measured time. Admission refuses what could not be encoded before its deadline, so the
estimate should not be under the time (a ratio at or above 1), and not so far over it that it
refuses what would have fitted.
"""
from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from bench.runner import machine, write_report
from service.encoders import measure_encoders
from service.imaging import encode_animation, to_uint8
from service.responses import encode_outputs


def photo(side: int) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC))


def run_encoding_bench(sides: list[int], repeats: int, out: Path | None, counts: tuple[int, ...] = (1, 4)) -> dict:
    threads = os.cpu_count() or 1
    table = measure_encoders(threads)
    rows = []
    for side in sides:
        floats = photo(side).transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1.0  # a generator's [1, C, H, W] in [-1, 1]
        for count in counts:
            batch = np.repeat(floats, count, axis=0)
            for fmt in ("png", "jpeg", "webp", "gif", "npy"):
                if fmt == "gif":
                    if count == 1:
                        continue

                    def answer():
                        return encode_animation(to_uint8(batch, (-1.0, 1.0)), "gif", 100)
                else:

                    def answer():
                        return encode_outputs(batch, (-1.0, 1.0), fmt, "grid", None, [], table)
                answer()
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    answer()
                    times.append(time.perf_counter() - started)
                measured = statistics.median(times)
                estimated = table.seconds(fmt, side * side, count)
                rows.append({"side": side, "format": fmt, "images": count, "measured_ms": measured * 1000, "estimated_ms": estimated * 1000,
                             "estimated_over_measured": estimated / measured})
    console = Console()
    view = Table(title=f"the encoding estimate against the encoding, {threads} encoder threads measured at start-up: {machine()}")
    for column in ("side", "format", "images", "measured ms", "estimated ms", "estimated ÷ measured"):
        view.add_column(column, justify="right")
    for row in rows:
        view.add_row(str(row["side"]), row["format"], str(row["images"]), f"{row['measured_ms']:.1f}", f"{row['estimated_ms']:.1f}",
                     f"{row['estimated_over_measured']:.2f}")
    console.print(view)
    png = png_settings_rows(sides, repeats)
    console.print(png_settings_view(png))
    report = {"machine": machine(), "encoder_threads": threads, "encoders": table.describe(), "rows": rows, "png_settings": png}
    write_report(report, out)
    return report


def png_settings_rows(sides: list[int], repeats: int) -> list[dict]:
    """The PNG encoder as served (`opencv_encode`) against OpenCV at zlib level 1 alone (the
    settings before) and Pillow at level 1 (the fallback without OpenCV), same pictures, same run:
    median ms and KiB each, every file decoded back to the same pixels."""
    import cv2
    from skimage import data

    from service.encoders import opencv_encode, pillow_encode
    from training.data.shapes import render_shape

    def before(image: np.ndarray, fmt: str) -> bytes:
        return cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()

    grey = np.asarray(Image.fromarray(data.camera()).resize((512, 512), Image.Resampling.BICUBIC))[..., None]
    shape = render_shape(512, shape=1, hue=0.6, size=0.5, x=0.45, y=0.55, rotation=0.3)  # what the shapes models learn to draw
    pictures = [*((f"photo {side}²", photo(side)) for side in sides), ("shapes 512²", shape), ("grey photo 512²", grey),
                ("noise 256²", np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))]
    rows = []
    for name, image in pictures:
        row: dict = {"picture": name}
        for label, encode in (("before", before), ("now", opencv_encode), ("pillow", pillow_encode)):
            encoded = encode(image, "png")
            decoded = np.asarray(Image.open(io.BytesIO(encoded)))
            assert np.array_equal(decoded.reshape(image.shape), image), f"{label} PNG of {name} is not lossless"
            times = []
            for _ in range(max(repeats, 3)):
                started = time.perf_counter()
                encode(image, "png")
                times.append(time.perf_counter() - started)
            row[f"{label}_ms"] = statistics.median(times) * 1000
            row[f"{label}_kib"] = len(encoded) / 1024
        row["speedup"] = row["before_ms"] / row["now_ms"]
        row["size_ratio"] = row["now_kib"] / row["before_kib"]
        rows.append(row)
    return rows


def png_settings_view(rows: list[dict]) -> Table:
    view = Table(title="PNG as served against OpenCV at level 1 alone (before) and Pillow at level 1, same run")
    for column in ("picture", "before ms", "now ms", "before ÷ now", "before KiB", "now KiB", "now ÷ before size", "Pillow ms", "Pillow KiB"):
        view.add_column(column, justify="right")
    for row in rows:
        view.add_row(row["picture"], f"{row['before_ms']:.2f}", f"{row['now_ms']:.2f}", f"{row['speedup']:.2f}x", f"{row['before_kib']:.1f}",
                     f"{row['now_kib']:.1f}", f"{row['size_ratio']:.3f}", f"{row['pillow_ms']:.2f}", f"{row['pillow_kib']:.1f}")
    return view
