"""The `ganserve bench` verb."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer


def counts(text: str, option: str, minimum: int = 1, example: str = "1,8,32") -> list[int]:
    """A comma-separated option of whole numbers, each at least `minimum` (`1,abc` or `0` ended in a
    traceback, the second after every server had started)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) >= minimum for part in parts):
        raise typer.BadParameter(f"{text!r}: comma-separated whole numbers of at least {minimum}, such as {example}", param_hint=option)
    return [int(part) for part in parts]


def model_names(text: str, repository: Path) -> list[str]:
    """Comma-separated model names, each in the repository (a missing one ended in a traceback)."""
    from service.repository import scan_repository

    names = [name.strip() for name in text.split(",") if name.strip()]
    held = {entry.name for entry in scan_repository(repository)}
    missing = [name for name in names if name not in held]
    if not names or missing:
        raise typer.BadParameter(f"no model {', '.join(missing) or '(none given)'} in {repository} (it holds {', '.join(sorted(held))})",
                                 param_hint="--models")
    return names


def bench_command(
    model: str = typer.Option("dcgan-digits", help="model name in the repository"),
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    runtime: str = typer.Option("onnx", help="onnx, torchscript or eager (the GPU path: torchscript/eager on CUDA)"),
    concurrency: str = typer.Option("1,16,64", help="comma-separated client counts for single-image requests"),
    duration: float = typer.Option(10.0, min=1.0, help="seconds per scenario"),
    big_request: int = typer.Option(64, min=2, help="images per request in the large-request scenario"),
    max_batch_size: int = typer.Option(64, min=1),
    max_queue_delay_ms: float = typer.Option(2.0, min=0.0, help="the delay of the second batching configuration (the first uses 0)"),
    threads: int = typer.Option(1, min=1, help="runtime intra-op threads (the rest of the cores serve HTTP and encoding)"),
    workers: int = typer.Option(1, min=1, help="above 1: also measure natural batching with `serve --workers N` (N fronts, one engine)"),
    graph_capture: str = typer.Option("none", help="none, cuda_graphs or compile: the server's GANSERVE_GRAPH_CAPTURE (service/graph_capture.py)"),
    rounds: int = typer.Option(3, min=1, help="every server runs at once; each scenario's seconds are spent in this many turns, interleaved with the others'"),
    baseline_code: Optional[Path] = typer.Option(None, "--baseline-code", exists=True, file_okay=False,
                                                 help="another checkout of ganserve (e.g. `git worktree add /tmp/base HEAD~1`): its natural-batching "
                                                      "server joins the turns, and the side-by-side says what the change is worth"),
    out: Optional[Path] = typer.Option(Path("bench/results/latest.json"), help="JSON report"),
) -> None:
    """Load-test the real server (natural batching, batching with a delay, no batching) beside the naive server, and compare with the bare-forward ceiling."""
    from bench.runner import run_bench

    run_bench(repository, model, runtime, counts(concurrency, "--concurrency"), duration, big_request, max_batch_size, max_queue_delay_ms, threads, out,
              workers, graph_capture, rounds, baseline_code)


def bench_upscale_command(
    model: str = typer.Option("sr-rrdb-x4", help="an upscale (or translate) model in the repository"),
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    runtime: str = typer.Option("onnx", help="onnx, torchscript or eager (torchscript/eager use CUDA when present)"),
    concurrency: str = typer.Option("1,4,16", help="comma-separated client counts"),
    duration: float = typer.Option(10.0, min=1.0, help="seconds per scenario"),
    size: int = typer.Option(256, min=16, help="input side in px"),
    format: str = typer.Option("jpeg", help="output format: jpeg, webp, png or npy"),
    max_batch_size: int = typer.Option(64, min=1, help="tiles per forward pass"),
    threads: int = typer.Option(1, min=1, help="runtime intra-op threads"),
    graph_capture: str = typer.Option("none", help="none, cuda_graphs or compile: the server's GANSERVE_GRAPH_CAPTURE (service/graph_capture.py)"),
    workers: int = typer.Option(1, min=1, help="the server's front processes (`serve --workers N`: above 1, one engine computes and assembles the tiles)"),
    out: Optional[Path] = typer.Option(Path("bench/results/upscale-latest.json"), help="JSON report"),
) -> None:
    """Upscale (or translate) throughput (frames/s, p99) through the real server, beside the bare forward pass."""
    from bench.upscale import run_upscale_bench

    run_upscale_bench(repository, model, runtime, counts(concurrency, "--concurrency"), duration, size, format, max_batch_size, threads, out,
                      graph_capture=graph_capture, workers=workers)


def bench_soak_command(
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    concurrency: int = typer.Option(64, min=1, help="clients of the mixed-traffic soak"),
    duration: float = typer.Option(600.0, min=5.0, help="seconds of mixed traffic"),
    isolation: float = typer.Option(20.0, min=2.0, help="seconds of each isolation scenario"),
    warmup: float = typer.Option(60.0, min=0.0, help="RSS growth is measured from this second of the soak"),
    stalled_readers: int = typer.Option(200, min=0, help="clients that ask for ~9 MB answers and never read them (0: skip)"),
    stalled_budget_mb: int = typer.Option(2048, min=64, help="GANSERVE_MEMORY_BUDGET of the stalled readers' server, MiB (it holds the StyleGAN: ~1.07 GB resident)"),
    stalled_send_timeout: float = typer.Option(30.0, min=0.5, help="GANSERVE_SEND_TIMEOUT_S of the stalled readers' server"),
    connection_hogs: int = typer.Option(1200, min=0, help="silent sockets one client holds, re-opened as closed, beside a benign client (0: skip)"),
    hog_seconds: float = typer.Option(15.0, min=2.0, help="seconds of each connection-hog phase (the hog on the benign client's address, then on another)"),
    hog_max_connections: int = typer.Option(512, min=1, help="GANSERVE_MAX_CONNECTIONS of the connection hogs' server"),
    out: Optional[Path] = typer.Option(Path("bench/results/soak-latest.json"), help="JSON report"),
) -> None:
    """Resource safety under load: DCGAN latency beside saturated heavy lanes, a soak of mixed and hostile traffic (5xx, p99, RSS growth), then clients that never read their answers, then a client holding silent sockets."""
    from bench.soak import run_soak

    run_soak(repository, concurrency, duration, isolation, warmup, out, stalled_readers, stalled_budget_mb * 2**20, stalled_send_timeout,
             connection_hogs, hog_seconds, hog_max_connections)


def bench_ray_command(
    model: str = typer.Option("dcgan-digits", help="model for single-image generate"),
    upscale_model: Optional[str] = typer.Option("sr-rrdb-x4", help="an upscale model measured beside it ('' to skip)"),
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    concurrency: str = typer.Option("1,8,32,64", help="comma-separated client counts for single-image generate"),
    duration: float = typer.Option(10.0, min=1.0, help="seconds per scenario"),
    out: Optional[Path] = typer.Option(Path("bench/results/ray-latest.json"), help="JSON report"),
) -> None:
    """The same load through `ganserve serve` and through `ganserve ray` (local Ray, one replica): throughput, latency and what Ray adds."""
    from bench.ray import run_ray_bench

    run_ray_bench(repository, model, upscale_model or None, counts(concurrency, "--concurrency"), duration, out)


def bench_limits_command(
    models: str = typer.Option("sr-rrdb-x4,cyclegan-thin2thick", help="comma-separated model names in the repository"),
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    loops_per_core: int = typer.Option(2, min=1, help="busy processes per core while the second server warms"),
    idle: float = typer.Option(5.0, min=0.1, help="the servers' GANSERVE_REMEASURE_IDLE_S"),
    timeout: float = typer.Option(120.0, min=1.0, help="seconds to wait for every model's limits to relax"),
    out: Optional[Path] = typer.Option(Path("bench/results/limits-latest.json"), help="JSON report"),
) -> None:
    """Limits after a quiet warm-up and after a busy one, and how soon the idle server relaxes the busy one's (service/remeasure.py)."""
    from bench.limits import run_limits_bench

    run_limits_bench(repository, model_names(models, repository), loops_per_core, idle, timeout, out)


def bench_estimates_command(
    model: str = typer.Option("sr-rrdb-x4", help="an upscale model (v2 whole images) or a translation model (translates past its warmed sizes) in the repository"),
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    sides: str = typer.Option("96,192,288,448,640,816", help="comma-separated image sides (a translation model: try 512,1024,1448,2048)"),
    repeats: int = typer.Option(2, min=1, help="requests per side, one after another (the first meets the prior, the later ones what the earlier showed)"),
    out: Optional[Path] = typer.Option(Path("bench/results/estimates-latest.json"), help="JSON report"),
) -> None:
    """Admission's compute estimate for whole images through an upscale graph (v2 infer) against the server's own compute time."""
    from bench.estimates import run_estimates_bench

    run_estimates_bench(repository, model, counts(sides, "--sides"), repeats, out)


def bench_animation_command(
    sides: str = typer.Option("64,256,1024", help="comma-separated frame sides for the photo frames"),
    frames: int = typer.Option(16, min=2, help="frames per animation"),
    noise_side: int = typer.Option(256, min=8, help="the side of the noise frames (the quantiser's worst case)"),
    repeats: int = typer.Option(3, min=1, help="runs per case; the best counts"),
    out: Optional[Path] = typer.Option(Path("bench/results/animation-latest.json"), help="JSON report"),
) -> None:
    """What /interpolate's GIF and WebP animations cost the encoder pool: the server's settings against Pillow's defaults, same frames, same run."""
    from bench.animation import run_animation_bench

    run_animation_bench(counts(sides, "--sides", 8, "64,256"), frames, noise_side, repeats, out)


def bench_arena_command(
    entry: Optional[Path] = typer.Option(None, help="a repository entry's version directory (fixed-shape ONNX); default: a synthetic generator"),
    side: int = typer.Option(1024, min=16, help="the synthetic generator's image side"),
    batch: int = typer.Option(4, min=1, help="the warmed batch size"),
    held: int = typer.Option(16, min=1, help="batches whose outputs one request holds at once"),
    repeats: int = typer.Option(5, min=1, help="timed batches; the median counts"),
    out: Optional[Path] = typer.Option(Path("bench/results/arena-latest.json"), help="JSON report"),
) -> None:
    """What ONNX Runtime's host arena keeps after warm-up, as served against the settings before and against no arena, same model, same run."""
    from bench.arena import run_arena_bench

    run_arena_bench(entry, side, batch, held, repeats, out)


def bench_encoding_command(
    sides: str = typer.Option("64,256,512,1024", help="comma-separated image sides"),
    repeats: int = typer.Option(5, min=1, help="encodes per case; the median counts"),
    out: Optional[Path] = typer.Option(Path("bench/results/encoding-estimate-latest.json"), help="JSON report"),
) -> None:
    """The encoding estimate admission uses against the encoding itself, per format and size; and PNG as served against the settings before."""
    from bench.encoding import run_encoding_bench

    run_encoding_bench(counts(sides, "--sides", 8, "64,256"), repeats, out)


class DataLoadingSet(str, Enum):
    """The readers `bench-data` measures."""

    image_folder = "image_folder"
    cifar10 = "cifar10"


def bench_data_command(
    images: int = typer.Option(20_000, min=10, help="images written for the run (JPEGs of 128x96 in 4 class folders, or 32x32 CIFAR batches)"),
    resolution: int = typer.Option(128, min=8, help="the training resolution they are read at"),
    baseline_code: Optional[Path] = typer.Option(None, "--baseline-code", exists=True, file_okay=False,
                                                 help="another checkout (a git worktree of the code before a change), measured beside this one"),
    dataset: DataLoadingSet = typer.Option(DataLoadingSet.image_folder, help="the reader measured"),
    out: Optional[Path] = typer.Option(Path("bench/results/data-loading-latest.json"), help="JSON report"),
) -> None:
    """What reading a user's data (an image folder, or CIFAR-10 batches) costs before training's first step: time and peak memory of the reader and split, each code in its own process."""
    from bench.data_loading import run_data_loading_bench

    run_data_loading_bench(images, resolution, baseline_code, out, dataset.value)


def bench_contention_command(
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    baseline_code: Optional[Path] = typer.Option(None, "--baseline-code", exists=True, file_okay=False,
                                                 help="another checkout (a git worktree of the code before a change), measured in turns with this one"),
    rounds: int = typer.Option(2, min=1, help="turns per server"),
    bursts: int = typer.Option(4, min=1, help="bursts per turn"),
    k: int = typer.Option(3, min=1, help="upscales and translates in each burst (each)"),
    seconds: float = typer.Option(30.0, min=1.0, help="the steady scenario's length"),
    timeout_s: float = typer.Option(3.0, min=0.5, help="the servers' GANSERVE_REQUEST_TIMEOUT_S"),
    upscale_side: int = typer.Option(160, min=8, help="the upscales' input side"),
    translate_side: int = typer.Option(1024, min=8, help="the translates' input side"),
    other_processes: int = typer.Option(0, min=0, max=64, help="busy loops spinning beside the server from after its first runs (another tenant's load)"),
    streams: int = typer.Option(4, min=0, max=32, help="the streams scenario's clients streaming small translates (0: no streams scenario)"),
    out: Optional[Path] = typer.Option(Path("bench/results/contention-latest.json"), help="JSON report"),
) -> None:
    """Admission with several models busy on the same cores: admitted requests that still missed their deadline, refusals after an obeyed Retry-After, latency."""
    from bench.contention import run_contention_bench

    run_contention_bench(repository, baseline_code, rounds, bursts, k, seconds, timeout_s, upscale_side, translate_side, out, other_processes, streams)


def bench_warmup_command(
    model: str = typer.Option("sr-rrdb-x4", help="a model name in the repository"),
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    starts: int = typer.Option(4, min=1, max=50, help="server starts per code and per --workers count"),
    workers: str = typer.Option("1,2", help="comma-separated `--workers` counts (1: one process)"),
    baseline_code: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="another checkout started in turns with this one (`git worktree add /tmp/base <commit>`)"),
    idle: float = typer.Option(1.0, min=0.1, help="the servers' GANSERVE_REMEASURE_IDLE_S"),
    timeout: float = typer.Option(60.0, min=1.0, help="seconds to wait for a server's first idle re-timing"),
    intra_op_threads: int = typer.Option(2, min=1, help="the servers' GANSERVE_INTRA_OP_THREADS"),
    out: Optional[Path] = typer.Option(Path("bench/results/warmup-latest.json"), help="JSON report"),
) -> None:
    """How far a quiet start's warm-up timing is from the model's speed (its idle re-measure), per start, one process and --workers."""
    from bench.warmup import run_warmup_bench

    run_warmup_bench(repository, model_names(model, repository)[0], starts, counts(workers, "--workers", 1, "1,2"), baseline_code, idle, timeout,
                     out, intra_op_threads=intra_op_threads)


def bench_startup_command(
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    starts: int = typer.Option(3, min=1, max=50, help="server starts per code and per --workers count"),
    workers: str = typer.Option("1", help="comma-separated `--workers` counts (1: one process)"),
    baseline_code: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="another checkout started in turns with this one (`git worktree add /tmp/base <commit>`)"),
    out: Optional[Path] = typer.Option(Path("bench/results/startup-latest.json"), help="JSON report"),
) -> None:
    """How long `ganserve serve` takes from launch to ready, and the CPU it spends, against another checkout in turns."""
    from bench.startup import run_startup_bench

    run_startup_bench(repository, starts, counts(workers, "--workers", 1, "1,2"), baseline_code, out)


def bench_hugepages_command(
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    rounds: int = typer.Option(2, min=1, max=20, help="turns of the two servers"),
    requests: int = typer.Option(5, min=1, max=100, help="requests per case a turn, one at a time"),
    threads: int = typer.Option(2, min=1, help="the servers' GANSERVE_INTRA_OP_THREADS"),
    out: Optional[Path] = typer.Option(Path("bench/results/hugepages-latest.json"), help="JSON report"),
) -> None:
    """A 256² upscale and a 1024² translate through servers with GANSERVE_HUGE_PAGES off and on, in turns."""
    from bench.hugepages import run_hugepages_bench

    run_hugepages_bench(repository, rounds, requests, out, threads)


def bench_image_compute_command(
    baseline_code: Path = typer.Option(..., "--baseline-code", exists=True, file_okay=False,
                                       help="another ganserve checkout to compare (say `git worktree add /tmp/base HEAD~1`)"),
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    rounds: int = typer.Option(2, min=1, max=20, help="turns of the two servers"),
    requests: int = typer.Option(5, min=1, max=100, help="requests per case a turn, one at a time"),
    stream_seconds: float = typer.Option(8.0, min=1.0, help="seconds of the upscale stream a turn"),
    threads: int = typer.Option(2, min=1, help="the servers' GANSERVE_INTRA_OP_THREADS"),
    out: Optional[Path] = typer.Option(Path("bench/results/image-compute-latest.json"), help="JSON report"),
) -> None:
    """A 256² upscale, a 128² upscale stream and a 1024² translate through this code and another checkout, servers in turns."""
    from bench.image_compute import run_image_compute_bench

    run_image_compute_bench(repository, baseline_code, rounds, requests, stream_seconds, out, threads)


def bench_claims_command(
    baseline_code: Optional[Path] = typer.Option(None, "--baseline-code", exists=True, file_okay=False,
                                                 help="another ganserve checkout to compare (say `git worktree add /tmp/base HEAD~1`)"),
    repository: Path = typer.Option(Path("model_repository"), "--repository", exists=True, file_okay=False),
    scenarios: str = typer.Option(",".join(("starve", "squat_one", "squat_rot", "renew", "crowd")),
                                  help="comma-separated: starve, squat_one, squat_rot, renew, crowd"),
    duration: float = typer.Option(30.0, min=2.0, help="seconds a scenario"),
    room_mib: int = typer.Option(400, min=50, help="MiB of the memory budget left for requests"),
    out: Optional[Path] = typer.Option(Path("bench/results/claims-latest.json"), help="JSON report"),
) -> None:
    """Who gets the memory budget's room when it is short: benign clients, a large one, an attacker; this code and another checkout in turns."""
    from bench.claims import SCENARIOS, run_claims_bench

    chosen = [name.strip() for name in scenarios.split(",") if name.strip()]
    if not chosen or set(chosen) - set(SCENARIOS):
        raise typer.BadParameter(f"scenarios are among {', '.join(SCENARIOS)}", param_hint="--scenarios")
    run_claims_bench(repository, baseline_code, chosen, duration, room_mib * 2**20, out)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
    app.command("bench-upscale")(bench_upscale_command)
    app.command("bench-soak")(bench_soak_command)
    app.command("bench-ray")(bench_ray_command)
    app.command("bench-limits")(bench_limits_command)
    app.command("bench-estimates")(bench_estimates_command)
    app.command("bench-animation")(bench_animation_command)
    app.command("bench-arena")(bench_arena_command)
    app.command("bench-encoding")(bench_encoding_command)
    app.command("bench-data")(bench_data_command)
    app.command("bench-contention")(bench_contention_command)
    app.command("bench-warmup")(bench_warmup_command)
    app.command("bench-startup")(bench_startup_command)
    app.command("bench-hugepages")(bench_hugepages_command)
    app.command("bench-image-compute")(bench_image_compute_command)
    app.command("bench-claims")(bench_claims_command)
