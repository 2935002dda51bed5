"""Graphs captured per input shape for the torch runtimes: the fast path on a GPU.

A small generator's batch on a GPU is dozens of tiny kernels, and launching them from Python
costs more than running them; a captured graph replays them all with one launch. Two ways to
capture, chosen by a model's serving configuration (`graph_capture`):

- `cuda_graphs`: `torch.cuda.CUDAGraph`, recorded from the TorchScript or eager module (CUDA
  only). The graph owns static input and output buffers: each run copies its inputs in, replays,
  and the caller copies the output out before the next run (one lock per module spans all three:
  its graphs share one memory pool).
- `compile`: `torch.compile` of the eager module (`reduce-overhead`, which adds CUDA graphs, on a
  GPU; inductor's fused kernels on a CPU, where it is tested), specialised per shape.

Capture happens during warm-up only, for exactly the shapes warm-up runs (the batch sizes batches
are padded to, the upscale tiles); then the set is sealed. A shape warm-up did not run is served
by the plain module and counted (`uncaptured_runs`), never compiled on a request's time. Each
captured shape's output is compared with the plain module's on the warm-up inputs, and the
largest difference is reported with the shapes (`GET /v1/models/{name}` → `capture`); a
captured graph further than 8/255 of the output's own range from the plain module (the bound
half precision is held to: service/precision.py), or non-finite, fails the model's load with the
figures, so a broken capture is never served.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.precision import MAX_BOUND

GRAPH_CAPTURES = ("none", "cuda_graphs", "compile")
CAPTURING_RUNTIMES = {"cuda_graphs": ("torchscript", "eager"), "compile": ("eager",)}  # torch.compile cannot trace TorchScript
CUDA_GRAPH_WARMUP_RUNS = 3  # eager runs on a side stream before recording (cuDNN/cuBLAS pick their algorithms)
CAPTURE_MAX_DIFFERENCE = MAX_BOUND  # half precision's bound, of the plain output's range (max - min) on the warm-up inputs


def capture_refusal(mode: str, runtime: str) -> str | None:
    """Why `runtime` cannot capture in `mode` (None: it can, or nothing is captured)."""
    if mode == "none" or runtime in CAPTURING_RUNTIMES[mode]:
        return None
    return f"graph_capture {mode} needs the {' or '.join(CAPTURING_RUNTIMES[mode])} runtime (not {runtime})"


def shape_key(tensors: list) -> tuple:
    return tuple((tuple(t.shape), str(t.dtype)) for t in tensors)


@dataclass
class CapturedShape:
    """One input shape's captured runner. `lock` (shared by a module's shapes) is held from the
    run until the caller has read the output (None where outputs are fresh tensors and runs may
    overlap)."""

    run: Callable[..., Any]
    lock: threading.Lock | None
    capture_seconds: float
    max_abs_difference: float = 0.0  # against the plain module, on the warm-up inputs

    def guard(self) -> contextlib.AbstractContextManager:
        return self.lock if self.lock is not None else contextlib.nullcontext()


def cuda_graph_runner(module: Callable[..., Any], example: list, pool: Any) -> Callable[..., Any]:
    """Records `module` on static copies of `example` (CUDA tensors) into the memory `pool` all
    of a module's graphs share; the runner copies new inputs of the same shapes into them,
    replays and returns the static output."""
    import torch

    static_inputs = [t.clone() for t in example]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(CUDA_GRAPH_WARMUP_RUNS):
            module(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        static_output = module(*static_inputs)

    def run(*tensors):
        for static, tensor in zip(static_inputs, tensors):
            static.copy_(tensor, non_blocking=True)
        graph.replay()
        return static_output

    return run


@dataclass
class ShapeCapture:
    """The captured shapes of one runtime's module, and the plain module for every other shape."""

    module: Callable[..., Any]
    mode: str
    device: str
    shapes: dict[tuple, CapturedShape] = field(default_factory=dict)
    phase: str = "before"  # before warm-up (the precision check runs plain) → capturing (warm-up) → sealed
    uncaptured_runs: int = 0  # runs of a shape warm-up did not capture, once sealed
    compiled: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.mode not in GRAPH_CAPTURES[1:]:
            raise ValueError(f"unknown graph_capture {self.mode!r}: choose from {GRAPH_CAPTURES}")
        if self.mode == "cuda_graphs" and self.device != "cuda":
            raise ValueError(f"graph_capture cuda_graphs needs a CUDA device; this server computes on {self.device} "
                             "(use graph_capture compile, or none)")
        if self.mode == "compile":
            import torch

            self.compiled = torch.compile(self.module, mode="reduce-overhead" if self.device == "cuda" else "default", dynamic=False)
        self.counting = threading.Lock()
        # on a GPU every shape's graph replays into memory one pool shares (the largest shape's
        # activations, not the sum over shapes), so one replay at a time, held until its output
        # has been copied out
        self.replay_lock = threading.Lock()
        self.graph_pool = None
        if self.mode == "cuda_graphs":
            import torch

            self.graph_pool = torch.cuda.graph_pool_handle()

    @property
    def static_outputs(self) -> bool:
        """Whether a run's output is overwritten by the next run (CUDA graphs, torch.compile's too)."""
        return self.device == "cuda"

    def runner(self, tensors: list) -> CapturedShape | None:
        """The captured runner for these inputs' shapes (captured now while warm-up runs), or None:
        the plain module serves them (counted once sealed)."""
        key = shape_key(tensors)
        found = self.shapes.get(key)
        if found is None and self.phase == "capturing":
            found = self.shapes[key] = self.capture(tensors)
        if found is None and self.phase == "sealed":
            with self.counting:
                self.uncaptured_runs += 1
        return found

    def capture(self, tensors: list) -> CapturedShape:
        started = time.perf_counter()
        if self.mode == "cuda_graphs":
            run = cuda_graph_runner(self.module, tensors, self.graph_pool)
        else:
            run = self.compiled
            run(*tensors)  # compiles this shape
        captured = CapturedShape(run, self.replay_lock if self.static_outputs else None, time.perf_counter() - started)
        plain = self.module(*tensors).float()
        with captured.guard():
            difference = (run(*tensors).float() - plain).abs().max().item()
        shapes = [list(t.shape) for t in tensors]
        if not difference < float("inf"):  # NaN or inf: the captured graph is broken for this shape
            raise ValueError(f"graph_capture {self.mode}: the captured graph for input shapes {shapes} gives non-finite outputs")
        spread = (plain.max() - plain.min()).item() or 1.0
        if difference > CAPTURE_MAX_DIFFERENCE * spread:
            raise ValueError(f"graph_capture {self.mode}: the captured graph for input shapes {shapes} differs from the plain module by "
                             f"{difference:.3g}, {difference / spread:.3f} of its output range (at most {CAPTURE_MAX_DIFFERENCE:.3f}): not served")
        captured.max_abs_difference = difference
        return captured

    def seal(self) -> None:
        """Warm-up is over: from now on unseen shapes run the plain module."""
        self.phase = "sealed"

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "shapes": [[list(shape) for shape, _ in key] for key in self.shapes],
            "capture_seconds": round(sum(s.capture_seconds for s in self.shapes.values()), 3),
            "max_abs_difference": max((s.max_abs_difference for s in self.shapes.values()), default=0.0),
            "uncaptured_runs": self.uncaptured_runs,
        }


@contextlib.contextmanager
def capturing(runtime: Any):
    """While warm-up runs `runtime`: every shape it runs is captured (where the runtime captures
    at all); sealed afterwards, whether warm-up finished or failed."""
    capture: ShapeCapture | None = getattr(runtime, "capture", None)
    if capture is not None:
        capture.phase = "capturing"
    try:
        yield
    finally:
        if capture is not None:
            capture.seal()


def capture_report(runtimes: dict[str, Any]) -> dict[str, dict]:
    """graph → its capture's description, for the graphs that capture."""
    return {graph: runtime.capture.describe() for graph, runtime in runtimes.items() if getattr(runtime, "capture", None) is not None}
