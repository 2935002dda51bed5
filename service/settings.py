"""Every knob of the service, from the command line or `GANSERVE_*` environment variables."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GANSERVE_", extra="ignore")

    repository: Path = Path("model_repository")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    runtime: Literal["onnx", "torchscript", "eager"] = "onnx"
    runtime_overrides: dict[str, Literal["onnx", "torchscript", "eager"]] = {}  # per model name
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the batcher (Triton's names)
    max_batch_size: int = Field(64, ge=1, le=4096)  # items (images), not requests
    max_queue_delay_ms: float = Field(0.0, ge=0)  # 0: natural batching, see DynamicBatcher.wait_for_batch
    max_queue_size: int = Field(4096, ge=1)  # items waiting per (model, version, operation)
    request_timeout_s: float = Field(30.0, gt=0)  # the deadline of a request, 504 past it
    # request limits
    max_images_per_request: int = Field(256, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_upload_pixels: int = Field(4096 * 4096, ge=1)  # decoded image size limit (413 past it)
    max_upscale_input_pixels: int = Field(1024 * 1024, ge=1)  # upscale input limit (the output is scale² larger)
    # image-to-image
    upscale_tile: int = Field(96, ge=8)  # input px per tile side: every tile is one batcher item
    upscale_overlap: int = Field(16, ge=0)  # input px shared by neighbouring tiles, blended across
    # long jobs (projection)
    max_jobs: int = Field(4, ge=1)  # queued + running; 429 past it
    max_job_seconds: float = Field(120.0, gt=0)
    max_projection_steps: int = Field(1000, ge=1)
    # threads
    encoder_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    intra_op_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    warmup: bool = True
    log_level: str = "info"

    @model_validator(mode="after")
    def check_tiles(self) -> "Settings":
        if 2 * self.upscale_overlap >= self.upscale_tile:
            raise ValueError(f"upscale_overlap ({self.upscale_overlap}) must be below half of upscale_tile ({self.upscale_tile})")
        return self
