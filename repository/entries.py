"""Writing a model-repository entry: staged in a hidden folder and moved in whole, so a failed
export or import (parity, a crash, a bad checkpoint) leaves no entry behind and the old one untouched."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from repository.graphs import FORMATS, ExportError


def check_export_request(formats: list[str], version: int) -> None:
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ExportError(f"unknown formats {sorted(unknown)}: choose from {FORMATS}")
    if version < 1:
        raise ExportError("versions start at 1")


def write_entry(repository: Path, name: str, version: int, fill) -> Path:
    """Builds `repository/name/version/` in a staging folder with `fill(staging)` and moves it in
    whole: a failed export (parity, a crash) leaves no entry behind and the old one untouched."""
    target = repository / name / str(version)
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=repository))
    try:
        fill(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; an entry is meant to be shared
        for file in staging.iterdir():
            file.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)  # the entry appears whole or not at all
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
