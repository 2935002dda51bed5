"""The model repository on disk: `<root>/<name>/<version>/spec.json` plus model files.

This is the whole contract with training: the service reads entries, never training code. A
broken entry (unreadable or invalid `spec.json`) is still an entry: it carries its problem, the
registry reports it `failed`, and every other entry is served. Messages name entries by
`<name>/<version>/<file>`, never by absolute path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RepositoryError(RuntimeError):
    pass


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


class TruncationSpec(BaseModel):
    """BigGAN's truncation: z from a normal truncated to ±z_bound, scaled by t; batch-norm
    statistics for t enter the graph as `truncation_stats` [B, n_stats] (models/biggan.py)."""

    method: Literal["biggan"]
    z_bound: float = Field(gt=0, le=10)
    n_stats: int = Field(ge=2, le=1024)
    default: float = Field(gt=0, le=1)


class EntrySpec(GraphSpec):
    """The fields of `spec.json` the service reads, checked when the repository is scanned so a
    bad entry fails alone with a clear reason instead of answering 500 later."""

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
    scale: int | None = Field(None, ge=1, le=16)
    train_resolution: int | None = Field(None, ge=1, le=8192)
    mapping: GraphSpec | None = None
    model: dict | None = None
    truncation: TruncationSpec | None = None

    @model_validator(mode="after")
    def check_kind(self) -> "EntrySpec":
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


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: int
    path: Path
    spec: dict
    problem: str | None = None  # why this entry cannot be served, if it cannot

    @property
    def label(self) -> str:
        """How messages name the entry: relative to the repository, never an absolute path."""
        return f"{self.name}/{self.version}"

    @property
    def kind(self) -> str:
        return self.spec.get("kind", "unknown")

    @property
    def class_names(self) -> list[str]:
        return self.spec.get("class_names") or []

    @property
    def graphs(self) -> list[str]:
        """`model` (the generator, or a style model's synthesis), plus `mapping` for style models."""
        return ["model", "mapping"] if "mapping" in self.spec else ["model"]

    def graph_spec(self, graph: str) -> dict:
        """inputs, outputs and formats of one graph."""
        return self.spec if graph == "model" else self.spec[graph]

    def file_for(self, fmt: str, graph: str = "model") -> Path:
        formats = self.spec["formats"] if fmt == "eager" else self.graph_spec(graph).get("formats", {})
        if fmt not in formats:
            raise RepositoryError(f"{self.label} has no {fmt} export of {graph} (has {sorted(formats)})")
        return self.file_within(formats[fmt]["file"])

    def file_within(self, relative: str) -> Path:
        """A file the spec names; it must lie inside the entry's folder."""
        path = (self.path / relative).resolve()
        if not path.is_relative_to(self.path.resolve()):
            raise RepositoryError(f"{self.label}: {relative!r} must lie inside the entry's folder")
        if not path.is_file():
            raise RepositoryError(f"{self.label}/{relative} is missing")
        return path


def read_entry(version_dir: Path) -> ModelEntry:
    """One entry; a problem with its spec is recorded on it, not raised."""
    name, version = version_dir.parent.name, int(version_dir.name)
    try:
        spec = json.loads((version_dir / "spec.json").read_text())
        if not isinstance(spec, dict):
            raise ValueError("spec.json must hold a JSON object")
        EntrySpec.model_validate(spec)
    except ValidationError as error:
        return ModelEntry(name, version, version_dir, {}, f"{name}/{version}/spec.json is invalid: {describe_invalid(error)}")
    except (OSError, UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        reason = error.strerror if isinstance(error, OSError) else str(error)
        return ModelEntry(name, version, version_dir, {}, f"{name}/{version}/spec.json could not be read: {reason}")
    return ModelEntry(name, version, version_dir, spec)


def scan_repository(root: Path) -> list[ModelEntry]:
    """Every entry under `root` (broken ones included, with their problem), sorted by name then version."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist: run `make models` or `ganserve export`")
    entries = []
    for spec_path in sorted(root.glob("*/*/spec.json")):
        version_dir = spec_path.parent
        if version_dir.name.isdigit() and 0 < int(version_dir.name) < 2**31:
            entries.append(read_entry(version_dir))
    return sorted(entries, key=lambda e: (e.name, e.version))
