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
    assert model.opset_import[0].version >= 18


@pytest.mark.parametrize("name", ["cdigits", "styles", "upx4"])
def test_an_entry_records_its_half_precision_parity_against_the_stated_bound(repository, name, server):
    """Export runs the main graph in bf16 and fp16 beside fp32 and records the distance in
    fractions of the value range, judged against the schema's bound; a style model's mapping is
    recorded in its own units (w has no value range). `GET /v1/models/{name}` shows the record."""
    spec = json.loads((repository / name / "1" / "spec.json").read_text())
    record = spec["half_precision"]
    assert record["units"] == "value_range" and record["bound"] == {"mean": 1 / 255, "max": 8 / 255}
    for precision in ("bf16", "fp16"):
        figures = record[precision]
        assert 0 < figures["mean_abs_error"] <= figures["max_abs_error"] < 1
        assert figures["within_bound"] == (figures["mean_abs_error"] <= 1 / 255 and figures["max_abs_error"] <= 8 / 255)
    if name == "styles":
        assert spec["mapping"]["half_precision"]["units"] == "output" and "within_bound" not in spec["mapping"]["half_precision"]["bf16"]
    with server.client() as client:
        version = client.get(f"/v1/models/{name}").json()["versions"][0]
    assert version["half_precision_at_export"] == record
    assert version["serving"]["precision"] == "auto" and version["served_precision"] == "fp32"  # auto on a CPU (ONNX Runtime here) is fp32


def test_a_graph_that_loses_its_output_in_half_precision_is_recorded_over_the_bound():
    class Cancelling(torch.nn.Module):  # x·1000 + 1 − x·1000: fp32 keeps the 1, a 8-bit mantissa does not
        def forward(self, z):
            return torch.tanh((z * 1000 + 1) - z * 1000)

    graph = graphs.Graph("model", Cancelling(), (torch.randn(16, 8),), [], [])
    record = graphs.half_precision_parity(graph, (-1.0, 1.0))
    assert record["bf16"]["within_bound"] is False and record["bf16"]["max_abs_error"] > 0.1


def test_a_half_type_this_cpu_would_emulate_for_long_is_recorded_as_not_measured(monkeypatch):
    """An import of a large generator must not spend minutes in emulated fp16 kernels (a 256²
    StyleGAN2's synthesis: ~200x its fp32 time on a CPU without fp16 units)."""
    monkeypatch.setattr(graphs, "runs_natively", lambda precision: precision == "bf16")
    monkeypatch.setattr(graphs, "EMULATED_HALF_MAX_FP32_S", 0.0)
    graph = graphs.Graph("model", torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()), (torch.randn(16, 8),), [], [])
    record = graphs.half_precision_parity(graph, (-1.0, 1.0))
    assert "mean_abs_error" in record["bf16"] and "not_measured" in record["fp16"] and "fp16 units" in record["fp16"]["not_measured"]


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
