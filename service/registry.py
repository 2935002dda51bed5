"""The one piece of process state: loaded models, their lanes and batchers, the memory budget and
the encoder pool, held by the app's lifespan. Loading, warm-up (with cost measurement),
readiness and draining live here."""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load_file as load_numpy

from service import memory
from service.admission import ModelLimits, derive_limits, request_memory_bytes
from service.batcher import BatchKey, DynamicBatcher, ShuttingDown
from service.costs import MEMORY_MARGIN, CostProbe, GraphCost, measure_cost
from service.encoder_backlog import EncoderBacklog
from service.encoders import PILLOW_ONLY, EncoderTable, measure_encoders
from service.errors import ApiError
from service.graph_capture import capture_report, capturing
from service.jobs import JobStore
from service.host_load import OtherLoad, sibling_cpu_seconds
from service.lanes import Lane, LaneView, SharedDevice, lane_share
from service.metrics import ServiceMetrics
from service.model_config import ServingConfig, serving_config
from service.precision import HALF_PRECISIONS, PARITY_BATCH, PrecisionParity, half_candidates, measure_parity, parity_inputs
from service.repository import ModelEntry, scan_repository
from service.runtimes import Runtime, has_dynamic_size, load_runtime, resolve_device, warming
from service.settings import Settings
from service.stream_slots import NoStreamSlot, stream_slots_for
from service.version_policy import selected_versions

log = logging.getLogger("ganserve.registry")
NUMPY_DTYPES = {"float32": np.float32, "int64": np.int64}
STUCK_WAIT_POLL_S = 0.25  # how often a release waiting for a lane asks whether it is stuck


@dataclass(frozen=True)
class ServedFit:
    """How a version was served, and its cost fits (`ModelRegistry.keep_faster_fits`): equal for
    two versions of the same network served the same way, whatever their fits (`costs` is left
    out of the comparison). Kept past an unload, runtimes and all else released."""
    spec: dict
    config: ServingConfig | None
    precision: str
    runtime: tuple[str, str] | None
    costs: dict[str, GraphCost] = field(compare=False)

    @classmethod
    def of(cls, model: LoadedModel) -> ServedFit:
        runtime = (model.runtime.name, model.runtime.device) if model.runtime is not None else None
        return cls(model.entry.spec, model.config, model.served_precision, runtime, dict(model.costs))


@dataclass
class LoadedModel:
    entry: ModelEntry
    runtime: Runtime | None = None  # the main graph
    runtimes: dict[str, Runtime] = field(default_factory=dict)  # every graph by name
    latents: dict[str, np.ndarray] = field(default_factory=dict)  # style models: w_avg, direction.<name>
    state: str = "loading"  # loading | ready | failed | unloaded (by the repository extension) | replaced (by a reload)
    error: str | None = None
    config: ServingConfig | None = None
    lane: Lane | None = None
    costs: dict[str, GraphCost] = field(default_factory=dict)  # per graph, measured at warm-up
    probes: dict[str, CostProbe] = field(default_factory=dict)  # per graph: how to time it again (service/remeasure.py)
    limits: ModelLimits | None = None
    batchers: dict[str, DynamicBatcher] = field(default_factory=dict)
    projection_bytes: int | None = None  # style models: a projection job's memory (service/projection.py), counted on first use
    projection_step_s: float | None = None  # style models: the fastest seconds a projection step took in this version's jobs
    spreads: dict[str, float] = field(default_factory=dict)  # style models: std of w along each direction
    parity: PrecisionParity | None = None  # half precision: its measured distance from fp32
    precision_rejected: list[PrecisionParity] = field(default_factory=list)  # `auto`: half precisions tried that missed the bound
    mirrored_capture: dict[str, dict] = field(default_factory=dict)  # a front's copy of the engine's capture report
    resident_bytes: int = 0  # what loading it added to the process's RSS, which retiring it should give back
    failed_beside_served: bool = False  # failed in a (re)load while its model kept serving a ready version

    @property
    def served_precision(self) -> str:
        return self.parity.precision if self.parity is not None else "fp32"

    @property
    def capture(self) -> dict[str, dict]:
        """graph → its captured shapes (service/graph_capture.py), for the graphs that capture."""
        return capture_report(self.runtimes) if self.runtimes else self.mirrored_capture

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def tiles_as_pixels(self) -> bool:
        """Upscale tiles that meet without overlap have no seam to blend: each tile's output is
        converted to uint8 where it was computed (on the GPU only uint8 crosses to the host) and
        placed into the image as it is (service/upscaling.py)."""
        return self.config is not None and self.config.upscale_overlap == 0

    def outputs_pixels(self, operation: str) -> bool:
        """Whether `operation`'s batches come back as uint8 images [N, H, W, C] (converted by the
        runtime where they were computed) rather than the graph's float tensor."""
        return operation in IMAGE_OPERATIONS or (operation == "upscale" and self.tiles_as_pixels)

    def keeps_tiles(self, runtime: Runtime) -> bool:
        """Whether overlapping upscale tiles come back as tensors where they were computed, to be
        blended there (service/tiling.py): where the runtime can keep its outputs (the torch
        runtimes; ONNX Runtime through I/O binding on CUDA). Tiles are always assembled in the
        process that computed them (a `--workers` engine too: service/engine.py)."""
        return not self.tiles_as_pixels and runtime.keeps_outputs


def specialises_on_shapes(runtime: Runtime) -> bool:
    """Runtimes that prepare per input shape, so that the first batch of a new shape is slow:
    captured graphs anywhere, and every runtime on CUDA (TorchScript's profiling executor
    re-optimises, cuDNN picks algorithms, ONNX Runtime's CUDA provider searches convolution
    algorithms and plans its arena). Their warm-up runs every batch size the batcher may form, each
    several times, and batches are padded to those sizes, so no request pays the preparation."""
    return getattr(runtime, "capture", None) is not None or runtime.device == "cuda"


IMAGE_TO_IMAGE = {"translation": "translate", "super_resolution": "upscale"}  # kind → endpoint
# operations whose outputs only ever become images: converted to uint8 by the runtime, where they
# were computed (translate outputs are cropped or resized, and overlapping upscale tiles blended,
# in float first; v2 infer answers the float tensor)
IMAGE_OPERATIONS = ("generate", "synthesis")
TRITON_STATES = {"ready": "READY", "loading": "LOADING", "failed": "UNAVAILABLE", "unloaded": "UNAVAILABLE", "replaced": "UNLOADING"}


def dummy_inputs(entry: ModelEntry, batch: int, graph: str = "model", spatial: int = 0) -> dict[str, np.ndarray]:
    """Zeros of the graph's input shapes: `batch` on axis 0, `spatial` on dynamic image axes;
    BigGAN's truncation statistics are those of its default truncation (zeros would divide by √eps)."""
    arrays = {}
    for tensor in entry.graph_spec(graph)["inputs"]:
        shape = [(batch if axis == 0 else spatial) if d == -1 else d for axis, d in enumerate(tensor["shape"])]
        arrays[tensor["name"]] = np.zeros(shape, dtype=NUMPY_DTYPES[tensor["datatype"]])
    if "truncation_stats" in arrays:
        from models.biggan import truncation_stats_weights

        block = entry.spec["truncation"]
        arrays["truncation_stats"][:] = np.array(truncation_stats_weights(block["default"], block["n_stats"]), dtype=np.float32)
    return arrays


SPREAD_SAMPLES = 2000
# a translate graph is also timed at an input this wide: the cost per pixel grows with the size
# (cyclegan-thin2thick here: 0.42 µs a pixel fitted between 64² and 128², 0.66 µs at 1024²), and
# a fit between small shapes admitted 1024² translates at two thirds of what they took
TRANSLATE_WARMUP_LARGE_SIDE = 512
# A whole image through an upscale graph (v2 infer; the upscale route cuts tiles) ran slower per pixel than warm-up's
# tiles, the more so the larger (sr-rrdb-x4, ONNX Runtime on two CPU threads, docs/benchmarks.md): 1.12x at 4 tiles'
# pixels, 1.16-1.23x at 9-44, 1.36x at 72 in one measurement; 1.03-1.06x up to 22, 1.30x at 44, 1.56x at 72 in another.
# The prior for a size no batch has shown yet (`GraphCost.size_factor`): (pixels / tile's) ** (this - 1) more per
# pixel, 1.10 / 1.17-1.30 / 1.35x. On a CPU only: a GPU was not measured.
WHOLE_IMAGE_EXPONENT_CPU = 1.07
LIMITS_MEMORY_STEP = 0.02  # the limits follow what a request may hold when it moves by more than this share


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


def relative_message(error: BaseException, settings: Settings) -> str:
    """An error's text with the repository's absolute path taken out (clients see this)."""
    text = f"{type(error).__name__}: {error}"
    for root in {str(settings.repository.resolve()), str(settings.repository)}:
        text = text.replace(root.rstrip("/") + "/", "").replace(root, "<repository>")
    return text


def memory_budget_for(settings: Settings) -> memory.MemoryBudget:
    """This process's budget, or under `--workers N` the server's, shared with its other processes
    through the table the supervisor made (service/workers.py)."""
    if settings.role != "single" and settings.engine_dir is not None:
        table = memory.SharedBudgetTable(settings.engine_dir / memory.SHARED_BUDGET_FILE)
        return memory.SharedMemoryBudget(table, settings.worker_slot, settings.memory_budget, memory.rss_bytes())
    return memory.MemoryBudget(settings.memory_budget, memory.rss_bytes())


def kept_on_failed_reload(fresh: dict[int, LoadedModel], served: dict[int, LoadedModel]) -> dict[int, LoadedModel]:
    """The versions a (re)load serves: the fresh ones, except that a reload never takes down what
    it fails to replace (Triton's rule, whose repository extension `load` implements). A version
    that failed to load again keeps its served copy; and where no fresh version is ready, the
    served ready versions stay, beside the failed ones. A spec.json with a typo, or files caught
    half-copied by the repository poll, took a healthy model down, and the server's readiness
    with it. The kept copies say why in their `error`."""
    def keep(before: LoadedModel, why: str | None) -> None:
        before.error = f"the reload failed ({why}); serving the version loaded before"

    serving = dict(fresh)
    for version, model in fresh.items():
        if not model.ready and (before := served.get(version)) is not None and before.ready:
            serving[version] = before
            keep(before, model.error)
    if not any(model.ready for model in serving.values()):
        failed = "; ".join(f"v{v}: {m.error}" for v, m in sorted(fresh.items()) if not m.ready)
        for version, before in served.items():
            if before.ready:
                serving[version] = before
                keep(before, failed)
    return serving


def torch_job_share() -> float:
    """The share of the cores a job computing with torch asks for: its intra-op threads (the
    process's setting, which a torch runtime sets to its own) over the cores."""
    import torch

    return lane_share("cpu", torch.get_num_threads())


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = resolve_device(settings.device)
        self.shared_device = SharedDevice()  # the cores (or GPU) every model's lane computes on
        if settings.count_other_processes and self.device == "cpu":  # beside other processes' work on the cores
            helpers = functools.partial(sibling_cpu_seconds, os.getppid(), os.getpid()) if settings.role == "engine" else None
            self.shared_device.other_load = OtherLoad(own_demand=self.shared_device.asked_core_seconds, helpers=helpers)
        self.encoders = ThreadPoolExecutor(settings.encoder_threads, thread_name_prefix="encode")
        self.encoding = EncoderBacklog(settings.encoder_threads)  # what admission has queued for `encoders` (service/encoder_backlog.py)
        self.memory = memory_budget_for(settings)
        self.limits_request_memory = self.request_memory_bytes()  # what the listed limits let one request hold
        self.models: dict[str, dict[int, LoadedModel]] = {}
        # a projection job computes on the CPU on torch's intra-op threads: beside the lanes only where they compute there too
        self.jobs = JobStore(settings.max_jobs, settings.max_job_seconds, self.memory, device=self.shared_device if self.device == "cpu" else None,
                             job_share=torch_job_share, booked_lanes=self.booked_lanes)
        self.loaded_event = asyncio.Event()  # set once every entry has been tried
        self.retiring: list[LoadedModel] = []  # versions finishing their accepted work after a reload or unload
        self.releasing: set[asyncio.Task] = set()  # those releases (and a drain's), held so they are not collected
        self.unloaded_fits: dict[tuple[str, int], ServedFit] = {}  # (name, version) → how it was served when last unloaded
        self.draining = False
        # upscale streams (service/streams.py) hold slots 1 … the limit, the server's under --workers (service/stream_slots.py)
        self.stream_slots = stream_slots_for(settings.max_streams, settings.max_connections,
                                             settings.engine_dir if settings.role == "front" else None, settings.worker_slot)
        self.repository_lock = asyncio.Lock()  # load/unload one model at a time
        self.control_waiting = 0  # model-control requests waiting for it (bounded: service/routes/repository.py)
        self.on_models_changed: list[Callable[[], None]] = []  # called once a load or unload has changed what is served
        self.encoder_table: EncoderTable = PILLOW_ONLY  # measured once the models are loaded
        self.memory_settled_at_rest = True  # False while the resident figure was read beside reserved work (`settle_memory`)
        self.resident_bounds = (0, 0)  # (at least, at most) what the process holds resident apart from admitted work

    def take_stream_slot(self, owner: str) -> int:
        """The lowest free stream slot, for the client at address `owner` (`StreamSlots.take`): 503 past the limit or its share."""
        try:
            return self.stream_slots.take(owner)
        except NoStreamSlot as refused:
            raise ApiError(503, str(refused), headers={"Retry-After": "5"}) from None

    def free_stream_slot(self, slot: int) -> None:
        self.stream_slots.free(slot)

    @property
    def loaded(self) -> bool:
        """Every entry has been tried (loaded and warmed, or failed)."""
        return self.loaded_event.is_set()

    def served_entries(self, name: str | None = None, entries: list[ModelEntry] | None = None) -> list[ModelEntry]:
        """The repository's entries (of one model, or all) that the version policy selects, from
        `entries` when the caller has scanned already."""
        entries = [e for e in (entries if entries is not None else scan_repository(self.settings.repository)) if name is None or e.name == name]
        if self.settings.models:
            entries = [e for e in entries if e.name in self.settings.models]
        by_name: dict[str, list[int]] = {}
        for entry in entries:
            by_name.setdefault(entry.name, []).append(entry.version)
        chosen = {n: selected_versions(self.settings.policy_for(n), versions) for n, versions in by_name.items()}
        return [e for e in entries if e.version in chosen[e.name]]

    def discover(self) -> None:
        """Reads the repository's entries (cheap); a missing repository stops start-up with a clear
        error, a broken entry is `failed` with its reason."""
        for entry in self.served_entries():
            model = LoadedModel(entry)
            if entry.problem:
                model.state, model.error = "failed", entry.problem
                log.error("cannot serve %s: %s", entry.label, entry.problem)
            self.models.setdefault(entry.name, {})[entry.version] = model
        if missing := self.missing_models():
            held = sorted({entry.name for entry in scan_repository(self.settings.repository)})
            log.error("GANSERVE_MODELS or GANSERVE_READY_REQUIRES names %s, which the server does not serve (%s holds %s%s): it is "
                      "not ready until they are there and loaded", missing, self.settings.repository, held,
                      f"; GANSERVE_MODELS serves {self.settings.models}" if self.settings.models else "")

    def missing_models(self) -> list[str]:
        """The names GANSERVE_MODELS or GANSERVE_READY_REQUIRES asks for that no served model
        answers to: with a typo in the first the server served nothing and said it was ready
        (every model it had was); in the second it stayed unready for good, and nothing said why."""
        return [name for name in dict.fromkeys(self.settings.models + self.settings.ready_names) if name not in self.models]

    def stuck_lanes(self) -> dict[str, float]:
        """`model/version` → seconds, for each lane whose one batch (or idle re-timing) has run
        past `Settings.stuck_after_s`: a wedged runtime, driver or device. Nothing but a restart
        frees its thread; before, /health/live said live and every request to the model waited out
        its deadline for a 504, for good."""
        return {model.entry.label: round(running, 1) for model in self.watched_models()
                if model.lane is not None and (running := model.lane.running_for()) > self.stuck_limit_s(model)}

    def stuck_limit_s(self, model: LoadedModel) -> float:
        """`Settings.stuck_after_s`, times the lane's threads where it is the default: a request's
        compute limit grows with them, and one item (a translate's image) runs on one thread."""
        threads = model.config.lane_threads if model.config is not None and self.settings.stuck_compute_s is None else 1
        return self.settings.stuck_after_s * threads

    def watched_models(self) -> list[LoadedModel]:
        """The served versions and those being retired: a version replaced by a reload while its
        lane was stuck left the served ones, and the server said live again."""
        return [*self.all_models(), *self.retiring]

    def booked_lanes(self) -> list[LaneView]:
        """Every lane whose requests hold bookings (retiring versions' too), for the jobs' thread:
        the dicts are copied in single C calls (under the GIL) while the event loop may change them."""
        versions = [tuple(served.values()) for served in tuple(self.models.values())]
        return [model.lane for model in (*(m for served in versions for m in served), *tuple(self.retiring)) if model.lane is not None]

    def longest_running_batch_s(self) -> float:
        """How long the longest batch computing now (any model's lane) has run."""
        return max((model.lane.running_for() for model in self.watched_models() if model.lane is not None), default=0.0)

    async def load_all(self) -> None:
        """Loads and warms the entries one at a time (each on its own lane), so each one's memory
        is measured with nothing else computing."""
        # the encoders first, while nothing else computes (and so that readiness follows the last model at once)
        self.encoder_table = await asyncio.get_running_loop().run_in_executor(None, measure_encoders, self.settings.encoder_threads)
        log.info("encoders: %s", self.encoder_table.describe())
        for versions in self.models.values():
            for model in versions.values():
                await self.load_one(model)
        self.settle_memory()
        self.loaded_event.set()

    async def load_one(self, model: LoadedModel) -> None:
        if model.state == "failed":
            return
        try:
            model.config = serving_config(model.entry, self.settings)
            model.lane = Lane(model.entry.label, model.config.lane_threads, self.shared_device,
                              lane_share(self.device, self.settings.intra_op_threads))
            memory.trim()
            before = memory.rss_bytes()
            await model.lane.run(self.load_and_warm, model, watched=False)
            memory.trim()
            model.resident_bytes = max(0, memory.rss_bytes() - before)
            model.limits = derive_limits(model, self.settings, self.request_memory_bytes())
            model.state = "ready"
        except Exception as error:  # one bad entry must not take the others down
            model.state, model.error = "failed", relative_message(error, self.settings)
            log.error("could not load %s: %s", model.entry.label, model.error)
            if model.lane is not None:  # its threads, which nothing will use
                model.lane.shutdown(wait=False)

    def resident_reading(self) -> tuple[int, int]:
        """(at least, at most) what the process holds resident apart from admitted work, read now:
        RSS holds their memory too, up to what they reserved (reservations are peaks)."""
        reserved = self.memory.used
        rss = memory.rss_bytes() + self.arenas_missing_bytes()
        return max(0, rss - max(reserved, self.memory.used)), rss

    def arenas_missing_bytes(self) -> int:
        """What the tile arenas that tile batches reserve no room for (`GraphCost.in_arena`) would
        add to hold warm-up's batch again, where a run of another size emptied them: counted
        resident, as if held, so that the next tile batch's refill is inside the baseline."""
        return sum(arena.missing_bytes() for model in self.all_models() for runtime in model.runtimes.values()
                   if (arena := getattr(runtime, "arena", None)) is not None)

    def settle_memory(self) -> None:
        """What is left of the budget for requests once the models are resident; the loaded
        objects are moved out of the garbage collector's sight (memory.freeze_resident_objects).

        A load or unload can run beside admitted work (model control, the repository poll), and
        RSS then holds some of its memory, which its reservations already count: taken whole for
        resident, it shrank the budget until the next load (a hostile probe: 1,486 → 1,029 MiB left
        for requests after a reload beside one 272² upscale, and the same upscale 413, "retrying
        cannot help", on the idle server 45 s later); RSS less every reservation admitted past the
        budget under steady traffic (reservations are peaks not yet reached: 416 MiB reserved of a
        368 MiB budget, a second probe). So the budget counts the most the process may hold
        resident, says by how much that may over-count (`MemoryBudget.unsure`: a refusal within it
        is a 503 to retry, not a 413), narrows both every second (`tighten_resident`) and reads
        it exactly at the first moment nothing is reserved."""
        memory.freeze_resident_objects()
        self.read_resident()
        self.derive_all_limits()
        log.info("memory: %.0f MiB resident after loading; %.0f MiB of the %.0f MiB budget left for requests",
                 self.memory.resident / 2**20, self.memory.capacity / 2**20, self.settings.memory_budget / 2**20)
        if self.memory.capacity == 0:
            log.error("the loaded models hold the whole memory budget (GANSERVE_MEMORY_BUDGET, %.0f MiB): no request can be "
                      "served, so the server answers unready; raise the budget or serve fewer models", self.settings.memory_budget / 2**20)

    def read_resident(self) -> None:
        """The resident figure and its doubt from one reading, free heap pages handed back first."""
        memory.trim()
        self.resident_bounds = self.resident_reading()
        low, high = self.resident_bounds
        self.memory_settled_at_rest = low == high
        self.memory.set_resident(high, unsure=high - low)

    def tighten_resident(self) -> None:
        """Where the resident figure was read beside admitted work: read again once nothing is
        reserved (exact), else narrowed by this reading (each RSS is an upper bound, each RSS less
        what is reserved a lower one; a reading outside the bounds means what is resident moved,
        and starts them again). Not while a load runs: it settles when it ends."""
        if self.memory_settled_at_rest or self.repository_lock.locked():
            return
        if self.memory.used == 0:  # (the load froze what it left; a full collection again held the loop ~90 ms)
            self.read_resident()
            log.info("memory: read again at rest, %.0f MiB of the budget left for requests", self.memory.capacity / 2**20)
            return
        low, high = self.resident_reading()
        known_low, known_high = self.resident_bounds
        if known_low <= high and low <= known_high:
            low, high = max(low, known_low), min(high, known_high)
        self.resident_bounds = (low, high)
        self.memory.set_resident(high, unsure=high - low)

    async def keep_resident_figure_current(self, interval_s: float = 1.0) -> None:
        """`tighten_resident` every `interval_s` (the app's lifespan runs it where models load),
        and the limits derived again where what a request may hold moved by more than
        LIMITS_MEMORY_STEP (a `--workers` front that starts or is replaced after the models
        loaded holds part of the budget too)."""
        while True:
            await asyncio.sleep(interval_s)
            self.tighten_resident()
            if abs(self.request_memory_bytes() - self.limits_request_memory) > LIMITS_MEMORY_STEP * self.limits_request_memory:
                self.derive_all_limits()

    def request_memory_bytes(self) -> int:
        return request_memory_bytes(self.settings.memory_budget, self.memory.capacity)

    def derive_all_limits(self) -> None:
        """Every ready model's limits from its costs and what one request may hold now."""
        self.limits_request_memory = self.request_memory_bytes()
        for model in self.all_models():
            if model.ready and model.costs:
                model.limits = derive_limits(model, self.settings, self.limits_request_memory)

    async def load_model(self, name: str) -> dict[int, LoadedModel]:
        """(Re)reads one model's versions from the repository and loads them beside the ones being
        served; traffic moves when they are ready, then the replaced ones drain their queues and are
        unloaded. The repository extension's `load` (one at a time: `repository_lock`)."""
        async with self.repository_lock:
            entries = await asyncio.to_thread(self.served_entries, name)  # the disk, off the event loop
            if not entries:
                raise ApiError(404, f"no model {name[:100]!r} in the repository (or none of its versions is selected by its version policy)")
            fresh: dict[int, LoadedModel] = {}
            for entry in entries:
                model = LoadedModel(entry)
                if entry.problem:
                    model.state, model.error = "failed", entry.problem
                fresh[entry.version] = model
                await self.load_one(model)
                self.keep_faster_fits(model, self.served_fit(name, entry.version))
            served = self.models.get(name, {})
            serving = kept_on_failed_reload(fresh, served)
            if (refusal := self.budget_refusal(served, serving)) is not None:
                log.error("cannot load %s: %s", name, refusal)
                for model in fresh.values():
                    if model.ready:
                        model.state, model.error = "failed", refusal
                serving = kept_on_failed_reload(fresh, served)
            still_serving = any(model.ready for model in serving.values())
            for model in fresh.values():
                model.failed_beside_served = not model.ready and still_serving
            self.models[name] = serving
            # what is no longer served, and a failed fresh version that still holds runtimes (one
            # the budget refused stays listed `failed`, and held its ~100 MB until the next load)
            retired = [model for model in [*served.values(), *fresh.values()]
                       if all(model is not kept for kept in serving.values()) or (not model.ready and model.runtimes)]
            for model in retired:
                self.stop_serving(model, "replaced")
            self.models_changed()  # the fronts mirror the new versions now, not once the replaced ones have finished their work
            for model in retired:
                await self.release_retired(model)
            for version in set(served) - set(serving):  # versions no longer served: their series go too
                self.metrics.forget_version(name, str(version))
            self.settle_memory()
            self.models_changed()
            return fresh

    def budget_refusal(self, served: dict[int, LoadedModel], serving: dict[int, LoadedModel]) -> str | None:
        """Why a load must not go on, or None: once the served versions it replaces are released,
        the process would hold the whole memory budget and no request could fit. Asked while both
        are resident: what it holds now, less what the replaced versions added when they loaded.
        A reload of a larger version (by `load` or the repository poll) took the served model down
        and the server's readiness with it; now it fails and the served version stays (Triton's
        rule, as for any failed reload). An estimate: where it says the load fits and the
        measurement after the swap says otherwise, the server is unready as at start-up."""
        if not any(model.ready for model in serving.values() if all(model is not before for before in served.values())):
            return None  # nothing fresh is about to be served
        memory.trim()
        released = sum(model.resident_bytes for model in served.values() if model.ready and all(model is not kept for kept in serving.values()))
        expected = max(0, memory.rss_bytes() + self.arenas_missing_bytes() - released)
        if self.memory.capacity_if_resident(expected) > 0:
            return None
        return (f"with it the server would hold ~{expected / 2**20:.0f} MiB resident, the whole memory budget "
                f"(GANSERVE_MEMORY_BUDGET, {self.settings.memory_budget / 2**20:.0f} MiB), and no request could be served; "
                "raise the budget or unload another model")

    def keep_faster_fits(self, fresh: LoadedModel, served: ServedFit | None) -> None:
        """A reload of the same network, served the same way, keeps the faster of its two cost fits.
        Its warm-up competes with the traffic still served by the version it replaces, and measured
        slow (1.74 s a tile against 0.58 in a probe) — so its limits tightened and an upscale served a
        moment before got 413, the answer that says retrying cannot help. The weights do not change
        what a forward pass costs; the architecture, the runtime and the precision do, and where
        any of them changed the new fit stands as measured. `served`: the version served now, or
        the one last unloaded (a load right after an unload warmed beside the batch the unloaded
        version still computed, 0.395 s a tile against 0.229 in a probe, and nothing was kept)."""
        if served is None or not fresh.ready or served != ServedFit.of(fresh):
            return
        kept = [graph for graph, cost in fresh.costs.items()
                if (before := served.costs.get(graph)) is not None and cost.adopt(before.per_unit_s, before.overhead_s, margin=1.0)]
        if kept:
            fresh.limits = derive_limits(fresh, self.settings, self.request_memory_bytes())
            log.info("%s: reloaded; kept the served version's faster fit for %s: limits %s", fresh.entry.label, ", ".join(kept),
                     fresh.limits.describe())

    async def unload_model(self, name: str) -> None:
        """The repository extension's `unload`: readiness goes false at once, accepted requests
        finish, then the runtimes and lanes are released; its queued projection jobs are cancelled
        (a running one finishes). The model stays listed as `unloaded`."""
        async with self.repository_lock:
            versions = list(self.versions(name).values())
            for model in versions:
                self.stop_serving(model, "unloaded")
            # at once: under --workers the fronts kept admitting the model's requests (the engine refused each
            # with 503) and its streams kept taking frames until its accepted work had finished (a probe)
            self.models_changed()
            for model in versions:
                await self.release_retired(model)
            self.jobs.cancel_queued_of(name, "the model was unloaded")
            self.settle_memory()
            self.models_changed()

    def models_changed(self) -> None:
        """Tells whoever mirrors the served models (the engine's fronts) that they changed."""
        for callback in self.on_models_changed:
            callback()

    def served_fit(self, name: str, version: int) -> ServedFit | None:
        """How `name`'s `version` is served now (when ready), else how it was when last unloaded."""
        served = self.models.get(name, {}).get(version)
        if served is not None and served.state == "ready":
            return ServedFit.of(served)
        return self.unloaded_fits.get((name, version))

    def stop_serving(self, model: LoadedModel, state: str) -> None:
        """`model` takes no new work from now (`state`: unloaded, or replaced by a reload); what it
        accepted goes on (`release_retired`)."""
        if model.state == "ready" and state == "unloaded":
            self.unloaded_fits[(model.entry.name, model.entry.version)] = ServedFit.of(model)
        if model.state == "ready" or state == "unloaded":  # a failed version stays `failed` when replaced
            model.state = state
        self.retiring.append(model)

    async def release_retired(self, model: LoadedModel) -> None:
        """A version `stop_serving` retired finishes what it accepted, then releases what it holds."""
        async def release() -> None:
            try:
                await self.finish(model)
            finally:
                self.retiring.remove(model)
            model.batchers, model.runtimes, model.runtime, model.probes = {}, {}, None, {}

        await self.unless_stuck(model, release())

    async def finish(self, model: LoadedModel) -> None:
        """`model`'s batchers finish the items they accepted and stop, then its lane's threads."""
        await asyncio.gather(*(batcher.close() for batcher in model.batchers.values()))
        if model.lane is not None:  # polled, not joined: a re-timing run on the lane held it 0.56 s in a probe
            await model.lane.stopped()

    async def unless_stuck(self, model: LoadedModel, work: Coroutine[Any, Any, None]) -> None:
        """Waits for `work` (which waits for `model`'s lane) unless that lane is or becomes stuck
        (`stuck_lanes`); then the work goes on in the background and ends with the batch, if ever.
        A reload or unload of a stuck model waited for good while holding `repository_lock`, so
        every later load, unload and repository poll hung too; a graceful stop waited until it was
        killed. A retired version stays counted by `stuck_lanes` (it is in `retiring`) until then."""
        task = asyncio.create_task(work, name=f"release {model.entry.label}")
        self.releasing.add(task)
        task.add_done_callback(self.releasing.discard)
        while not task.done():
            await asyncio.wait({task}, timeout=STUCK_WAIT_POLL_S)
            if not task.done() and model.lane is not None and (running := model.lane.running_for()) > self.stuck_limit_s(model):
                log.error("%s: its lane has run one batch for %.0f s (stuck); it is released when that ends, if ever "
                          "(a restart frees it now)", model.entry.label, running)
                return
        task.result()

    def disk_signatures(self) -> dict[str, frozenset]:
        """Per model on disk: its versions and the name, size and modification time of each file in
        each version's folder (not only spec.json: a model.onnx copied after its spec.json left the
        version picked up half-copied `failed` for good)."""
        signatures: dict[str, set] = {}
        for entry in scan_repository(self.settings.repository):
            marks = signatures.setdefault(entry.name, set())
            try:
                with os.scandir(entry.path) as files:
                    for file in files:
                        stat = file.stat(follow_symlinks=False)
                        marks.add((entry.version, file.name, stat.st_size, stat.st_mtime_ns))
            except OSError:
                marks.add((entry.version, "", -1, -1))
            marks.add((entry.version, None, 0, 0))  # the version itself, even with an empty folder
        return {name: frozenset(marks) for name, marks in signatures.items()}

    async def poll_repository(self, interval_s: float) -> None:
        """`GANSERVE_REPOSITORY_POLL_S`: every interval, models whose versions or files changed on
        disk are reloaded (new versions beside the served ones, as `load` does; a reload that fails
        keeps what it would have replaced) and models gone from disk are unloaded. A change is acted
        on once the model's files have stayed the same for one interval, so that a copy in progress
        is not loaded half-written. Runs until the server drains."""
        seen = await asyncio.to_thread(self.disk_signatures)
        changing: dict[str, frozenset | None] = {}  # models whose files changed at the last look, as they were then
        while not self.draining:
            await asyncio.sleep(interval_s)
            if self.draining or not self.loaded:
                continue
            now = await asyncio.to_thread(self.disk_signatures)
            for name in sorted(set(now) | set(seen) | set(changing)):
                if now.get(name) == seen.get(name):
                    changing.pop(name, None)
                    continue
                if name not in changing or changing[name] != now.get(name):
                    changing[name] = now.get(name)  # still being written, perhaps: look again in an interval
                    continue
                del changing[name]
                try:
                    if name in now:
                        await self.load_model(name)
                    elif name in self.models:
                        await self.unload_model(name)
                    log.info("repository poll: %s %s", "reloaded" if name in now else "unloaded", name)
                except ApiError as error:
                    log.error("repository poll: %s: %s", name, error.message)
                if name in now:
                    seen[name] = now[name]
                else:
                    seen.pop(name, None)

    async def index(self) -> list[dict]:
        """Every entry on disk with its state (the repository extension's index), read off the event loop."""
        entries = await asyncio.to_thread(scan_repository, self.settings.repository)
        served = {(e.name, e.version) for e in self.served_entries(entries=entries)}
        rows = []
        for entry in entries:
            model = self.models.get(entry.name, {}).get(entry.version)
            state = model.state if model is not None else "not loaded"
            reason = (model.error or ("unloaded" if state == "unloaded" else "")) if model is not None else (
                "on disk, not loaded" if (entry.name, entry.version) in served
                else "not in GANSERVE_MODELS" if self.settings.models and entry.name not in self.settings.models else "excluded by the version policy")
            rows.append({"name": entry.name, "version": str(entry.version), "state": TRITON_STATES.get(state, state.upper()), "reason": reason})
        return rows

    def load_and_warm(self, model: LoadedModel) -> None:
        kind = model.config.runtime
        started = time.perf_counter()
        self.load_runtimes(model)
        for graph, runtime in model.runtimes.items():  # every graph is timed: admission and the limits stand on its costs
            with capturing(runtime), warming(runtime):  # the shapes warm-up runs are the ones captured, and kept
                model.costs[graph], model.probes[graph] = self.measure(model, runtime, graph)
        model.runtime = model.runtimes["model"]
        if "latents_file" in model.entry.spec:
            model.latents = load_numpy(str(model.entry.file_within(model.entry.spec["latents_file"])))
        if model.entry.kind == "style":
            model.spreads = direction_spreads(model)
            # a projection job's memory is counted at the first projection (service/routes/jobs.py), off the loop:
            # counted here, every start of a process serving a style model paid ~1.3 s for torch's meta kernels
            # to import (~60 server starts in the tests), and most never project
        log.info("loaded %s (%s on %s) in %.2fs; costs %s", model.entry.label, kind, model.runtime.device,
                 time.perf_counter() - started, {g: c.describe() for g, c in model.costs.items()})

    def load_runtimes(self, model: LoadedModel) -> None:
        """Every graph's runtime, in the first half precision (`half_candidates`) whose parity with
        fp32 holds, else fp32. A half precision asked for by name that misses the bound fails the
        entry with the figures; one `auto` tried is listed with them (`precision_rejected`)."""
        config = model.config
        if self.settings.precision in HALF_PRECISIONS and config.precision == "fp32":  # (it was dropped without a word)
            log.warning("%s: GANSERVE_PRECISION=%s is not served by the %s runtime (its ONNX graph is fp32), or its entry asks for fp32: "
                        "serving fp32", model.entry.label, self.settings.precision, config.runtime)
        for precision in [*half_candidates(config.precision, config.runtime, self.device), "fp32"]:
            model.runtimes = {graph: load_runtime(model.entry, config.runtime, self.device, self.settings.intra_op_threads, graph, precision,
                                                  config.graph_capture) for graph in model.entry.graphs}
            if precision == "fp32":
                return
            parity = self.check_precision(model, precision)
            if parity.within_bound:
                model.parity = parity
                log.info("%s in %s: %s", model.entry.label, precision, parity.describe())
                return
            if config.precision != "auto":
                raise ValueError(f"{precision} is too far from fp32 for this model: mean {parity.mean_abs_error:.2e} (bound {parity.mean_bound:.2e}), "
                                 f"max {parity.max_abs_error:.2e} (bound {parity.max_bound:.2e}) of the value range; serve it in fp32")
            model.precision_rejected.append(parity)
            log.info("%s: %s misses the bound (%s); trying the next precision", model.entry.label, precision, parity.describe())

    def check_precision(self, model: LoadedModel, precision: str) -> PrecisionParity:
        """The half-precision graphs (`model.runtimes`) against fp32 on fixed inputs
        (service/precision.py). Style models are compared from z to image."""
        entry, kind, threads = model.entry, model.config.runtime, self.settings.intra_op_threads
        reference = load_runtime(entry, kind, self.device, threads, "model")
        spatial = 0
        if has_dynamic_size(entry):
            multiple = entry.spec["size_multiple"]
            spatial = model.config.upscale_tile if entry.kind == "super_resolution" else -(-entry.spec["train_resolution"] // multiple) * multiple
        reference_run, half_run = reference.run, model.runtimes["model"].run
        inputs = parity_inputs(entry, dummy_inputs(entry, PARITY_BATCH, "model", spatial))
        if "mapping" in entry.graphs:  # style: z → w → ws → image, both graphs in the precision compared
            reference_mapping = load_runtime(entry, kind, self.device, threads, "mapping")
            inputs = parity_inputs(entry, dummy_inputs(entry, PARITY_BATCH, "mapping"))
            num_ws = entry.spec["num_ws"]

            def through(mapping_run, synthesis_run):
                return lambda z: synthesis_run({"ws": np.ascontiguousarray(np.repeat(mapping_run(z)[:, None, :], num_ws, axis=1))})

            reference_run, half_run = through(reference_mapping.run, reference.run), through(model.runtimes["mapping"].run, half_run)
        return measure_parity(entry, precision, reference_run, half_run, inputs)

    def measure(self, model: LoadedModel, runtime: Runtime, graph: str) -> tuple[GraphCost, CostProbe]:
        """Warms the graph at the shapes the batcher produces first and measures its cost there.

        Generators: batch sizes 1, 2, 4, … max (those that fit `max_batch_seconds`). Image-to-image graphs take any size, so one unit
        is the reference image (the upscale tile, or a translate image of the training size) and
        they are warmed at small batches (a full batch of large tiles would cost seconds of
        start-up on a CPU); translate also at twice the side and at TRANSLATE_WARMUP_LARGE_SIDE,
        so the cost per pixel is fitted across sizes, not batch sizes, and up to where large
        inputs are (the fit runs between the smallest and the largest shape that fits
        `max_batch_seconds`)."""
        entry, config = model.entry, model.config
        captures = getattr(runtime, "capture", None) is not None
        prepare = runtime.run if captures else None  # captured before the memory of its first run is measured
        specialised = specialises_on_shapes(runtime)
        batch_sizes = config.warmup_batch_sizes or warmup_sizes(config.max_batch_size)
        if not has_dynamic_size(entry, graph):
            cost, probe = measure_cost(runtime.run, lambda b: dummy_inputs(entry, b, graph), [(b, float(b)) for b in batch_sizes], None,
                                       config.max_batch_seconds, config.warmup_repeats, config.warmup_repeats if specialised else 1, prepare)
            self.fill_arena(model, runtime, graph, cost)
            return cost, probe
        multiple = entry.spec["size_multiple"]
        if entry.kind == "super_resolution":
            side = config.upscale_tile
            # every tile has the tile's shape, so where the runtime specialises on shapes (captured
            # graphs, CUDA) tile batches are warmed (and padded) like a generator's batches;
            # otherwise two batch sizes fit the cost per tile
            shapes = {(b, side): float(b) for b in batch_sizes} if specialised else {(1, side): 1.0, (2, side): 2.0}
        else:
            side = max(64, -(-entry.spec["train_resolution"] // multiple) * multiple)
            large = -(-TRANSLATE_WARMUP_LARGE_SIDE // multiple) * multiple
            shapes = {(1, side): 1.0, (1, 2 * side): 4.0} | ({(1, large): (large / side) ** 2} if large > 2 * side else {})
        inputs_for = {units: dummy_inputs(entry, b, graph, s) for (b, s), units in shapes.items()}
        cost, probe = measure_cost(runtime.run, lambda units: inputs_for[units], [(units, units) for units in shapes.values()], side * side,
                                   config.max_batch_seconds, config.warmup_repeats, config.warmup_repeats if specialised else 1, prepare)
        # where the runtime keeps an arena for the tiles, it holds warm-up's two-tile batch, and
        # larger tile batches run in chunks of two in it (service/runtimes.py `run_in_chunks`): with
        # one lane thread no two chunks run at once, so a tile batch adds its tiles' arrays only
        # (the arena's batch is then counted resident even while a v2 input of another size has
        # emptied it: `arenas_missing_bytes`)
        arena = getattr(runtime, "arena", None)
        if arena is not None and entry.kind == "super_resolution" and config.lane_threads == 1:
            # a tile's own arrays: its input and float output, and for the output's uint8 conversion
            # (`imaging.to_uint8`, overlap 0) or its blend a float temporary and the uint8 image
            tile_in = 4 * entry.spec["in_channels"] * side * side
            tile_out = 4 * entry.spec["channels"] * (side * entry.spec["scale"]) ** 2
            cost.item_bytes = math.ceil((tile_in + 2.25 * tile_out) * MEMORY_MARGIN)
            cost.in_arena, arena.kept_bytes = True, cost.bytes_for(arena.kept_batch)
        if entry.kind == "super_resolution":  # warm-up ran tiles: a larger (v2) image is past them
            cost.largest_warmed_item = 1.0
            cost.large_item_exponent = WHOLE_IMAGE_EXPONENT_CPU if runtime.device == "cpu" else 1.0
        else:  # a translate past its largest warmed image: no prior (measured, the slowdown starts past 1448²), what batches show
            cost.largest_warmed_item = max(cost.warmed, default=1.0)  # (a shape past `max_batch_seconds` is not warmed)
        return cost, probe

    @staticmethod
    def fill_arena(model: LoadedModel, runtime: Runtime, graph: str, cost: GraphCost) -> None:
        """Where a generator's runtime keeps an arena (service/runtimes.py `ArenaKeeper`), the
        batcher's largest batch (7 where warm-up's powers of two stopped at 4) is run once now, so
        the arena holds it while the resident baseline is read, and batches up to it reuse that
        memory instead of giving it back."""
        arena = getattr(runtime, "arena", None)
        largest = cost.batch_items(model.config.max_batch_size, model.config.max_batch_seconds)
        if arena is not None and largest > arena.kept_batch:
            runtime.run(dummy_inputs(model.entry, largest, graph))

    def is_ready(self) -> bool:
        """Readiness as `ready_requires` says: every model, any model, or the named ones."""
        if self.draining or not self.loaded or self.memory.capacity == 0:  # no request could fit: every one answered 503 "retry"
            return False
        if self.stuck_lanes():
            return False
        ready = {name for name, versions in self.models.items() if any(m.ready for m in versions.values())}
        rule = self.settings.ready_requires
        if rule == "all" and self.missing_models():
            return False
        if rule == "all":  # an unloaded model was taken out on purpose, and a version whose (re)load failed while
            # its model kept serving changed nothing served: neither is required (a broken or too large new
            # version dropped into the repository took the server out of its load balancer)
            return all(m.ready for versions in self.models.values() for m in versions.values()
                       if m.state != "unloaded" and not m.failed_beside_served)
        if rule == "any":
            return bool(ready)
        return set(self.settings.ready_names) <= ready

    def versions(self, name: str) -> dict[int, LoadedModel]:
        if name not in self.models:
            raise ApiError(404, f"unknown model {name[:100]!r}; GET /v1/models lists the models served")
        return self.models[name]

    def resolve(self, name: str, version: int | None = None) -> LoadedModel:
        """The version a request addresses, ready or not: `version`, else the latest ready one,
        else the latest (404 for an unknown name or version)."""
        versions = self.versions(name)
        if version is None:
            ready = [v for v, m in versions.items() if m.ready]
            version = max(ready) if ready else max(versions)
        if version not in versions:
            raise ApiError(404, f"model {name!r} has no version {version} (has {sorted(versions)})")
        return versions[version]

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """`resolve`, and 503 unless that version is ready."""
        model = self.resolve(name, version)
        if not model.ready:
            raise ApiError(503, f"model {name!r} v{model.entry.version} is {model.state}" + (f": {model.error}" if model.error else ""), headers={"Retry-After": "1"})
        if (running := model.lane.running_for()) > (limit := self.stuck_limit_s(model)):
            raise ApiError(503, f"model {model.entry.label} has been computing one batch for {running:.0f} s, past "
                                f"GANSERVE_STUCK_COMPUTE_S ({limit:g} s): its compute is stuck and the "
                                f"server reports itself not live (/health/live) until it ends", headers={"Retry-After": "10"})
        return model

    def batcher(self, model: LoadedModel, operation: str, graph: str = "model") -> DynamicBatcher:
        """The queue of one (model, version, operation); `graph` names the network it runs.

        A request that took its model just before a reload swapped it out is served by the
        replacement of the same version (the same weights, re-read), so a reload fails no request."""
        if model.state == "replaced":
            replacement = self.models.get(model.entry.name, {}).get(model.entry.version)
            if replacement is None or not replacement.ready:
                raise ApiError(503, f"model {model.entry.label} was reloaded and this version is gone; retry", headers={"Retry-After": "1"})
            model = replacement
        if not model.ready:  # unloaded between the request's admission and now (it was decoding its upload)
            raise ApiError(503, f"model {model.entry.label} was {model.state} while this request was being prepared; retry", headers={"Retry-After": "1"})
        if operation not in model.batchers:
            if self.draining:
                raise ShuttingDown()
            config = model.config
            key = BatchKey(model.entry.name, model.entry.version, operation)
            runtime = model.runtimes[graph]
            if model.outputs_pixels(operation):
                run = functools.partial(runtime.run_images, value_range=tuple(model.entry.spec["value_range"]))
            elif operation == "upscale" and model.keeps_tiles(runtime):
                run = runtime.run_kept
            else:
                run = runtime.run
            cost = model.costs.get(graph)
            pad_to = sorted({int(units) for units in cost.warmed}) if cost and self.pads_batches(model, graph) else None
            model.batchers[operation] = DynamicBatcher(key, run, model.lane, self.metrics, config.max_batch_size,
                                                       config.max_queue_delay_ms, config.max_queue_size, cost, config.max_batch_seconds, pad_to)
        return model.batchers[operation]

    def pads_batches(self, model: LoadedModel, graph: str) -> bool:
        """Batches of fixed-size graphs are padded to warmed sizes where the configuration says so
        (by default where the runtime specialises on shapes); upscale tiles too where it does
        (every tile has the tile's shape)."""
        runtime = model.runtimes.get(graph, model.runtime)
        specialised = runtime is not None and specialises_on_shapes(runtime)
        if has_dynamic_size(model.entry, graph) and not (model.entry.kind == "super_resolution" and specialised):
            return False
        wanted = model.config.pad_batches
        return specialised if wanted is None else wanted

    def all_models(self) -> list[LoadedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def lanes_beside(self, model: LoadedModel) -> list[LaneView]:
        """The other models' lanes, which share the device with `model`'s (admission counts their work)."""
        return [other.lane for other in self.all_models() if other.lane is not None and other.lane is not model.lane]

    async def drain(self) -> None:
        """Readiness goes false, queued jobs are cancelled, accepted requests finish (each by its
        deadline), then the pools stop."""
        self.draining = True
        self.jobs.cancel_all()
        await asyncio.gather(*(self.unless_stuck(model, self.finish(model)) for model in self.all_models()))
        self.jobs.shutdown()
        self.encoders.shutdown(wait=True)
