"""Writing an entry: staged and moved in whole, stamped with the entry schema's version, and
checked against the schema the service reads — an entry the service would refuse never appears."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from models.entry_schema import SCHEMA_VERSION
from repository.entries import write_entry
from repository.graphs import ExportError

VALID = {"name": "tiny", "version": 1, "kind": "unconditional", "value_range": [-1.0, 1.0], "channels": 1, "resolution": 8, "z_dim": 4,
         "inputs": [{"name": "z", "datatype": "float32", "shape": [-1, 4]}],
         "outputs": [{"name": "image", "datatype": "float32", "shape": [-1, 1, 8, 8]}],
         "formats": {"onnx": {"file": "model.onnx"}}}


def writer(spec: dict):
    def fill(staging) -> None:
        (staging / "spec.json").write_text(json.dumps(spec))
    return fill


def test_a_written_entry_carries_the_schema_version(tmp_path):
    entry = write_entry(tmp_path, "tiny", 1, writer(VALID))
    assert json.loads((entry / "spec.json").read_text())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("change,mentions", [({"kind": "hologram"}, "kind"), ({"z_dim": None}, "needs z_dim"),
                                             ({"value_range": [1.0, -1.0]}, "low < high")])
def test_an_entry_the_service_would_refuse_is_never_written(tmp_path, change, mentions):
    with pytest.raises(ExportError, match=mentions):
        write_entry(tmp_path, "tiny", 1, writer(VALID | change))
    assert not (tmp_path / "tiny").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def blocked_writer(spec: dict, entered: threading.Event, release: threading.Event):
    """A fill that stays inside the entry's write until released, as a long export does."""
    def fill(staging) -> None:
        entered.set()
        assert release.wait(30)
        (staging / "spec.json").write_text(json.dumps(spec))
    return fill


def hidden(repository) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if p.name.startswith("."))


def test_a_second_writer_of_the_same_entry_is_refused_and_the_first_one_finishes(tmp_path):
    """Two exports of tiny v1 at once: the second used to remove the first one's staging folder as
    stale (the first then failed with a missing file); now it fails at once with a clear message."""
    entered, release = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(write_entry, tmp_path, "tiny", 1, blocked_writer(VALID, entered, release))
        assert entered.wait(30)
        with pytest.raises(ExportError, match="another export or import of tiny v1 is writing it now"):
            write_entry(tmp_path, "tiny", 1, writer(VALID | {"resolution": 16}))
        release.set()
        entry = first.result(timeout=30)
    assert json.loads((entry / "spec.json").read_text())["resolution"] == 8
    assert hidden(tmp_path) == []  # neither staging folders nor the lock are left behind
    write_entry(tmp_path, "tiny", 1, writer(VALID | {"resolution": 16}))  # once it is done, the entry may be replaced
    assert json.loads((entry / "spec.json").read_text())["resolution"] == 16 and hidden(tmp_path) == []


def test_writing_one_model_leaves_a_model_whose_name_extends_it_alone(tmp_path):
    """`tiny` v1 cleans up its own stale folders only, not those of `tiny-1` v3 being written."""
    entered, release = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(write_entry, tmp_path, "tiny-1", 3, blocked_writer(VALID | {"name": "tiny-1", "version": 3}, entered, release))
        assert entered.wait(30)
        write_entry(tmp_path, "tiny", 1, writer(VALID))
        release.set()
        assert (other.result(timeout=30) / "spec.json").is_file()
    assert hidden(tmp_path) == []


def test_an_export_killed_mid_write_is_cleaned_up_by_the_next_one(tmp_path):
    """The kernel drops a dead writer's lock; its staging folder and lock file go with the next write."""
    code = ("import sys, time; from pathlib import Path; from repository.entries import write_entry; "
            "write_entry(Path(sys.argv[1]), 'tiny', 1, lambda staging: (print('in', flush=True), time.sleep(60)))")
    killed = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    assert killed.stdout.readline().strip() == b"in"
    killed.kill()
    killed.wait()
    assert len(hidden(tmp_path)) == 2  # its staging folder and its lock
    write_entry(tmp_path, "tiny", 1, writer(VALID))
    assert hidden(tmp_path) == [] and (tmp_path / "tiny" / "1" / "spec.json").is_file()
