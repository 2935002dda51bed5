"""`ganserve bench-encoding`: how the encoding estimate admission uses (service/encoders.py
`EncoderTable.seconds`, from the rates measured at start-up on a 64² and a 384² probe frame)
compares with what encoding takes, at the sizes the server answers with.

The server measures its encoders at start-up; this does the same (`measure_encoders` with the
server's default thread count), then encodes a photo (scikit-image's astronaut, resized) at each
side, one image at a time on one thread, as a response is encoded, and reports the estimate over
the measured time. Admission refuses what could not be encoded before its deadline, so the
estimate should not be under the time (a ratio at or above 1), and not so far over it that it
refuses what would have fitted.
"""
from __future__ import annotations

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
from service.imaging import encode_animation


def photo(side: int) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC))


def run_encoding_bench(sides: list[int], repeats: int, out: Path | None) -> dict:
    threads = os.cpu_count() or 1
    table = measure_encoders(threads)
    rows = []
    for side in sides:
        image = photo(side)
        for fmt in ("png", "jpeg", "webp", "gif"):
            if fmt == "gif":
                frames = np.stack([image, np.roll(image, 4, axis=1)])

                def encode():
                    return encode_animation(frames, "gif", 100)
                images = 2
            else:

                def encode():
                    return table.encode(image, fmt)
                images = 1
            encode()
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                encode()
                times.append(time.perf_counter() - started)
            measured = statistics.median(times)
            estimated = table.seconds(fmt, side * side, images)
            rows.append({"side": side, "format": fmt, "images": images, "measured_ms": measured * 1000, "estimated_ms": estimated * 1000,
                         "estimated_over_measured": estimated / measured})
    console = Console()
    view = Table(title=f"the encoding estimate against the encoding, {threads} encoder threads measured at start-up: {machine()}")
    for column in ("side", "format", "measured ms", "estimated ms", "estimated ÷ measured"):
        view.add_column(column, justify="right")
    for row in rows:
        view.add_row(str(row["side"]), row["format"] + (f" ({row['images']} frames)" if row["images"] > 1 else ""), f"{row['measured_ms']:.1f}",
                     f"{row['estimated_ms']:.1f}", f"{row['estimated_over_measured']:.2f}")
    console.print(view)
    report = {"machine": machine(), "encoder_threads": threads, "encoders": table.describe(), "rows": rows}
    write_report(report, out)
    return report
