"""Image encoders for the encoder pool, and the choice between them.

Two libraries encode PNG, JPEG and WebP: Pillow and OpenCV. Which one is faster depends on the
format, the size and how many encoder threads run at once — measured on the 2-core machine
(docs/benchmarks.md): OpenCV's JPEG and PNG release the GIL and scale across threads while
Pillow's in-memory saves do not; Pillow's WebP (method 0) is ~3x faster than OpenCV's. So the
server measures both at start-up, on a small and a large frame with its own encoder-thread count,
and keeps the faster per (format, size class). Both write the same settings (PNG compression 1,
JPEG and WebP quality 90); PNG is lossless either way and JPEG comes out of the same libjpeg-turbo.
"""
from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

FORMATS = ("png", "jpeg", "webp")
LARGE_PIXELS = 160 * 160  # frames at least this big are "large"
PROBE_SIDES = {"small": 64, "large": 384}


def pillow_encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if fmt == "png":
        picture.save(buffer, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        picture.save(buffer, format="JPEG", quality=90)
    elif fmt == "webp":
        picture.save(buffer, format="WEBP", quality=90, method=0)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buffer.getvalue()


def opencv_encode(image: np.ndarray, fmt: str) -> bytes:
    import cv2

    pixels = image[..., 0] if image.shape[-1] == 1 else np.ascontiguousarray(image[..., ::-1])  # OpenCV takes BGR
    params = {"png": [cv2.IMWRITE_PNG_COMPRESSION, 1], "jpeg": [cv2.IMWRITE_JPEG_QUALITY, 90], "webp": [cv2.IMWRITE_WEBP_QUALITY, 90]}[fmt]
    ok, encoded = cv2.imencode(".jpg" if fmt == "jpeg" else f".{fmt}", pixels, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode {fmt}")
    return encoded.tobytes()


def available_libraries() -> dict:
    libraries = {"pillow": pillow_encode}
    try:
        import cv2

        cv2.setNumThreads(1)  # the encoder pool is the parallelism; OpenCV's own pool would fight it
        libraries["opencv"] = opencv_encode
    except ImportError:
        pass
    return libraries


def size_class(image: np.ndarray) -> str:
    return "large" if image.shape[0] * image.shape[1] >= LARGE_PIXELS else "small"


@dataclass(frozen=True)
class EncoderTable:
    """The library that encodes each (format, size class), and the measured encodes/s behind it."""

    choices: dict[tuple[str, str], str] = field(default_factory=dict)
    measured: dict[str, dict[str, float]] = field(default_factory=dict)

    def encode(self, image: np.ndarray, fmt: str) -> bytes:
        library = self.choices.get((fmt, size_class(image)), "pillow")
        return (opencv_encode if library == "opencv" else pillow_encode)(image, fmt)

    def describe(self) -> dict:
        return {f"{fmt}/{size}": library for (fmt, size), library in sorted(self.choices.items())} | {"measured_per_s": self.measured}


PILLOW_ONLY = EncoderTable()


def probe_frame(side: int) -> np.ndarray:
    """A smooth colour frame (gradients plus a little noise): compresses like a real picture."""
    y, x = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(0)
    image = np.stack([x, y, (x + y) / 2], axis=-1) * 220 + rng.normal(0, 6, (side, side, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def measure_encoders(threads: int, seconds_per_probe: float = 0.015) -> EncoderTable:
    """Encodes/s of each library per (format, size class) with `threads` encoding at once; the
    faster wins. Takes ~0.25 s at start-up."""
    libraries = available_libraries()
    if len(libraries) == 1:
        return PILLOW_ONLY
    choices, measured = {}, {}
    with ThreadPoolExecutor(threads) as pool:
        for size, side in PROBE_SIDES.items():
            frame = probe_frame(side)
            for fmt in FORMATS:
                rates = {}
                for name, encode in libraries.items():
                    encode(frame, fmt)  # first call: library set-up
                    count, started = 0, time.perf_counter()
                    while True:
                        list(pool.map(lambda _: encode(frame, fmt), range(threads)))
                        count += threads
                        elapsed = time.perf_counter() - started
                        if elapsed >= seconds_per_probe:
                            break
                    rates[name] = count / elapsed
                choices[(fmt, size)] = max(rates, key=rates.get)
                measured[f"{fmt}/{size}"] = {name: round(rate, 1) for name, rate in rates.items()}
    return EncoderTable(choices, measured)
