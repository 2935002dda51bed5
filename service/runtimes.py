"""Runtimes behind one interface: a batch of named numpy inputs in, one numpy array out.

ONNX Runtime is the default (CUDA provider when present, else CPU; on CUDA its images stay on the
device through I/O binding until they are uint8); TorchScript and eager
PyTorch run on CUDA when present, with pinned host memory for the copies, in fp32 or, where the
model's configuration asks and its parity holds (service/precision.py), in bf16 or fp16, and
with graphs captured per warmed shape where it asks for `graph_capture` (service/graph_capture.py).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Protocol

import numpy as np

from service.imaging import tensor_to_uint8, to_uint8
from service.repository import ModelEntry


class OutOfMemory(RuntimeError):
    """The device ran out of memory for this batch: the batcher splits it and retries."""


class Runtime(Protocol):
    name: str
    device: str

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    def run_images(self, inputs: dict[str, np.ndarray], value_range: tuple[float, float]) -> np.ndarray:
        """The graph's images as uint8 [N, H, W, C], converted where they were computed (on the
        GPU for the torch runtimes there: a quarter of the bytes cross to the host)."""
        ...

    keeps_outputs: bool  # whether `run_kept` is there: float outputs left where they were computed

    def run_kept(self, inputs: dict[str, np.ndarray]):
        """The graph's float output as a torch tensor on the device that computed it (a fresh
        one: no later run overwrites it), for work that continues there (tile blending)."""
        ...


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class DeviceUnavailable(ValueError):
    """GANSERVE_DEVICE=cuda where torch sees no CUDA device: ONNX models were served on the CPU
    without a word, and every torch model failed to load."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise DeviceUnavailable("GANSERVE_DEVICE is cuda, but torch finds no CUDA device here (no GPU, no driver, or a CPU build of "
                                "torch): use auto or cpu")
    return device


def has_dynamic_size(entry: ModelEntry, graph: str = "model") -> bool:
    """Whether a graph takes inputs of any height and width (image-to-image), not only any batch."""
    return any(-1 in tensor["shape"][1:] for tensor in entry.graph_spec(graph)["inputs"])


class OnnxRuntime:
    name = "onnx"
    capture = None  # ONNX Runtime captures nothing here (service/graph_capture.py is for the torch runtimes)

    def __init__(self, entry: ModelEntry, device: str, threads: int, graph: str = "model", io_binding: bool | None = None) -> None:
        """`io_binding`: images through `run_with_iobinding` (default: on CUDA only; the CPU
        tests turn it on to prove the path the GPU takes)."""
        from models.onnx_runtime import onnx_runtime

        ort = onnx_runtime()

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # spinning threads burn the cores the HTTP loop and the encoders need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
        dynamic = has_dynamic_size(entry, graph)
        # an upscale graph is served one tile shape only (service/tiling.py), so an arena holds
        # what warm-up's two-tile batch needs, and tiles skip faulting their activations in afresh
        # every run (0.20 against 0.23-0.29 s a 96² tile of sr-rrdb-x4 on two threads); larger
        # tile batches run in chunks of two in it (`run_in_chunks`), any other shape gives it back
        tiles = dynamic and entry.kind == "super_resolution"
        if dynamic and not tiles:
            # every upload has its own size: an arena would keep the largest one's activations
            # for good (a 4096² translate left 7 GB resident)
            options.enable_cpu_mem_arena = False
        if dynamic or self.device == "cpu":
            # a memory pattern plans each shape's activations into one block, allocated beside the
            # arena's own chunks: a 1024² generator's arena then held twice a batch's activations
            # (1,101 against 590 MB at 4 images), at no speed gained on any shipped model
            options.enable_mem_pattern = False
        self.session = ort.InferenceSession(str(entry.file_for("onnx", graph)), options, providers=providers)
        self.arena = ArenaKeeper(ort) if options.enable_cpu_mem_arena and self.device == "cpu" else None
        output_spec = entry.graph_spec(graph)["outputs"][0]  # fixed but for the batch, or an upscale's sides
        self.output_shape, self.output_dtype = output_spec["shape"], np.dtype(output_spec["datatype"])
        self.output_scale = entry.spec["scale"] if tiles else None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.keeps_outputs = self.io_binding

    def run_images(self, inputs: dict[str, np.ndarray], value_range: tuple[float, float]) -> np.ndarray:
        """With I/O binding the output is left where it was computed (ONNX Runtime allocates it on
        the device) and converted there, through DLPack into torch: only uint8 crosses to the host,
        and the host is spared the float conversion (14 ms of one core for a 1024² frame). Without
        it, ONNX Runtime hands back host floats, converted on the lane's thread."""
        if not self.io_binding:
            return to_uint8(self.run(inputs), value_range)
        return self.bound(inputs, lambda output: tensor_to_uint8(output, value_range))

    def run_kept(self, inputs: dict[str, np.ndarray]):
        return self.bound(inputs, lambda output: output.clone())

    def bound(self, inputs: dict[str, np.ndarray], finish):
        """One run through I/O binding: `finish` gets the output as a torch view of ONNX Runtime's
        device memory (DLPack), valid until the binding goes, and returns what outlives it."""
        import torch

        binding = self.session.io_binding()
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(inputs[name]))  # copied to the device by ORT
        binding.bind_output(self.output_name, self.device)
        with translated_oom():
            self.session.run_with_iobinding(binding)  # returns once the device is done with it (ORT synchronises its stream)
        output = binding.get_outputs()[0]  # owned by `binding`, which outlives `finish`
        return finish(torch.from_dlpack(output))

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {name: inputs[name] for name in self.input_names}
        if self.arena is None:
            with translated_oom():
                return self.session.run(None, feeds)[0]
        shape = feeds[self.input_names[0]].shape
        if self.output_scale is not None and self.arena.splits(shape):
            return self.run_in_chunks(feeds, self.arena.kept_batch)
        with self.arena.turn(shape) as run_options, translated_oom():
            return self.run_into_own_array(feeds, run_options)

    def run_in_chunks(self, feeds: dict[str, np.ndarray], chunk: int) -> np.ndarray:
        """A tile batch larger than warm-up's, run `chunk` tiles at a time in the arena warm-up
        left, each chunk's output written in place into the batch's. The arena would otherwise
        keep the batcher's largest batch: 1,250 MiB for the 64 tiles a tiny x4 model's batch
        holds (~19 MiB a tile), where two tiles keep 52; and on a CPU a tile costs the same in a
        batch of 2 as of 4 (0.202 / 0.214 s, sr-rrdb-x4, docs/benchmarks.md)."""
        batch = len(feeds[self.input_names[0]])
        output = np.empty(self.output_shape_for(feeds[self.input_names[0]].shape), self.output_dtype)
        for start in range(0, batch, chunk):
            part = {name: array[start:start + chunk] for name, array in feeds.items()}
            with self.arena.turn(part[self.input_names[0]].shape) as run_options, translated_oom():
                self.run_into_own_array(part, run_options, output[start:start + chunk])
        return output

    def output_shape_for(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output's shape for an input's: the spec's but for the batch, and an upscale's sides
        scaled from the input's."""
        batch = input_shape[0]
        if self.output_scale is None:
            return (batch, *self.output_shape[1:])
        return (batch, self.output_shape[1], input_shape[2] * self.output_scale, input_shape[3] * self.output_scale)

    def run_into_own_array(self, feeds: dict[str, np.ndarray], run_options, output: np.ndarray | None = None) -> np.ndarray:
        """One run whose output is written into an array of ours, not the arena's. `session.run`
        hands back the output in the arena's memory, so outputs a request still holds (a 100-image
        answer's rows until it is written) make the arena grow past them, and it keeps that for good:
        +1.3 GB idle after one such answer of a 1024² generator."""
        if output is None:
            output = np.empty(self.output_shape_for(feeds[self.input_names[0]].shape), self.output_dtype)
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        binding.bind_output(self.output_name, "cpu", 0, output.dtype, list(output.shape), output.ctypes.data)
        self.session.run_with_iobinding(binding, run_options)
        return output


class ArenaKeeper:
    """Bounds what ONNX Runtime's host arena keeps to what warm-up left in it.

    The arena keeps the largest batch's activations after the batch is done (fast: fresh pages
    cost a 1024² generator 50–80 % more a forward without it). Warm-up runs the largest batch the
    batcher forms, and the memory budget's resident baseline is read after warm-up, so what the
    arena keeps from then on is counted, as long as it does not grow. It grows under a batch
    larger than warm-up's (the fit may have been relaxed since) or a batch beside another on the
    same session (`lane_threads` > 1), or an item of another shape than warm-up's (an upscale
    graph is kept at its tile, and v2 infer may send it any size): those runs ask the arena to give
    back, at their end, its free regions (`memory.enable_memory_arena_shrinkage`; measured: all of
    them, so the next batch faults its activations in once more and the arena holds them again).
    Before this, three 100-image answers of a 1024² generator left 2.2 GB resident outside the
    budget (docs/benchmarks.md, "The host arena")."""

    def __init__(self, ort) -> None:
        self.warming = False
        self.kept_batch = 0  # the largest batch warm-up ran (0: none, so every run gives back)
        self.kept_item: tuple[int, ...] | None = None  # the shape of one item warm-up ran (the last, where it ran several)
        self.in_flight = 0
        self.shrinks = 0  # runs that gave back what they added (for tests and logs)
        # what warm-up's largest batch left in the arena, as its cost counts it (set once measured),
        # and whether the arena holds it now: a run that gave back emptied it, a run at warm-up's
        # largest batch fills it again. The resident baseline counts it as held either way
        # (`missing_bytes`), since tile batches reserve no room for it (`GraphCost.in_arena`)
        self.kept_bytes = 0
        self.holds = False
        self.lock = threading.Lock()
        self.giving_back = ort.RunOptions()
        self.giving_back.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @contextlib.contextmanager
    def warm(self):
        """While warm-up runs: every batch is kept, and the largest becomes the bound."""
        self.warming = True
        try:
            yield
        finally:
            self.warming = False

    def splits(self, shape: tuple[int, ...]) -> bool:
        """Whether a batch of warm-up's item shape, larger than warm-up's largest, is run in chunks
        of that (`OnnxRuntime.run_in_chunks`: tile graphs) rather than given back after."""
        return not self.warming and self.kept_batch > 0 and tuple(shape[1:]) == self.kept_item and shape[0] > self.kept_batch

    @contextlib.contextmanager
    def turn(self, shape: tuple[int, ...]):
        """The run options for one run of an input of `shape` (batch first)."""
        batch, item = shape[0], tuple(shape[1:])
        with self.lock:
            self.in_flight += 1
            if self.warming:
                self.kept_batch = max(self.kept_batch, batch) if item == self.kept_item else batch
                self.kept_item = item
            keeps = self.warming or (batch <= self.kept_batch and item == self.kept_item and self.in_flight == 1)
            if not keeps:
                self.shrinks += 1
        try:
            yield None if keeps else self.giving_back
        finally:
            with self.lock:
                self.in_flight -= 1
                if not keeps:
                    self.holds = False
                elif self.warming or batch == self.kept_batch:
                    self.holds = True

    def missing_bytes(self) -> int:
        """What the arena would add to the process's memory to hold warm-up's batch again."""
        return 0 if self.holds else self.kept_bytes


@contextlib.contextmanager
def warming(runtime: Any):
    """While warm-up runs `runtime`: the batches it runs are those its arena may keep."""
    arena: ArenaKeeper | None = getattr(runtime, "arena", None)
    with arena.warm() if arena is not None else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def translated_oom():
    """ONNX Runtime's out-of-memory (its own RuntimeException type) as `OutOfMemory`."""
    try:
        yield
    except Exception as error:
        if "Failed to allocate memory" in str(error) or "out of memory" in str(error).lower():
            raise OutOfMemory(str(error)) from error
        raise


class TorchRuntime:
    """TorchScript (`model.pt`) or eager (rebuilt from the spec + `model.safetensors`; a style
    model's graphs are its `synthesis` and `mapping` sub-networks)."""

    def __init__(self, entry: ModelEntry, device: str, threads: int, eager: bool, graph: str = "model", precision: str = "fp32",
                 graph_capture: str = "none") -> None:
        import torch

        from service.graph_capture import ShapeCapture

        from service.precision import torch_dtype

        torch.set_num_threads(threads)
        self.torch = torch
        self.name = "eager" if eager else "torchscript"
        self.device = device
        self.dtype = torch_dtype(precision)  # weights and float inputs; outputs come back as float32
        if eager:
            from safetensors.torch import load_file

            from models.spec import ModelSpec
            from models.zoo import build_generator, build_translator

            image_to_image = entry.kind in ("translation", "super_resolution")
            weights = load_file(str(entry.file_for("eager")))
            module = build_translator(entry.spec["model"], weights) if image_to_image else build_generator(ModelSpec.from_dict(entry.spec["model"]))
            module.load_state_dict(weights)
            if entry.kind == "style":
                module = module.synthesis if graph == "model" else module.mapping
        else:
            module = torch.jit.load(str(entry.file_for("torchscript", graph)), map_location="cpu")
        self.module = module.eval().to(device=device, dtype=self.dtype)
        self.input_names = [i["name"] for i in entry.graph_spec(graph)["inputs"]]
        # shapes captured while warm-up runs, then sealed by the registry (service/graph_capture.py)
        self.capture = ShapeCapture(self.module, graph_capture, device) if graph_capture != "none" else None

    keeps_outputs = True

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.forward(inputs, lambda out: out.float().cpu().numpy())

    def run_kept(self, inputs: dict[str, np.ndarray]):
        return self.forward(inputs, lambda out: out.float().clone())  # a captured graph's static output is overwritten by its next run

    def run_images(self, inputs: dict[str, np.ndarray], value_range: tuple[float, float]) -> np.ndarray:
        return self.forward(inputs, lambda out: tensor_to_uint8(out, value_range))

    def forward(self, inputs: dict[str, np.ndarray], finish):
        torch = self.torch
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in self.input_names]
        try:
            with torch.inference_mode():
                if self.device == "cuda":
                    tensors = [t.pin_memory().to("cuda", non_blocking=True) for t in tensors]
                if self.dtype != torch.float32:
                    tensors = [t.to(self.dtype) if t.is_floating_point() else t for t in tensors]
                captured = self.capture.runner(tensors) if self.capture is not None else None
                if captured is None:
                    return finish(self.module(*tensors))
                with captured.guard():  # a static output is read before the next run overwrites it
                    return finish(captured.run(*tensors))
        except torch.cuda.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            raise OutOfMemory(str(error)) from error


def load_runtime(entry: ModelEntry, kind: str, device: str, threads: int, graph: str = "model", precision: str = "fp32",
                 graph_capture: str = "none") -> Runtime:
    from service.graph_capture import capture_refusal

    if refusal := capture_refusal(graph_capture, kind):
        raise ValueError(refusal)
    if kind == "onnx":
        if precision != "fp32":
            raise ValueError(f"the onnx runtime serves fp32 only; {precision} is served by the torchscript and eager runtimes")
        return OnnxRuntime(entry, device, threads, graph)
    if kind in ("torchscript", "eager"):
        return TorchRuntime(entry, device, threads, eager=kind == "eager", graph=graph, precision=precision, graph_capture=graph_capture)
    raise ValueError(f"unknown runtime {kind!r}")
