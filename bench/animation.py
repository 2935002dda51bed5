"""`ganserve bench-animation`: what an `/interpolate` animation costs the encoder pool, with the
encoder settings the server uses (service/imaging.py `encode_animation`) against the ones it
used before (Pillow's defaults for GIF: median-cut quantisation of each RGB frame; lossless WebP
at Pillow's default method, 0), on the same frames in the same run.

Frames: a photo (scikit-image's astronaut, resized) panned a few pixels a frame, as an
interpolation moves, at each side; and frames of uniform noise at one side, the worst case for a
quantiser. Per case: milliseconds a frame and nanoseconds a pixel for each, the ratio, the file
sizes, and the PSNR against the frames (quality must not be what pays for the speed).
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from bench.runner import machine, write_report
from service.imaging import encode_animation


def previous_encode(frames: np.ndarray, fmt: str, frame_ms: int) -> bytes:
    """The encoding before: Pillow's defaults for an animated GIF, lossless WebP."""
    pictures = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    options = {"lossless": True} if fmt == "webp" else {}
    pictures[0].save(buffer, format=fmt.upper(), save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0, **options)
    return buffer.getvalue()


def photo_frames(side: int, count: int) -> np.ndarray:
    from skimage import data

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC))
    step = max(1, side // 64)
    return np.stack([np.roll(photo, index * step, axis=1) for index in range(count)])


def noise_frames(side: int, count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def decoded(content: bytes) -> np.ndarray:
    """An animated GIF or WebP's frames as RGB uint8 [T, H, W, 3]."""
    animation = Image.open(io.BytesIO(content))
    frames = []
    for index in range(animation.n_frames):
        animation.seek(index)
        frames.append(np.asarray(animation.convert("RGB")))
    return np.stack(frames)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / max(float(np.mean((a.astype(np.float64) - b) ** 2)), 1e-12)))


def timed(encoder, frames: np.ndarray, fmt: str, repeats: int) -> tuple[float, bytes]:
    """The best of `repeats` runs (the least disturbed by other work), and the bytes."""
    best, content = float("inf"), b""
    for _ in range(repeats):
        started = time.perf_counter()
        content = encoder(frames, fmt, 80)
        best = min(best, time.perf_counter() - started)
    return best, content


def run_animation_bench(sides: list[int], frame_count: int, noise_side: int, repeats: int, out: Path | None) -> dict:
    console = Console()
    cases = [("photo", side, photo_frames(side, frame_count)) for side in sides] + [("noise", noise_side, noise_frames(noise_side, frame_count))]
    rows = []
    for source, side, frames in cases:
        for fmt in ("gif", "webp"):
            before_s, before = timed(previous_encode, frames, fmt, repeats)
            now_s, now = timed(encode_animation, frames, fmt, repeats)
            pixels = frames[..., 0].size
            rows.append({"frames": source, "side": side, "count": len(frames), "format": fmt,
                         "before_ms_per_frame": 1000 * before_s / len(frames), "now_ms_per_frame": 1000 * now_s / len(frames),
                         "before_ns_per_pixel": 1e9 * before_s / pixels, "now_ns_per_pixel": 1e9 * now_s / pixels,
                         "speedup": before_s / now_s, "before_bytes": len(before), "now_bytes": len(now),
                         "before_psnr_db": psnr(decoded(before), frames), "now_psnr_db": psnr(decoded(now), frames)})
    table = Table(title=f"animation encoding ({frame_count} frames; best of {repeats}) — {machine()}")
    for column in ("frames", "format", "before ms/frame", "now ms/frame", "now ns/px", "speed-up", "bytes before → now", "PSNR before → now"):
        table.add_column(column)
    for row in rows:
        table.add_row(f"{row['frames']} {row['side']}²", row["format"], f"{row['before_ms_per_frame']:.1f}", f"{row['now_ms_per_frame']:.1f}",
                      f"{row['now_ns_per_pixel']:.0f}", f"{row['speedup']:.1f}x", f"{row['before_bytes']:,} → {row['now_bytes']:,}",
                      f"{row['before_psnr_db']:.1f} → {row['now_psnr_db']:.1f} dB")
    console.print(table)
    report = {"machine": machine(), "frames": frame_count, "repeats": repeats, "rows": rows}
    write_report(report, out)
    return report
