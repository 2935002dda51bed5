"""The typed schema of a model-repository entry's `spec.json`: one definition that the writers
(`ganserve export`, `ganserve import`: repository/entries.py validates before an entry appears) and
the service (service/repository.py validates at load; a bad entry is `failed` with the message)
both use. It lives in `models/` because both sides already depend on it and it imports neither.

Versioned: an entry records `schema_version`; one written by a newer ganserve than this one is
refused with that reason rather than half-read. Entries written before the field existed are
version 1, which is what this schema describes.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
# The stated bound for serving a model in half precision (bf16/fp16), the same for every kind, in
# fractions of the output's value range (1/255 is one 8-bit level of the served image): mean
# ≤ 1/255 and max ≤ 8/255. Export records each graph's figures against it (`half_precision` in
# spec.json); the server checks it again on its own device before serving half precision.
HALF_PRECISION_MEAN_BOUND = 1 / 255
HALF_PRECISION_MAX_BOUND = 8 / 255
MAX_SCALE = 16  # the largest super-resolution scale an entry may hold


class TensorSpec(BaseModel):
    name: str = Field(min_length=1)
    datatype: Literal["float32", "int64"]
    shape: list[int] = Field(min_length=1)


class FormatSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    file: str = Field(min_length=1)


class GraphSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    formats: dict[str, FormatSpec] = Field(min_length=1)
    half_precision: dict | None = None  # bf16/fp16 against fp32 as export measured it (repository/graphs.py); absent in older entries


class TruncationSpec(BaseModel):
    """BigGAN's truncation: z from a normal truncated to ±z_bound, scaled by t; batch-norm
    statistics for t enter the graph as `truncation_stats` [B, n_stats] (models/biggan.py)."""

    method: Literal["biggan"]
    z_bound: float = Field(gt=0, le=10)
    n_stats: int = Field(ge=2, le=1024)
    default: float = Field(gt=0, le=1)


class EntrySpec(GraphSpec):
    """The fields of `spec.json` a runtime and a client rely on, checked when an entry is written
    and again when the repository is scanned, so a bad entry fails alone with a clear reason
    instead of answering 500 later."""

    schema_version: int = Field(1, ge=1)
    name: str | None = Field(None, min_length=1, max_length=256)
    version: int | None = Field(None, ge=1, lt=2**31)
    kind: Literal["unconditional", "conditional", "style", "translation", "super_resolution"]
    value_range: tuple[float, float]
    channels: int = Field(ge=1, le=4)
    resolution: int | None = Field(None, ge=1, le=8192)
    z_dim: int | None = Field(None, ge=1, le=65536)
    w_dim: int | None = Field(None, ge=1, le=65536)
    num_ws: int | None = Field(None, ge=1, le=64)
    class_names: list[str] | None = None
    in_channels: int | None = Field(None, ge=1, le=4)
    size_multiple: int | None = Field(None, ge=1, le=1024)
    scale: int | None = Field(None, ge=1, le=MAX_SCALE)
    train_resolution: int | None = Field(None, ge=1, le=8192)
    mapping: GraphSpec | None = None
    model: dict | None = None
    truncation: TruncationSpec | None = None

    @model_validator(mode="after")
    def check_kind(self) -> "EntrySpec":
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(f"written by a newer ganserve (entry schema {self.schema_version}; this one reads up to {SCHEMA_VERSION})")
        needs = {"unconditional": ("resolution", "z_dim"), "conditional": ("resolution", "z_dim", "class_names"),
                 "style": ("resolution", "z_dim", "w_dim", "num_ws", "mapping"),
                 "translation": ("in_channels", "size_multiple", "scale", "train_resolution"),
                 "super_resolution": ("in_channels", "size_multiple", "scale", "train_resolution")}[self.kind]
        missing = [key for key in needs if getattr(self, key) in (None, [])]
        if missing:
            raise ValueError(f"a {self.kind} entry needs {', '.join(missing)}")
        if self.truncation is not None and {"name": "truncation_stats", "datatype": "float32", "shape": [-1, self.truncation.n_stats]} not in [
                t.model_dump() for t in self.inputs]:
            raise ValueError(f"a model with BigGAN truncation needs the input truncation_stats [-1, {self.truncation.n_stats}]")
        if self.value_range[1] <= self.value_range[0]:
            raise ValueError("value_range must be [low, high] with low < high")
        return self


def describe_invalid(error: ValidationError) -> str:
    parts = []
    for problem in error.errors()[:5]:
        where = ".".join(str(p) for p in problem.get("loc", []))
        parts.append(f"{where}: {problem.get('msg')}" if where else str(problem.get("msg")))
    return "; ".join(parts)
