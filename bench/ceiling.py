"""The ceiling: the same runtime's bare forward pass (and forward + PNG encode) at the batch
sizes the service uses, with no HTTP, queue or event loop in the way; and what a many-image
request adds on the host after it (laying its uint8 images out as one grid, then JPEG), the
figures that decide whether the grid is worth moving onto the device."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from service.imaging import encode, grid, to_uint8
from service.precision import parity_inputs
from service.registry import dummy_inputs
from service.repository import ModelEntry
from service.runtimes import load_runtime


@dataclass
class CeilingResult:
    runtime: str
    device: str
    batch_size: int
    forward_images_per_s: float
    forward_encode_images_per_s: float  # forward then PNG-encode every image, one thread
    grid_ms: float | None = None  # host ms to lay the batch's uint8 images out as one grid (None at batch 1)
    grid_jpeg_ms: float | None = None  # host ms to JPEG-encode that grid (Pillow, one thread)

    def to_dict(self) -> dict:
        return asdict(self)


def timed(repeat_until_s: float, work) -> float:
    """Seconds per call, repeating `work` for at least `repeat_until_s` after three warm-up calls
    (TorchScript's profiling executor re-optimises a graph over its first calls at each new input
    shape: one warm-up measured those recompilations on the GPU)."""
    for _ in range(3):
        work()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < repeat_until_s or calls < 3:
        work()
        calls += 1
    return (time.perf_counter() - started) / calls


def measure_ceiling(entry: ModelEntry, runtime_kind: str, device: str, threads: int, batch_sizes: list[int], seconds: float = 2.0,
                    precision: str = "fp32") -> list[CeilingResult]:
    """The bare forward pass (and forward + PNG) at each batch size, in the precision the server
    serves the model in (`precision: auto` on a GPU may serve bf16: the ceiling must be the same graph)."""
    runtime = load_runtime(entry, runtime_kind, device, threads, precision=precision)
    value_range = tuple(entry.spec["value_range"])
    results = []
    for batch in batch_sizes:
        inputs = parity_inputs(entry, dummy_inputs(entry, batch))  # normal latents (z, or a style model's ws), seeded
        forward = timed(seconds, lambda: runtime.run(inputs))

        def forward_and_encode() -> None:
            for image in to_uint8(runtime.run(inputs), value_range):
                encode(image, "png")

        both = timed(seconds, forward_and_encode)
        result = CeilingResult(runtime.name, runtime.device, batch, batch / forward, batch / both)
        if batch > 1:
            pixels = to_uint8(runtime.run(inputs), value_range)
            laid_out = grid(pixels)
            result.grid_ms = 1000 * timed(seconds / 4, lambda: grid(pixels))
            result.grid_jpeg_ms = 1000 * timed(seconds / 4, lambda: encode(laid_out, "jpeg"))
        results.append(result)
    return results
