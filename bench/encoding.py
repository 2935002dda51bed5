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
    report = {"machine": machine(), "encoder_threads": threads, "encoders": table.describe(), "rows": rows}
    write_report(report, out)
    return report
