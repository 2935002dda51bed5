"""The model repository on disk: `<root>/<name>/<version>/spec.json` plus model files.

This is the whole contract with training: the service reads entries, never training code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class RepositoryError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: int
    path: Path
    spec: dict

    @property
    def kind(self) -> str:
        return self.spec["kind"]

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
            raise RepositoryError(f"{self.name} v{self.version} has no {fmt} export of {graph} (has {sorted(formats)})")
        return self.path / formats[fmt]["file"]


def scan_repository(root: Path) -> list[ModelEntry]:
    """Every valid entry under `root`, sorted by name then version."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist: run `make models` or `ganserve export`")
    entries = []
    for spec_path in sorted(root.glob("*/*/spec.json")):
        version_dir = spec_path.parent
        if not version_dir.name.isdigit():
            continue
        spec = json.loads(spec_path.read_text())
        entries.append(ModelEntry(name=version_dir.parent.name, version=int(version_dir.name), path=version_dir, spec=spec))
    return sorted(entries, key=lambda e: (e.name, e.version))
