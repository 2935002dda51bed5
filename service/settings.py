"""Every knob of the service, from the command line or `GANSERVE_*` environment variables."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ByteSize, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.digits import ascii_count
from service.version_policy import check_policy

GIB = 1024**3


def machine_memory_bytes() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if (limit := ascii_count(text, max_digits=30)) is not None:  # "max" when unlimited
            total = min(total, limit)
    return total


def default_memory_budget() -> int:
    """Half the machine: the rest is left to the OS, the page cache and whatever runs beside us."""
    return machine_memory_bytes() // 2


def name_list(value: object) -> object:
    """A list of names as people write it in the environment: a JSON list (`["a", "b"]`) or names
    separated by commas (`a,b`, or one name). pydantic-settings took JSON only, and
    `GANSERVE_MODELS=dcgan-digits` stopped start-up with a page of traceback."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)  # malformed JSON: a ValueError, reported as the setting's error
    return [name.strip() for name in text.split(",") if name.strip()]


# read by `name_list`, not by pydantic-settings' JSON decoding
NameList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """(Byte sizes take units as README writes them: `8MiB`, `2GiB`, `512KiB`; a bare number is bytes.)"""

    model_config = SettingsConfigDict(env_prefix="GANSERVE_", extra="ignore")

    repository: Path = Path("model_repository")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    runtime: Literal["onnx", "torchscript", "eager"] = "onnx"
    runtime_overrides: dict[str, Literal["onnx", "torchscript", "eager"]] = {}  # per model name
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # half precision (service/precision.py) for models whose entry does not say: auto serves bf16,
    # else fp16, where its parity with fp32 holds on a CUDA device with a torch runtime; fp32 elsewhere
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # graphs captured per warmed shape (service/graph_capture.py) for the models whose runtime can:
    # cuda_graphs on torchscript/eager, compile on eager; others keep none (an entry's serving section may say otherwise)
    graph_capture: Literal["none", "cuda_graphs", "compile"] = "none"
    # the batcher (Triton's names); an entry's `serving` section may override the first four
    max_batch_size: int = Field(64, ge=1, le=4096)  # items (images, tiles), not requests
    max_batch_seconds: float = Field(0.5, gt=0)  # a batch also stops where its estimated compute would pass this
    max_queue_delay_ms: float = Field(0.0, ge=0)  # 0: natural batching, see DynamicBatcher.wait_for_batch
    max_queue_size: int = Field(4096, ge=1)  # items waiting per (model, version, operation)
    request_timeout_s: float = Field(30.0, gt=0)  # the deadline of a request, 504 past it
    # a lane whose one batch has run this long is stuck (every request it served is long past its deadline):
    # /health/live and /health/ready answer 503 and its model's requests are refused at once; unset: 4 x the
    # deadline (a v2 whole image through an upscale graph ran 1.5x its estimate, and a busy machine stretches more)
    stuck_compute_s: float | None = Field(None, gt=0)
    # lanes: every model computes on its own executor, so a slow model queues behind itself only
    lane_threads: int = Field(1, ge=1, le=64)  # batches one model runs at once (Triton's instance count)
    # the process memory budget: what is admitted at once (bodies, images, batches) plus what the
    # loaded models hold stays under it; requests past it wait outside with 503 + Retry-After
    memory_budget: ByteSize = Field(default_factory=default_memory_budget, ge=64 * 1024**2)
    # readiness: `all` models ready (the default), `any` one of them, or the named ones (commas or a JSON list)
    ready_requires: str = "all"
    # request limits
    max_images_per_request: int = Field(256, ge=1, le=4096)
    max_body_bytes: ByteSize = Field(8 * 1024 * 1024, ge=1024)
    # v1 JSON operations' bodies past it: 413 before parsing (their largest: interpolate's two w of
    # 4,096 values, ~200 KB). 7.9 MB of unknown keys held the event loop 6 s and 0.9 GB before its 422
    max_json_body_bytes: ByteSize = Field(256 * 1024, ge=16 * 1024)
    max_upload_pixels: int = Field(4096 * 4096, ge=1)  # any upload past it: 413, read from its header before decoding
    max_translate_pixels: int = Field(2048 * 2048, ge=64)  # translate inputs past it: 413 (lowered per model by its measured cost)
    max_upscale_input_pixels: int = Field(1024 * 1024, ge=64)  # upscale inputs past it: 413 (lowered per model by its measured cost)
    max_json_tensor_values: int = Field(1 << 20, ge=1024)  # v2 JSON outputs past it: 413 (about 20 MB of JSON)
    # v2 JSON inference headers to models whose inputs have no fixed size (images) past it: 413 before
    # parsing, which holds the GIL ~0.12 s per MiB (fixed-size inputs: what 256 rows can need)
    max_json_header_bytes: ByteSize = Field(1 << 20, ge=64 * 1024)
    # HTTP hygiene
    max_connections: int = Field(512, ge=1)  # open connections; at it a waiting one makes room (service/connection_table.py), else a new one gets 503
    header_timeout_s: float = Field(10.0, gt=0)  # a connection must finish sending a request's headers within this
    max_header_bytes: ByteSize = Field(64 * 1024, ge=1024)  # a request's headers in bytes; past it 431 and the connection closes
    body_timeout_s: float = Field(30.0, gt=0)  # and its body within this (408 past it)
    send_timeout_s: float = Field(30.0, gt=0)  # a client that reads nothing of its answer (HTTP or stream) for this long is disconnected
    keep_alive_s: int = Field(5, ge=1)  # idle keep-alive connections close after this
    # proxies (comma-separated addresses, "*" for any, "" for none) whose X-Forwarded-For names the client, for
    # the per-client shares of jobs and streams; uvicorn's default trusted 127.0.0.1 without a word, so a local
    # client could name itself anyone (a probe's 270 named clients evicted another's job result)
    forwarded_allow_ips: str = "127.0.0.1"
    # the model repository
    model_control: bool = False  # allow POST /v2/repository/models/{name}/load|unload (off: anyone who reaches the port could unload models)
    # host names (the Host header, no port) model control answers to besides IP addresses and localhost: a
    # page on a name an attacker controls, re-pointed at this server (DNS rebinding), is same-site to itself
    model_control_hosts: NameList = []
    # host names (the Host header, no port) every route answers besides IP addresses and localhost; empty: any
    # name. Set it where browsers could reach the server: a page on a name an attacker controls, re-pointed at
    # this server's address (DNS rebinding), is same-site to it and may read and post as its visitor; others: 421
    allowed_hosts: NameList = []
    # origins (`https://app.example`) whose pages may send this server POSTs and open streams through a
    # visitor's browser besides its own pages (an Origin naming the request's Host): a page elsewhere is 403
    trusted_origins: NameList = []
    repository_poll_s: float = Field(0.0, ge=0)  # > 0: re-scan this often and (re)load models whose versions changed on disk
    version_policy: str = "all"  # which versions are served: all, latest:N or specific:V1,V2 (Triton's policies)
    version_policies: dict[str, str] = {}  # per model name, over version_policy
    models: NameList = []  # serve only these model names (empty: every model); a Ray Serve replica serves one
    # image-to-image
    upscale_tile: int = Field(96, ge=8)  # input px per tile side: every tile is one batcher item
    upscale_overlap: int = Field(16, ge=0)  # input px shared by neighbouring tiles, blended across
    # upscale streams (WebSocket)
    max_streams: int = Field(32, ge=1)  # open at once; past it the handshake gets 503
    stream_idle_s: float = Field(60.0, gt=0)  # a stream that sends no frame for this long is closed
    stream_max_messages_per_s: int = Field(240, ge=1)  # a WebSocket connection past it (after a burst of twice as many) is closed with 1008
    # long jobs (projection)
    max_jobs: int = Field(4, ge=1)  # queued + running; 429 past it
    max_job_seconds: float = Field(120.0, gt=0)
    max_projection_steps: int = Field(1000, ge=1, le=100_000)
    # threads
    encoder_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    intra_op_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)  # per lane thread
    # limits measured at a busy warm-up relax later: once every lane has been idle this long, one
    # model's warmed shapes are timed again and a faster fit adopted (service/remeasure.py), and a server never
    # idle that long scales a fit to the batches it served where they ran faster; 0: neither
    remeasure_idle_s: float = Field(30.0, ge=0)
    remeasure_max_interval_s: float = Field(3600.0, gt=0)  # a model found no faster waits twice as long each time, up to this
    # the load other processes put on this process's cores (read from /proc/stat) counts in admission's
    # estimates (service/host_load.py); off where that file shows CPUs this process shares with no one
    count_other_processes: bool = True
    # glibc asks for transparent huge pages on the large buffers it maps (service/memory.py
    # `huge_pages_environment`): a runtime without an arena faults every activation in afresh each run.
    # Off by default: translates' median compute 1.5x faster, but warm-up timed them slower and the
    # kernel's compaction can stall a request (docs/benchmarks.md "Huge pages")
    huge_pages: bool = False
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"  # (a free string crashed start-up with a traceback)
    # processes: 1 = one process does everything; N > 1 = N HTTP front processes (parsing, validation,
    # admission, encoding) hand items to one engine process that owns the models and batches
    workers: int = Field(1, ge=1, le=64)
    # set by the supervisor of `--workers N` for its children, never by hand
    role: Literal["single", "engine", "front"] = "single"
    engine_dir: Path | None = None  # the children's private directory: link and HTTP sockets, the shared memory budget
    worker_slot: int = Field(0, ge=0)  # the child's slot in the shared memory budget: the engine 0, the fronts 1 … N

    @field_validator("models", "model_control_hosts", "allowed_hosts", "trusted_origins", mode="before")
    @classmethod
    def names_from_text(cls, value: object) -> object:
        return name_list(value)

    @field_validator("ready_requires", mode="before")
    @classmethod
    def readiness_rule(cls, value: object) -> object:
        """`all`, `any` (any case) or names, written as `models` is: a JSON list of names kept
        readiness 503 for good (it was matched as one name), and so did `ALL`. Empty: `all`."""
        if not isinstance(value, str):
            return value
        if value.strip().lower() in ("", "all", "any"):
            return value.strip().lower() or "all"
        return ",".join(name_list(value))

    @property
    def ready_names(self) -> list[str]:
        """The models readiness waits for when `ready_requires` names them (none for all / any)."""
        return [] if self.ready_requires in ("all", "any") else self.ready_requires.split(",")

    @field_validator("log_level", mode="before")
    @classmethod
    def lower_case_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def check_tiles(self) -> "Settings":
        if 2 * self.upscale_overlap >= self.upscale_tile:
            raise ValueError(f"upscale_overlap ({self.upscale_overlap}) must be below half of upscale_tile ({self.upscale_tile})")
        self.version_policy = check_policy(self.version_policy)
        self.version_policies = {name: check_policy(policy) for name, policy in self.version_policies.items()}
        return self

    def policy_for(self, name: str) -> str:
        return self.version_policies.get(name, self.version_policy)

    @property
    def stuck_after_s(self) -> float:
        """How long one batch may run before its lane is taken for stuck (`stuck_compute_s`)."""
        return self.stuck_compute_s if self.stuck_compute_s is not None else 4 * self.request_timeout_s

    @property
    def shutdown_grace_s(self) -> float:
        """How long a shutdown may take: every accepted request ends by its deadline."""
        return self.request_timeout_s + 5
