"""Export writes a complete, parity-checked entry, or nothing."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import repository.graphs as graphs
import training.export as export
from repository.graphs import ExportError
from tests.serving import tiny_run


def test_an_entry_holds_every_format_with_its_recorded_parity(repository):
    entry = repository / "cdigits" / "1"
    assert {p.name for p in entry.iterdir()} == {"model.onnx", "model.pt", "model.safetensors", "spec.json", "metrics.json", "samples.png"}
    spec = json.loads((entry / "spec.json").read_text())
    assert spec["name"] == "cdigits" and spec["version"] == 1 and spec["kind"] == "conditional"
    assert spec["resolution"] == 32 and spec["channels"] == 1 and spec["z_dim"] == 64 and len(spec["class_names"]) == 10
    assert [i["name"] for i in spec["inputs"]] == ["z", "label"] and spec["outputs"][0]["shape"] == [-1, 1, 32, 32]
    for fmt in ("onnx", "torchscript"):
        assert spec["formats"][fmt]["parity_max_abs_error"] <= 1e-4
    assert spec["training"]["checkpoint_sha256"] and spec["training"]["config"]["model"]["arch"] == "cdcgan"
    model = onnx.load(str(entry / "model.onnx"))
    assert model.opset_import[0].version >= 17


def test_onnx_graph_has_a_dynamic_batch_axis(repository):
    session = ort.InferenceSession(str(repository / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 37):
        out = session.run(None, {"z": np.zeros((batch, 64), np.float32)})[0]
        assert out.shape == (batch, 1, 32, 32)


def test_torchscript_loads_without_the_project_code(repository):
    scripted = torch.jit.load(str(repository / "digits" / "1" / "model.pt"))
    assert scripted(torch.zeros(5, 64)).shape == (5, 1, 32, 32)


def test_a_parity_failure_stops_export_with_a_clear_message_and_leaves_no_entry(tmp_path, monkeypatch):
    run = tiny_run("dcgan-digits", tmp_path / "run")
    real_export = graphs.export_torchscript

    def corrupted(generator, example, path):  # a TorchScript file whose weights drifted
        real_export(generator, example, path)
        scripted = torch.jit.load(str(path))
        with torch.no_grad():
            next(scripted.parameters()).add_(0.5)
        scripted.save(str(path))

    monkeypatch.setattr(graphs, "export_torchscript", corrupted)
    with pytest.raises(ExportError, match="parity check failed"):
        export.export_run(run, "drifted", 1, tmp_path / "repo", ["onnx", "torchscript"], "last")
    assert not (tmp_path / "repo" / "drifted").exists()
    assert list((tmp_path / "repo").iterdir()) == []


def test_unknown_export_formats_are_refused(tmp_path):
    with pytest.raises(ExportError, match="unknown formats"):
        export.export_run(tmp_path, "x", 1, tmp_path / "repo", ["tflite"])
