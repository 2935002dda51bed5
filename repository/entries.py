"""Writing a model-repository entry: staged in a hidden folder and moved in whole, so a failed
export or import (parity, a crash, a bad checkpoint) leaves no entry behind and the old one untouched."""
from __future__ import annotations

import json
import re
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


ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_entry_name(name: str) -> None:
    """A model's name is one folder of the repository and a URL path segment: letters, digits,
    `.`, `_` and `-`, starting with a letter or digit (`--name /../../tmp/x` once wrote, and
    replaced, a folder outside the repository)."""
    if not ENTRY_NAME.fullmatch(name):
        raise ExportError(f"model name {name[:80]!r}: use letters, digits, '.', '_' and '-' (at most 128, starting with a letter or digit)")


def remove_stale_staging(repository: Path, name: str, version: int) -> None:
    """Staging folders of this entry that a killed export left behind (the service never reads them)."""
    for stale in repository.glob(f".{name}-{version}-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def write_entry(repository: Path, name: str, version: int, fill) -> Path:
    """Builds `repository/name/version/` in a staging folder with `fill(staging)` and moves it in
    whole: a failed export (parity, a crash) leaves no entry behind and the old one untouched."""
    check_entry_name(name)
    target = repository / name / str(version)
    repository.mkdir(parents=True, exist_ok=True)
    if not target.resolve().is_relative_to(repository.resolve()):
        raise ExportError(f"{target} lies outside the repository {repository}")
    remove_stale_staging(repository, name, version)
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
