"""The model repository on disk: `<root>/<name>/<version>/spec.json` plus model files.

This is the whole contract with training: the service reads entries, never training code; their
`spec.json` follows one typed, versioned schema (models/entry_schema.py) that the writers check too. A
broken entry (unreadable or invalid `spec.json`) is still an entry: it carries its problem, the
registry reports it `failed`, and every other entry is served. Messages name entries by
`<name>/<version>/<file>`, never by absolute path.
"""
from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from models.entry_schema import EntrySpec, describe_invalid
from service.digits import ascii_count


class RepositoryError(RuntimeError):
    pass


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


MAX_SPEC_BYTES = 4 * 2**20  # a spec.json is a few KB; one of gigabytes would be read whole


def read_entry(version_dir: Path) -> ModelEntry:
    """One entry; a problem with its spec is recorded on it, not raised: one bad entry must not
    take the repository down (a spec nested 100,000 deep once made the index, every load and
    start-up itself fail, and a FIFO named spec.json blocked the event loop in `open`)."""
    name, version = version_dir.parent.name, int(version_dir.name)
    try:
        info = (version_dir / "spec.json").stat()
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("spec.json is not a regular file")
        if info.st_size > MAX_SPEC_BYTES:
            raise ValueError(f"spec.json is {info.st_size} bytes, more than a spec can need ({MAX_SPEC_BYTES})")
        spec = json.loads((version_dir / "spec.json").read_text())
        if not isinstance(spec, dict):
            raise ValueError("spec.json must hold a JSON object")
        EntrySpec.model_validate(spec)
    except ValidationError as error:
        return ModelEntry(name, version, version_dir, {}, f"{name}/{version}/spec.json is invalid: {describe_invalid(error)}")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        reason = error.strerror if isinstance(error, OSError) else "nested too deeply" if isinstance(error, RecursionError) else str(error)
        return ModelEntry(name, version, version_dir, {}, f"{name}/{version}/spec.json could not be read: {reason}")
    return ModelEntry(name, version, version_dir, spec)


def scan_repository(root: Path) -> list[ModelEntry]:
    """Every entry under `root` (broken ones included, with their problem), sorted by name then version."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist: run `make models` or `ganserve export`")
    entries = []
    for spec_path in sorted(root.glob("*/*/spec.json")):
        version_dir = spec_path.parent
        # the canonical spelling only: `01` beside `1` listed version 1 twice
        if (version := ascii_count(version_dir.name)) is not None and 0 < version < 2**31 and version_dir.name == str(version):
            entries.append(read_entry(version_dir))
    return sorted(entries, key=lambda e: (e.name, e.version))
