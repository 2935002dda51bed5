"""Writing a model-repository entry: staged in a hidden folder and moved in whole, so a failed
export or import (parity, a crash, a bad checkpoint) leaves no entry behind and the old one untouched."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pydantic import ValidationError

from models.entry_schema import SCHEMA_VERSION, EntrySpec, describe_invalid
from repository.graphs import FORMATS, ExportError


def check_export_request(formats: list[str], version: int) -> None:
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ExportError(f"unknown formats {sorted(unknown)}: choose from {FORMATS}")
    if version < 1:
        raise ExportError("versions start at 1")


def stamp_and_check(spec_path: Path) -> None:
    """Stamps the entry schema's version into spec.json and validates it against the schema the
    service reads: an entry that the service would refuse is never written."""
    spec = json.loads(spec_path.read_text())
    spec = {"schema_version": SCHEMA_VERSION, **spec}
    try:
        EntrySpec.model_validate(spec)
    except ValidationError as error:
        raise ExportError(f"the entry's spec.json would be invalid: {describe_invalid(error)}") from None
    spec_path.write_text(json.dumps(spec, indent=2))


def write_entry(repository: Path, name: str, version: int, fill) -> Path:
    """Builds `repository/name/version/` in a staging folder with `fill(staging)` and moves it in
    whole: a failed export (parity, a crash) leaves no entry behind and the old one untouched."""
    target = repository / name / str(version)
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=repository))
    try:
        fill(staging)
        stamp_and_check(staging / "spec.json")
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
