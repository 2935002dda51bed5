"""Exporting one network of an entry: TorchScript and ONNX (dynamic batch axis, and dynamic
height/width for image-to-image graphs), each checked against eager PyTorch on the same inputs;
an export whose max abs error exceeds the tolerance fails with a clear message, unless float64
shows the difference is eager float32's own rounding (see `parity_errors`). Shared by the
export of our own runs (training/) and the import of foreign checkpoints (repository/importers/).
"""
from __future__ import annotations

import copy
import functools
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.entry_schema import HALF_PRECISION_MAX_BOUND, HALF_PRECISION_MEAN_BOUND

FORMATS = ("onnx", "torchscript")
# the eager runtime rebuilds the exported module from its own weights: nothing is compared, so no parity number is claimed
EAGER_FORMAT = {"eager": {"file": "model.safetensors"}}
PARITY_SEEDS = list(range(16))
PARITY_TOLERANCE = 1e-4
OPSET = 18  # the dynamo exporter's own: asking for 17 made it convert down, and print a traceback where the conversion failed (it then kept 18)
MAX_BATCH = 4096
# each step of an export, as it starts: a StyleGAN3 import ran 15 minutes without a line (`ganserve
# import` and `ganserve export` show these; `export_progress` in repository/cli.py)
progress = logging.getLogger("ganserve.export")


class ExportError(RuntimeError):
    """Export could not produce a faithful entry (parity failed, or a format is unknown)."""


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: list[int]  # -1 is the dynamic batch axis

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.dtype, "shape": self.shape}


@dataclass
class Graph:
    """One exported network: `model.*` is the main graph the service batches, `mapping.*` a
    style model's z → w network."""

    stem: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]  # 16 parity inputs
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    size_multiple: int = 1  # image-to-image graphs: height and width must be multiples of this
    other_sizes: tuple[tuple[torch.Tensor, ...], ...] = ()  # parity inputs at other heights/widths


def dynamic_shapes(inputs: list[TensorSpec], size_multiple: int) -> tuple[dict, ...]:
    """torch.export dims for each -1 axis: batch on axis 0, height/width on axes 2/3 (as
    multiples of `size_multiple` when the network halves the image)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if size_multiple > 1:
        height = size_multiple * torch.export.Dim("height_blocks", min=1, max=8192 // size_multiple)
        width = size_multiple * torch.export.Dim("width_blocks", min=1, max=8192 // size_multiple)
    else:
        height, width = torch.export.Dim("height", min=2, max=8192), torch.export.Dim("width", min=2, max=8192)
    named = {0: batch, 2: height, 3: width}
    return tuple({axis: named[axis] for axis, size in enumerate(t.shape) if size == -1} for t in inputs)


def export_torchscript(generator: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():  # the tracer's warnings about Python values (checked by parity) and its deprecation
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(generator, example, check_trace=False)
    traced.save(str(path))


def export_onnx(generator: nn.Module, example: tuple[torch.Tensor, ...], inputs: list[TensorSpec], outputs: list[TensorSpec], path: Path,
                size_multiple: int = 1) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            generator, example, str(path), input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
            opset_version=OPSET, dynamo=True, external_data=False, dynamic_shapes=dynamic_shapes(inputs, size_multiple),
            verbose=False,
        )


def onnx_session(path: Path):
    """One ONNX Runtime session for a parity check, without the CPU arena: each run's activations
    go back to the allocator instead of staying with the session (a 256² StyleGAN3 would keep
    gigabytes)."""
    from models.onnx_runtime import onnx_runtime

    ort = onnx_runtime()

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_outputs(session, example: tuple[torch.Tensor, ...], inputs: list[TensorSpec]) -> np.ndarray:
    return session.run(None, {t.name: x.numpy() for t, x in zip(inputs, example)})[0]


PARITY_CHUNK = 3  # parity inputs per run after the first: a 256² StyleGAN3 holds ~0.6 GB per activation per image


def parity_parts(graph: Graph) -> list[tuple[torch.Tensor, ...]]:
    """The 16 parity inputs as 1, then chunks of 3 — never the 2 the graphs were traced with, so a
    graph that only works at its traced batch size fails here rather than in the service — and in
    chunks, so that checking a large imported generator does not hold 16 images' activations —
    then the inputs at other heights/widths, if any."""
    count = graph.example[0].shape[0]
    bounds = [(0, 1)] + [(start, min(start + PARITY_CHUNK, count)) for start in range(1, count, PARITY_CHUNK)]
    return [tuple(x[a:b] for x in graph.example) for a, b in bounds] + list(graph.other_sizes)


def exported_outputs(graph: Graph, entry: Path, formats: list[str], parts: list[tuple[torch.Tensor, ...]]) -> dict[str, list[np.ndarray]]:
    """Each exported format's outputs on each part, read back from the files as a runtime loads them."""
    outputs: dict[str, list[np.ndarray]] = {}
    if "torchscript" in formats:
        scripted = torch.jit.load(str(entry / f"{graph.stem}.pt"))
        with torch.no_grad():
            outputs["torchscript"] = [scripted(*part).numpy() for part in parts]
    if "onnx" in formats:
        session = onnx_session(entry / f"{graph.stem}.onnx")
        outputs["onnx"] = [onnx_outputs(session, part, graph.inputs) for part in parts]
    return outputs


def max_error(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max()) for a, b in zip(got, expected))


def float64_outputs(graph: Graph, parts: list[tuple[torch.Tensor, ...]]) -> list[np.ndarray]:
    """The graph's outputs computed in double precision: the arbiter when float32 results disagree."""
    module = copy.deepcopy(graph.module).double()
    with torch.no_grad():
        return [module(*(x.double() if x.is_floating_point() else x for x in part)).numpy() for part in parts]


def parity_errors(graph: Graph, entry: Path, formats: list[str], tolerance: float) -> dict[str, dict[str, float]]:
    """Per format: its max abs error against eager PyTorch (float32) on the parity inputs, and
    whether it passes. A format within `tolerance` of eager passes. One that is not is judged
    against the same graph in float64: it passes when it is no further from that than eager
    float32 itself is (nor than `tolerance`) — a deep network's float32 rounding (BigGAN-deep-128:
    eager 1.1e-3 from float64 at truncation 0.05, ONNX Runtime 2.8e-4) is no fault of the export."""
    parts = parity_parts(graph)
    progress.info("checking %s: %s against eager PyTorch on %d inputs", graph.stem, " and ".join(formats), sum(len(part[0]) for part in parts))
    with torch.no_grad():
        reference = [graph.module(*part).numpy() for part in parts]
    outputs = exported_outputs(graph, entry, formats, parts)
    results = {fmt: {"parity_max_abs_error": max_error(got, reference)} for fmt, got in outputs.items()}
    if all(r["parity_max_abs_error"] <= tolerance for r in results.values()):
        return {fmt: r | {"passed": True} for fmt, r in results.items()}
    exact = float64_outputs(graph, parts)
    eager_error = max_error(reference, exact)
    for fmt, got in outputs.items():
        own = max_error(got, exact)
        results[fmt] |= {"float64_max_abs_error": own, "eager_float64_max_abs_error": eager_error,
                         "passed": results[fmt]["parity_max_abs_error"] <= tolerance or own <= max(tolerance, eager_error)}
    return results


HALF_PARITY_INPUTS = 1
HALF_PARITY_SIDE = 32  # image-to-image graphs take any size: half precision is measured on a 32 px crop (9x fewer pixels than a 96 px tile)
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A CPU without units for a half type runs it through emulated kernels, measured ~200x slower than
# fp32 here (fp16 StyleGAN2 config-f 256² synthesis: 0.87 s in fp32, ~197 s in fp16; bf16 on the same
# CPU's avx512_bf16 units 0.43 s). Emulated, a type is measured only for graphs whose fp32 forward
# takes under this, so an import never spends more than ~10 s on it.
HALF_NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
EMULATED_HALF_MAX_FP32_S = 0.05


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere: every half type counts as emulated)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def runs_natively(precision: str) -> bool:
    return any(flag in cpu_flags() for flag in HALF_NATIVE_CPU_FLAGS[precision])


def half_parity_input(graph: Graph) -> tuple[torch.Tensor, ...]:
    """The first parity input; an image-to-image graph's cropped to HALF_PARITY_SIDE (rounded up
    to its size multiple), since the cost of an emulated half-precision convolution grows with
    its pixels and the error statistics do not need them."""
    part = tuple(x[:HALF_PARITY_INPUTS] for x in graph.example)
    if not graph.other_sizes:
        return part
    multiple = graph.size_multiple
    side = -(-max(HALF_PARITY_SIDE, 2 * multiple) // multiple) * multiple
    image, *rest = part
    return (image[..., : min(side, image.shape[-2]), : min(side, image.shape[-1])].contiguous(), *rest)


def half_precision_parity(graph: Graph, value_range: tuple[float, float] | None) -> dict:
    """The graph in bf16 and in fp16 (eager PyTorch on this CPU) against float32 on the first
    parity input (`half_parity_input`): mean and max abs error, in fractions of `value_range` with the schema's bound
    (`within_bound`) for an image graph, in the output's own units otherwise (a style model's
    z → w). A precision the graph cannot run in here (an operator without a half kernel on the
    CPU) is recorded with its error, and one this CPU would emulate for minutes is recorded as
    not measured (`EMULATED_HALF_MAX_FP32_S`). The service measures again on its own device before
    it serves half precision (service/precision.py); this is the entry's record of it."""
    part = half_parity_input(graph)
    progress.info("measuring %s in bf16 and fp16 against fp32", graph.stem)
    scale = 1.0 if value_range is None else value_range[1] - value_range[0]
    started = time.perf_counter()
    with torch.no_grad():
        reference = graph.module(*part).double()
    fp32_seconds = time.perf_counter() - started
    record: dict = {"device": "cpu", "input_shape": list(part[0].shape), "units": "value_range" if value_range else "output"}
    for name, dtype in HALF_DTYPES.items():
        if not runs_natively(name) and fp32_seconds > EMULATED_HALF_MAX_FP32_S:
            record[name] = {"not_measured": f"this CPU has no {name} units, and emulating them for this graph would take minutes "
                                            f"(its fp32 forward: {fp32_seconds:.2f} s); the server measures it on its device at load"}
            continue
        try:
            module = copy.deepcopy(graph.module).to(dtype)
            with torch.no_grad():
                got = module(*(x.to(dtype) if x.is_floating_point() else x for x in part)).double()
        except Exception as error:  # noqa: BLE001 — recorded: the precision is not available for this graph here
            record[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
            continue
        difference = (got - reference).abs() / scale
        if not torch.isfinite(difference).all():
            record[name] = {"error": "non-finite outputs (overflow)"}
            continue
        figures = {"mean_abs_error": float(difference.mean()), "max_abs_error": float(difference.max())}
        if value_range is not None:
            figures["within_bound"] = figures["mean_abs_error"] <= HALF_PRECISION_MEAN_BOUND and figures["max_abs_error"] <= HALF_PRECISION_MAX_BOUND
        record[name] = figures
    if value_range is not None:
        record["bound"] = {"mean": HALF_PRECISION_MEAN_BOUND, "max": HALF_PRECISION_MAX_BOUND}
    return record


def export_graph(graph: Graph, staging: Path, formats: list[str], tolerance: float, value_range: tuple[float, float] | None = None) -> dict:
    """Writes the graph in each format, checks parity; returns its spec block, with the graph's
    half-precision parity (`value_range`: the image a main graph outputs, to state it against
    the schema's bound)."""
    example = tuple(x[:2] for x in graph.example)
    if "torchscript" in formats:
        progress.info("exporting %s: TorchScript", graph.stem)
        export_torchscript(graph.module, example, staging / f"{graph.stem}.pt")
    if "onnx" in formats:
        progress.info("exporting %s: ONNX", graph.stem)
        export_onnx(graph.module, example, graph.inputs, graph.outputs, staging / f"{graph.stem}.onnx", graph.size_multiple)
    parity = parity_errors(graph, staging, formats, tolerance)
    failed = {fmt: r for fmt, r in parity.items() if not r.pop("passed")}
    if failed:
        raise ExportError(f"parity check failed for {graph.stem}: {failed} exceeds {tolerance} against eager PyTorch on 16 seeds "
                          "(and is further from float64 than eager float32 is)")
    files = {"onnx": f"{graph.stem}.onnx", "torchscript": f"{graph.stem}.pt"}
    return {
        "inputs": [t.to_dict() for t in graph.inputs],
        "outputs": [t.to_dict() for t in graph.outputs],
        "formats": {fmt: {"file": files[fmt]} | parity[fmt] for fmt in formats},
        "half_precision": half_precision_parity(graph, value_range),
    }
