"""Writing a model-repository entry: staged in a hidden folder and moved in whole, so a failed
export or import (parity, a crash, a bad checkpoint) leaves no entry behind and the old one untouched."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
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


def staging_prefix(name: str, version: int) -> str:
    """Hidden folders of one entry's writers: `@` appears in no name, so `.a@1@` never matches
    model `a-1`'s folders (with `-` as the separator, cleaning up `a` v1 removed `a-1` v3's)."""
    return f".{name}@{version}@"


def remove_stale_staging(repository: Path, name: str, version: int) -> None:
    """Folders of this entry that a killed export left behind (the service never reads them).
    Called with the entry's lock held, so none of them belongs to a live writer."""
    for stale in repository.glob(staging_prefix(name, version) + "*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def entry_lock(repository: Path, name: str, version: int) -> Iterator[None]:
    """One writer per entry at a time: a second export or import of the same name and version
    fails at once, instead of removing the first one's staging folder as stale (or replacing
    its entry mid-write). An advisory `flock` on a hidden file, which the kernel releases when
    its holder dies; the file is removed on the way out, and a writer that locked a file a
    finishing one had just removed tries again on the new one."""
    path = repository / f".{name}@{version}.lock"  # outside staging_prefix's glob
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ExportError(f"another export or import of {name} v{version} is writing it now: wait for it, or choose another version") from None
        try:
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)  # locked a file its holder has since removed: lock the current one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


def write_entry(repository: Path, name: str, version: int, fill) -> Path:
    """Builds `repository/name/version/` in a staging folder with `fill(staging)` and moves it in
    whole: a failed export (parity, a crash) leaves no entry behind and the old one untouched. A
    replaced entry is moved aside before the new one moves in, so the path is missing for two
    renames, not for the removal of a folder of weights."""
    check_entry_name(name)
    target = repository / name / str(version)
    repository.mkdir(parents=True, exist_ok=True)
    if not target.resolve().is_relative_to(repository.resolve()):
        raise ExportError(f"{target} lies outside the repository {repository}")
    with entry_lock(repository, name, version):
        remove_stale_staging(repository, name, version)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(name, version), dir=repository))
        replaced = None
        try:
            fill(staging)
            stamp_and_check(staging / "spec.json")
            staging.chmod(0o755)  # mkdtemp makes it private; an entry is meant to be shared
            for file in staging.iterdir():
                file.chmod(0o644)
            if target.exists():
                replaced = Path(tempfile.mkdtemp(prefix=staging_prefix(name, version) + "old", dir=repository))
                target.rename(replaced / "entry")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                staging.rename(target)  # the entry appears whole or not at all
            except BaseException:
                if replaced is not None:  # the old entry goes back
                    (replaced / "entry").rename(target)
                raise
        finally:
            for leftover in (staging, replaced):
                if leftover is not None and leftover.exists():
                    shutil.rmtree(leftover)
    return target
