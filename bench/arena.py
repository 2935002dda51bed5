"""`ganserve bench-arena`: what ONNX Runtime's host arena costs and keeps, for a fixed-shape
generator, as the server runs it (service/runtimes.py: arena without memory patterns, outputs in
arrays of ours, batches past warm-up's largest given back) against the settings before (arena
with memory patterns, `session.run`'s outputs in the arena's memory) and against no arena at all,
in the same run, each in its own process (resident memory is per process).

Per setting: the time of a batch at the warmed size, what is resident after warm-up, after a
request that holds its outputs until it is written (as a many-image answer does) and after one
batch twice the warmed size. The server's memory budget counts what is resident after warm-up;
what stays after that is outside it.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.runner import machine, write_report
from service.repository import ModelEntry

SETTINGS = ("previous", "served", "no arena")


def wide_generator_entry(root: Path, side: int) -> ModelEntry:
    """A fixed-shape generator z[4] → a side² image through one 16-channel layer at full size:
    16 B of activations a pixel, what a StyleGAN's last layers hold at their resolution."""
    import torch
    from torch import nn

    class WideGenerator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.spread = nn.Conv2d(4, 16, 3, padding=1)
            self.out = nn.Conv2d(16, 3, 3, padding=1)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            seed = z[:, :, None, None].expand(-1, -1, side, side)
            return torch.tanh(self.out(torch.relu(self.spread(seed))))

    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WideGenerator().eval(), (torch.randn(2, 4),), str(root / "model.onnx"), input_names=["z"], output_names=["image"],
                          opset_version=18, dynamo=True, external_data=False, dynamic_shapes=({0: batch},), verbose=False)
    spec = {"inputs": [{"name": "z", "datatype": "float32", "shape": [-1, 4]}],
            "outputs": [{"name": "image", "datatype": "float32", "shape": [-1, 3, side, side]}],
            "formats": {"onnx": {"file": "model.onnx"}}}
    return ModelEntry("wide", 1, root, spec)


def entry_at(path: Path) -> ModelEntry:
    """A repository entry's synthesis graph (`<name>/<version>` directory with its spec.json)."""
    return ModelEntry(path.parent.name, int(path.name), path, json.loads((path / "spec.json").read_text()))


def inputs_for(entry: ModelEntry, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {t["name"]: rng.standard_normal((batch, *t["shape"][1:]), dtype=np.float32) for t in entry.graph_spec("model")["inputs"]}


def measure_setting(setting: str, entry: ModelEntry, batch: int, held: int, repeats: int, results) -> None:
    """One setting in this (fresh) process; puts its figures on `results`."""
    from models.onnx_runtime import onnx_runtime

    ort = onnx_runtime()

    from service.memory import rss_bytes
    from service.runtimes import OnnxRuntime, warming

    if setting == "served":
        runtime = OnnxRuntime(entry, "cpu", 1)
        run = runtime.run
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = setting == "previous"
        session = ort.InferenceSession(str(entry.file_for("onnx")), options, providers=["CPUExecutionProvider"])
        runtime = None

        def run(inputs):
            return session.run(None, inputs)[0]

    started = rss_bytes()
    with warming(runtime) if runtime is not None else contextlib.nullcontext():
        for _ in range(2):
            run(inputs_for(entry, batch))
    warm = rss_bytes()
    times = []
    for _ in range(repeats):
        begun = time.perf_counter()
        run(inputs_for(entry, batch))
        times.append(time.perf_counter() - begun)
    outputs = [run(inputs_for(entry, batch)) for _ in range(held)]
    holding = rss_bytes()
    del outputs
    after_held = rss_bytes()
    run(inputs_for(entry, 2 * batch))
    after_larger = rss_bytes()
    mib = 2**20
    results.put({"setting": setting, "batch_ms": statistics.median(times) * 1000, "loaded_mib": (warm - started) / mib,
                 "holding_mib": (holding - warm) / mib, "kept_after_held_mib": (after_held - warm) / mib,
                 "kept_after_larger_mib": (after_larger - warm) / mib})


def run_arena_bench(entry_path: Path | None, side: int, batch: int, held: int, repeats: int, out: Path | None) -> dict:
    console = Console()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as scratch:
        entry = entry_at(entry_path) if entry_path else wide_generator_entry(Path(scratch), side)
        figures = {}
        for setting in SETTINGS:
            results = context.Queue()
            process = context.Process(target=measure_setting, args=(setting, entry, batch, held, repeats, results))
            process.start()
            figures[setting] = results.get(timeout=1800)
            process.join()
    output = entry.graph_spec("model")["outputs"][0]["shape"]
    table = Table(title=f"{entry.label} ({'x'.join(map(str, output[1:]))}), batch {batch}, {held} batches held: {machine()}")
    for column in ("setting", "ms a batch", "× previous", "resident after warm-up", "kept after held outputs", "kept after a 2× batch"):
        table.add_column(column, justify="right")
    base = figures["previous"]["batch_ms"]
    for setting, row in figures.items():
        table.add_row(setting, f"{row['batch_ms']:.0f}", f"{row['batch_ms'] / base:.2f}", f"{row['loaded_mib']:.0f} MiB",
                      f"{row['kept_after_held_mib']:.0f} MiB", f"{row['kept_after_larger_mib']:.0f} MiB")
    console.print(table)
    report = {"machine": machine(), "entry": entry.label, "output_shape": output, "batch": batch, "held_batches": held, "settings": figures}
    write_report(report, out)
    return report
