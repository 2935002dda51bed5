"""Per-model serving configuration, like Triton's `config.pbtxt`: an entry's `spec.json` may carry
a `serving` section (written by the exporter) and a `serving.json` beside it (the operator's, over
it); what they leave out comes from the server's settings. `GET /v1/models/{name}` shows the
effective values."""
from __future__ import annotations

import json
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.graph_capture import capture_refusal
from service.repository import ModelEntry
from service.settings import Settings

log = logging.getLogger("ganserve.model_config")


class ReplicaAutoscaling(BaseModel):
    """Ray Serve's autoscaling bounds for one model (Ray's own names; `ganserve ray` only)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    target_ongoing_requests: float | None = Field(None, gt=0)  # None: max_batch_size (a replica with one batch in flight is busy)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def check_bounds(self) -> "ReplicaAutoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class ReplicaSettings(BaseModel):
    """How `ganserve ray` places one model on a Ray cluster: a fixed `num_replicas` or
    `autoscaling` bounds, the logical CPUs/GPUs each replica reserves (fractional GPUs share one
    device between small models), and Ray's two queues. The single-process server ignores it.

    `max_ongoing_requests` (requests Ray hands one replica at once) is derived from the batcher
    when left out: a replica must hold a running batch and a full one forming behind it, or Ray's
    cap, not the batcher, decides the batch size (Ray's default, 5, batches nothing worth having);
    it never exceeds `max_queue_size`, so the replica's own queue stays the one that answers 429.
    `max_queued_requests` (waiting at each caller for a free replica; past it 429) defaults to
    `max_queue_size`, the bound the single-process server has."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(None, ge=1, le=1000)  # None and no autoscaling: 1
    autoscaling: ReplicaAutoscaling | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def check_replicas(self) -> "ReplicaSettings":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give num_replicas or autoscaling, not both")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"num_gpus {self.num_gpus}: a fraction of one GPU, or whole GPUs")
        return self


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runtime: Literal["onnx", "torchscript", "eager"]
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16/fp16: torchscript and eager runtimes only, served where the parity with fp32 holds, else the model fails; "
                            "auto: bf16, else fp16, where that parity holds on a CUDA device with a torch runtime, else fp32 (service/precision.py)")
    graph_capture: Literal["none", "cuda_graphs", "compile"] = Field(
        "none", description="capture the graph per warmed input shape (service/graph_capture.py): cuda_graphs (torchscript or eager, CUDA only) "
                            "or compile (torch.compile; eager runtime only); other shapes run uncaptured")
    warmup_repeats: int = Field(3, ge=1, le=100)  # timed runs per warm-up shape (the median is kept); on CUDA torch runtimes, runs of every warmed shape
    # pad a batch with copies of its last item up to the nearest warmed batch size, so that only
    # warmed shapes reach the runtime (TorchScript and captured graphs specialise on shapes); None:
    # on for the torchscript and eager runtimes on CUDA and wherever graphs are captured, off
    # elsewhere (on a CPU padding is only cost)
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
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)  # Ray Serve placement (`ganserve ray`); ignored by `ganserve serve`

    @model_validator(mode="after")
    def check_consistency(self) -> "ServingConfig":
        if self.precision in ("bf16", "fp16") and self.runtime == "onnx":
            raise ValueError(f"precision {self.precision} needs the torchscript or eager runtime (the ONNX export is fp32)")
        if refusal := capture_refusal(self.graph_capture, self.runtime):
            raise ValueError(refusal)
        if 2 * self.upscale_overlap >= self.upscale_tile:
            raise ValueError(f"upscale_overlap ({self.upscale_overlap}) must be below half of upscale_tile ({self.upscale_tile})")
        if self.warmup_batch_sizes and not all(1 <= b <= self.max_batch_size for b in self.warmup_batch_sizes):
            raise ValueError(f"warmup_batch_sizes must lie in 1..max_batch_size ({self.max_batch_size})")
        return self

    @property
    def max_ongoing_requests(self) -> int:
        """Requests Ray may hand one replica at once (see ReplicaSettings)."""
        if self.replicas.max_ongoing_requests is not None:
            return self.replicas.max_ongoing_requests
        return min(self.max_queue_size, (self.lane_threads + 1) * self.max_batch_size)

    @property
    def max_queued_requests(self) -> int:
        return self.replicas.max_queued_requests or self.max_queue_size


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


RUNTIME_PREFERENCE = ("onnx", "torchscript", "eager")


def has_runtime(entry: ModelEntry, runtime: str) -> bool:
    """Whether every graph of the entry has an export this runtime loads."""
    formats = [entry.spec.get("formats", {}) if runtime == "eager" else entry.graph_spec(graph).get("formats", {}) for graph in entry.graphs]
    return all(isinstance(found, dict) and runtime in found for found in formats)


def runtime_it_has(entry: ModelEntry, default: str) -> str:
    """The server's default runtime, or, for an entry written without an export for it, the first
    of RUNTIME_PREFERENCE it has. An imported StyleGAN is written with TorchScript alone (its
    graphs are traced, not exported to ONNX) and failed under the default `onnx` with "has no
    onnx export", where it could be served as it came (a probe). A model's own `runtime` (its
    serving section, serving.json, GANSERVE_RUNTIME_OVERRIDES) is never replaced."""
    if has_runtime(entry, default):
        return default
    chosen = next((runtime for runtime in RUNTIME_PREFERENCE if has_runtime(entry, runtime)), default)
    if chosen != default:
        log.warning("%s has no %s export: served with %s", entry.label, default, chosen)
    return chosen


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
    values = defaults | own
    if "runtime" not in own and entry.name not in settings.runtime_overrides:
        values["runtime"] = runtime_it_has(entry, values["runtime"])
    if "precision" not in own:  # the server's default; a half one only where this model's runtime has one
        values["precision"] = "fp32" if values["runtime"] == "onnx" and settings.precision != "auto" else settings.precision
    if "graph_capture" not in own:  # the server's default, where this model's runtime can capture
        values["graph_capture"] = "none" if capture_refusal(settings.graph_capture, values["runtime"]) else settings.graph_capture
    try:
        config = ServingConfig.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"{entry.label}/spec.json: invalid `serving` section: {problems}") from None
    multiple = entry.spec.get("size_multiple") or 1
    if entry.kind == "super_resolution" and config.upscale_tile % multiple:
        raise ValueError(f"{entry.label}/spec.json: upscale_tile {config.upscale_tile} is not a multiple of the model's size_multiple {multiple}")
    return config
