"""Writing an entry: staged and moved in whole, stamped with the entry schema's version, and
checked against the schema the service reads — an entry the service would refuse never appears."""
from __future__ import annotations

import json

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
