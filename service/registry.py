"""The one piece of process state: loaded models, their batchers and the thread pools, held by
the app's lifespan. Loading, warm-up, readiness and draining live here."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load_file as load_numpy

from service.batcher import BatchKey, DynamicBatcher
from service.errors import ApiError
from service.jobs import JobStore
from service.metrics import ServiceMetrics
from service.repository import ModelEntry, scan_repository
from service.runtimes import Runtime, load_runtime, resolve_device
from service.settings import Settings

log = logging.getLogger("ganserve.registry")
NUMPY_DTYPES = {"float32": np.float32, "int64": np.int64}


@dataclass
class LoadedModel:
    entry: ModelEntry
    runtime: Runtime | None = None  # the main graph
    runtimes: dict[str, Runtime] = field(default_factory=dict)  # every graph by name
    latents: dict[str, np.ndarray] = field(default_factory=dict)  # style models: w_avg, direction.<name>
    state: str = "loading"  # loading | ready | failed
    error: str | None = None
    batchers: dict[str, DynamicBatcher] = field(default_factory=dict)
    projection: tuple | None = None  # style models: (eager generator, feature fn), built on first use
    spreads: dict[str, float] = field(default_factory=dict)  # style models: std of w along each direction

    @property
    def ready(self) -> bool:
        return self.state == "ready"


IMAGE_TO_IMAGE = {"translation": "translate", "super_resolution": "upscale"}  # kind → endpoint


def dummy_inputs(entry: ModelEntry, batch: int, graph: str = "model", spatial: int = 0) -> dict[str, np.ndarray]:
    """Zeros of the graph's input shapes: `batch` on axis 0, `spatial` on dynamic image axes."""
    arrays = {}
    for tensor in entry.graph_spec(graph)["inputs"]:
        shape = [(batch if axis == 0 else spatial) if d == -1 else d for axis, d in enumerate(tensor["shape"])]
        arrays[tensor["name"]] = np.zeros(shape, dtype=NUMPY_DTYPES[tensor["datatype"]])
    return arrays


SPREAD_SAMPLES = 2000


def direction_spreads(model: LoadedModel) -> dict[str, float]:
    """Each named direction's spread over the model's own W (`SPREAD_SAMPLES` fixed-seed z through
    the mapping graph): what one unit of an edit strength means when strengths are in σ."""
    import torch

    from models import latent

    inputs = dummy_inputs(model.entry, SPREAD_SAMPLES, "mapping")  # a class input, if any, stays at class 0
    inputs["z"] = np.random.default_rng(0).standard_normal(inputs["z"].shape).astype(np.float32)
    w = torch.from_numpy(model.runtimes["mapping"].run(inputs))
    directions = {key.removeprefix("direction."): torch.from_numpy(value) for key, value in model.latents.items() if key.startswith("direction.")}
    return latent.spreads(w, directions)


def warmup_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, … up to max_batch_size: the shapes the batcher will actually produce first."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = resolve_device(settings.device)
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="compute")  # one device, one stream of batches
        self.encoders = ThreadPoolExecutor(settings.encoder_threads, thread_name_prefix="encode")
        self.models: dict[str, dict[int, LoadedModel]] = {}
        self.jobs = JobStore(settings.max_jobs, settings.max_job_seconds)
        self.ready = False
        self.draining = False

    def discover(self) -> None:
        """Reads the repository's entries (cheap); a missing repository stops start-up with a clear error."""
        for entry in scan_repository(self.settings.repository):
            self.models.setdefault(entry.name, {})[entry.version] = LoadedModel(entry)

    async def load_all(self) -> None:
        loop = asyncio.get_running_loop()
        for versions in self.models.values():
            for model in versions.values():
                try:
                    await loop.run_in_executor(self.compute, self.load_and_warm, model)
                    model.state = "ready"
                except Exception as error:  # one bad entry must not take the others down
                    model.state, model.error = "failed", f"{type(error).__name__}: {error}"
                    log.error("could not load %s v%d: %s", model.entry.name, model.entry.version, model.error)
        self.ready = not self.draining

    def load_and_warm(self, model: LoadedModel) -> None:
        kind = self.settings.runtime_overrides.get(model.entry.name, self.settings.runtime)
        started = time.perf_counter()
        for graph in model.entry.graphs:
            runtime = load_runtime(model.entry, kind, self.device, self.settings.intra_op_threads, graph)
            model.runtimes[graph] = runtime
            if self.settings.warmup:
                for size, spatial in self.warmup_plan(model.entry):
                    runtime.run(dummy_inputs(model.entry, size, graph, spatial))
        model.runtime = model.runtimes["model"]
        if "latents_file" in model.entry.spec:
            model.latents = load_numpy(str(model.entry.path / model.entry.spec["latents_file"]))
        if model.entry.kind == "style":
            model.spreads = direction_spreads(model)
        log.info("loaded %s v%d (%s on %s) in %.2fs", model.entry.name, model.entry.version, kind, model.runtime.device, time.perf_counter() - started)

    def warmup_plan(self, entry: ModelEntry) -> list[tuple[int, int]]:
        """(batch, spatial size) pairs to warm: the batch sizes the batcher produces first, and for
        image-to-image models the tile (upscale) or training size (translate) at small batches
        (a full batch of large tiles would cost seconds of start-up on a CPU)."""
        if entry.kind not in IMAGE_TO_IMAGE:
            return [(size, 0) for size in warmup_sizes(self.settings.max_batch_size)]
        multiple = entry.spec["size_multiple"]
        spatial = self.settings.upscale_tile if entry.kind == "super_resolution" else -(-entry.spec["train_resolution"] // multiple) * multiple
        return [(size, spatial) for size in (1, 2)]

    def versions(self, name: str) -> dict[int, LoadedModel]:
        if name not in self.models:
            raise ApiError(404, f"unknown model {name!r}; GET /v1/models lists the models served")
        return self.models[name]

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        versions = self.versions(name)
        if version is None:
            ready = [v for v, m in versions.items() if m.ready]
            version = max(ready) if ready else max(versions)
        if version not in versions:
            raise ApiError(404, f"model {name!r} has no version {version} (has {sorted(versions)})")
        model = versions[version]
        if not model.ready:
            raise ApiError(503, f"model {name!r} v{version} is {model.state}" + (f": {model.error}" if model.error else ""), headers={"Retry-After": "1"})
        return model

    def batcher(self, model: LoadedModel, operation: str, graph: str = "model") -> DynamicBatcher:
        """The queue of one (model, version, operation); `graph` names the network it runs."""
        if operation not in model.batchers:
            s = self.settings
            key = BatchKey(model.entry.name, model.entry.version, operation)
            model.batchers[operation] = DynamicBatcher(key, model.runtimes[graph].run, self.compute, self.metrics, s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size)
        return model.batchers[operation]

    async def drain(self) -> None:
        """Readiness goes false, accepted work finishes, then the pools stop."""
        self.ready, self.draining = False, True
        await asyncio.gather(*(b.close() for versions in self.models.values() for m in versions.values() for b in m.batchers.values()))
        self.compute.shutdown(wait=True)
        self.jobs.shutdown()
        self.encoders.shutdown(wait=True)
