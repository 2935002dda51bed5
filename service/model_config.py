"""Per-model serving configuration, like Triton's `config.pbtxt`: an entry's `spec.json` may carry
a `serving` section (written by the exporter) and a `serving.json` beside it (the operator's, over
it); what they leave out comes from the server's settings. `GET /v1/models/{name}` shows the
effective values."""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.repository import ModelEntry
from service.settings import Settings


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runtime: Literal["onnx", "torchscript", "eager"]
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="bf16/fp16: torchscript and eager runtimes only, served where the parity with fp32 holds (service/precision.py)")
    warmup_repeats: int = Field(3, ge=1, le=100)  # timed runs per warm-up shape (the median is kept); on CUDA torch runtimes, runs of every warmed shape
    # pad a batch with copies of its last item up to the nearest warmed batch size, so that only
    # warmed shapes reach the runtime (TorchScript and CUDA graphs specialise on shapes); None: on
    # for the torchscript and eager runtimes on CUDA, off elsewhere (on a CPU padding is only cost)
    pad_batches: bool | None = None
    warmup_batch_sizes: list[int] | None = Field(None, min_length=1, max_length=32)  # fixed-size graphs: default 1, 2, 4, … max_batch_size
    lane_threads: int = Field(ge=1, le=64)
    max_batch_size: int = Field(ge=1, le=4096)
    max_batch_seconds: float = Field(gt=0)
    max_queue_delay_ms: float = Field(ge=0)
    max_queue_size: int = Field(ge=1)
    max_input_pixels: int = Field(ge=64)  # image-to-image inputs; lowered further by the measured cost
    upscale_tile: int = Field(ge=8, le=2048)  # super-resolution: input px per tile side (every tile is one batcher item)
    upscale_overlap: int = Field(ge=0, le=1023)  # input px shared by neighbouring tiles, blended across

    @model_validator(mode="after")
    def check_consistency(self) -> "ServingConfig":
        if self.precision != "fp32" and self.runtime == "onnx":
            raise ValueError(f"precision {self.precision} needs the torchscript or eager runtime (the ONNX export is fp32)")
        if 2 * self.upscale_overlap >= self.upscale_tile:
            raise ValueError(f"upscale_overlap ({self.upscale_overlap}) must be below half of upscale_tile ({self.upscale_tile})")
        if self.warmup_batch_sizes and not all(1 <= b <= self.max_batch_size for b in self.warmup_batch_sizes):
            raise ValueError(f"warmup_batch_sizes must lie in 1..max_batch_size ({self.max_batch_size})")
        return self


def operator_overrides(entry: ModelEntry) -> dict:
    """`serving.json` beside an entry's spec.json: the operator's settings for this model version,
    over the `serving` section the exporter wrote (Triton's config.pbtxt, in JSON)."""
    path = entry.path / "serving.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{entry.label}/serving.json is not JSON ({type(error).__name__})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{entry.label}/serving.json must be an object")
    return values


def serving_config(entry: ModelEntry, settings: Settings) -> ServingConfig:
    """The entry's own values over the settings' defaults; an invalid section fails the entry."""
    input_pixels = settings.max_upscale_input_pixels if entry.kind == "super_resolution" else settings.max_translate_pixels
    tiling = entry.spec.get("tiling") if isinstance(entry.spec.get("tiling"), dict) else {}
    defaults = {"runtime": settings.runtime_overrides.get(entry.name, settings.runtime), "lane_threads": settings.lane_threads, "max_batch_size": settings.max_batch_size,
                "max_batch_seconds": settings.max_batch_seconds, "max_queue_delay_ms": settings.max_queue_delay_ms,
                "max_queue_size": settings.max_queue_size, "max_input_pixels": input_pixels,
                # an imported SR entry carries the tile its size rules allow; our own use the server's setting
                "upscale_tile": tiling.get("tile", settings.upscale_tile), "upscale_overlap": tiling.get("overlap", settings.upscale_overlap)}
    own = entry.spec.get("serving") or {}
    if not isinstance(own, dict):
        raise ValueError(f"{entry.label}/spec.json: `serving` must be an object")
    own = own | operator_overrides(entry)
    try:
        config = ServingConfig.model_validate(defaults | own)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"{entry.label}/spec.json: invalid `serving` section: {problems}") from None
    multiple = entry.spec.get("size_multiple") or 1
    if entry.kind == "super_resolution" and config.upscale_tile % multiple:
        raise ValueError(f"{entry.label}/spec.json: upscale_tile {config.upscale_tile} is not a multiple of the model's size_multiple {multiple}")
    return config
