"""Image encoders for the encoder pool, and the choice between them.

Two libraries encode PNG, JPEG and WebP: Pillow and OpenCV. Which one is faster depends on the
format, the size and how many encoder threads run at once — measured on the 2-core machine
(docs/benchmarks.md): OpenCV's JPEG and PNG release the GIL and scale across threads while
Pillow's in-memory saves do not; Pillow's WebP (method 0) is ~3x faster than OpenCV's. So the
server measures both at start-up, on a small and a large frame with its own encoder-thread count,
and keeps the faster per (format, size class). Both write the same settings (PNG compression 1,
JPEG and WebP quality 90); PNG is lossless either way and JPEG comes out of the same libjpeg-turbo.

On a machine with CUDA a third candidate joins for JPEG: nvJPEG through torchvision's
`encode_jpeg` on a CUDA tensor (one upload, the encode on the GPU, the bytes back). Its calls are
serialised (torchvision's CUDA encoder has corrupted output under concurrent callers,
pytorch/vision#9060), and it is admitted only after its probe decodes to the probe frame, so a
broken build is never chosen. Front processes (`--workers`) never use it: each would hold a CUDA
context of its own.
"""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

FORMATS = ("png", "jpeg", "webp")
LARGE_PIXELS = 160 * 160  # frames at least this big are "large"
PROBE_SIDES = {"small": 64, "large": 384}
ANIMATION_RATE_OF = {"gif": "webp"}  # what an animation format's frames are estimated at (`EncoderTable.seconds`)
PREPARE, PREPARE_LIBRARY = "prepare", "numpy"  # floats to uint8 and into a grid, before any encoding: measured beside the encoders


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


def opencv_png_params() -> list[int]:
    """zlib level 1 with run-length matching and every row filtered against the row above: a
    1024² photo in 36-39 ms instead of 60-66 (level 1 alone: zlib's default matching, and libpng
    trying every filter on every row), 1.6-3.4x faster from 64² to 1024², files -23 % to +4 %
    (`ganserve bench-encoding`, docs/benchmarks.md "PNG settings"). Lossless either way. An
    OpenCV before 4.12 (a host's own, beside the project's pin) cannot choose the filter: it
    keeps level 1 alone rather than fail every PNG."""
    import cv2

    if not hasattr(cv2, "IMWRITE_PNG_FILTER"):
        return [cv2.IMWRITE_PNG_COMPRESSION, 1]
    return [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


def opencv_encode(image: np.ndarray, fmt: str) -> bytes:
    import cv2

    pixels = image[..., 0] if image.shape[-1] == 1 else np.ascontiguousarray(image[..., ::-1])  # OpenCV takes BGR
    params = {"png": opencv_png_params(), "jpeg": [cv2.IMWRITE_JPEG_QUALITY, 90], "webp": [cv2.IMWRITE_WEBP_QUALITY, 90]}[fmt]
    ok, encoded = cv2.imencode(".jpg" if fmt == "jpeg" else f".{fmt}", pixels, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode {fmt}")
    return encoded.tobytes()


NVJPEG_LOCK = threading.Lock()
LIBRARY_FORMATS = {"nvjpeg": ("jpeg",)}  # what a library encodes, where it is not every format
DEVICE_LIBRARIES = ("nvjpeg",)  # libraries that need the GPU in the process that encodes


def nvjpeg_encode(image: np.ndarray, fmt: str) -> bytes:
    """JPEG on the GPU (quality 90, as the others); grey images go to Pillow (the CUDA encoder
    takes three channels)."""
    if fmt != "jpeg" or image.shape[-1] != 3:
        return pillow_encode(image, fmt)
    import torch
    from torchvision.io import encode_jpeg

    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    with NVJPEG_LOCK:
        encoded = encode_jpeg(pixels.to("cuda"), quality=90)
        torch.cuda.current_stream().synchronize()
        return encoded.cpu().numpy().tobytes()


def nvjpeg_works() -> bool:
    """CUDA is there, torchvision loads, and its encoder's probe decodes to the probe frame."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        frame = probe_frame(PROBE_SIDES["small"])
        decoded = np.asarray(Image.open(io.BytesIO(nvjpeg_encode(frame, "jpeg"))).convert("RGB"))
    except Exception:  # no torchvision, no nvJPEG in this build, a driver problem: not a candidate
        return False
    return decoded.shape == frame.shape and float(np.abs(decoded.astype(int) - frame.astype(int)).mean()) < 6


ENCODERS = {"pillow": pillow_encode, "opencv": opencv_encode, "nvjpeg": nvjpeg_encode}


def available_libraries() -> dict:
    libraries = {"pillow": pillow_encode}
    try:
        import cv2

        cv2.setNumThreads(1)  # the encoder pool is the parallelism; OpenCV's own pool would fight it
        libraries["opencv"] = opencv_encode
    except ImportError:
        pass
    if nvjpeg_works():
        libraries["nvjpeg"] = nvjpeg_encode
    return libraries


def size_class(image: np.ndarray) -> str:
    return "large" if image.shape[0] * image.shape[1] >= LARGE_PIXELS else "small"


@dataclass(frozen=True)
class EncoderTable:
    """The library that encodes each (format, size class), and the measured encodes/s behind it."""

    choices: dict[tuple[str, str], str] = field(default_factory=dict)
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    threads: int = 1  # encoder threads encoding at once when the rates were measured

    def encode(self, image: np.ndarray, fmt: str) -> bytes:
        return ENCODERS[self.choices.get((fmt, size_class(image)), "pillow")](image, fmt)

    def seconds(self, fmt: str, pixels: int, images: int = 1) -> float:
        """What answering with `images` images of `pixels` pixels each in `fmt` takes one encoder
        thread: their conversion from floats to uint8 and into a grid (`PREPARE`), then their
        encoding, each from its rate at the size class's probe, per pixel (never less than a
        probe's worth a small image: a call's fixed cost). The rates were measured with every
        thread working at once, so this is what one image costs when the pool is busy, which is
        when it matters, and over what it costs one thread alone where a library does not scale
        across threads (Pillow's). A GIF frame (quantised, then compressed) is counted at WebP's
        rate, over what it takes at every size measured (bench-encoding, docs/benchmarks.md). npy
        is a copy: its conversion only. 0 where nothing was measured."""
        size = "large" if pixels >= LARGE_PIXELS else "small"
        probe_pixels = PROBE_SIDES[size] ** 2
        counted = images * self.threads * max(pixels, probe_pixels if size == "small" else 0) / probe_pixels
        total = 0.0
        for step in (PREPARE, ANIMATION_RATE_OF.get(fmt, fmt)):
            library = PREPARE_LIBRARY if step == PREPARE else self.choices.get((step, size), "")
            rate = self.measured.get(f"{step}/{size}", {}).get(library, 0.0)
            total += counted / rate if rate > 0 else 0.0
        return total

    def without_device_libraries(self) -> "EncoderTable":
        """The table for a process without the GPU (a `--workers` front): each choice of a device
        library replaced by the fastest host library measured beside it."""
        choices = {}
        for (fmt, size), library in self.choices.items():
            if library in DEVICE_LIBRARIES:
                rates = {name: rate for name, rate in self.measured.get(f"{fmt}/{size}", {}).items() if name not in DEVICE_LIBRARIES}
                library = max(rates, key=rates.get) if rates else "pillow"
            choices[(fmt, size)] = library
        return EncoderTable(choices, self.measured, self.threads)

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
                    if fmt not in LIBRARY_FORMATS.get(name, FORMATS):
                        continue
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
        prepare_rates(pool, threads, seconds_per_probe, measured)
    return EncoderTable(choices, measured, threads)


def prepare_rates(pool: ThreadPoolExecutor, threads: int, seconds_per_probe: float, measured: dict) -> None:
    """Probe frames/s of what precedes every encoding: a float batch of four probes converted to
    uint8 and laid out as one grid (at 1024² this took more than a JPEG encode; four at once, as
    a many-image answer does, since its temporaries are then fresh memory each time)."""
    from service.imaging import grid, to_uint8

    for size, side in PROBE_SIDES.items():
        floats = np.random.default_rng(0).uniform(-1, 1, (4, 3, side, side)).astype(np.float32)
        count, started = 0, time.perf_counter()
        while True:
            list(pool.map(lambda _: grid(to_uint8(floats, (-1.0, 1.0)), 2), range(threads)))
            count += 4 * threads
            elapsed = time.perf_counter() - started
            if elapsed >= seconds_per_probe:
                break
        measured[f"{PREPARE}/{size}"] = {PREPARE_LIBRARY: round(count / elapsed, 1)}
