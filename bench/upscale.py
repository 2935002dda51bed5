"""`ganserve bench-upscale`: 256x256 → 1024x1024 (x4) through the real server, beside the bare
forward pass of the same runtime; for a translation model, 256x256 through `/translate` beside one
forward pass of the whole padded frame.

Scenarios: one client on the upscale stream (WebSocket, a frame sent when the last came back), and
`concurrency` clients each post one 256 px PNG (a held-out photo crop) in a loop and
ask for JPEG (real-time streams cannot afford PNG: a 1024 px PNG costs a core ~0.1 s). The
ceiling is the runtime alone on the same tiles the service cuts (one frame = its tile batch), and
on the whole frame in one pass (no tiling overhead), plus the cost of assembling one output frame
on the host from its tiles (blending float tiles, or placing tiles already uint8: overlap 0) and of
encoding it.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from bench.ceiling import timed
from bench.load import run_load, served_precision
from bench.runner import machine, write_report
from bench.server import launched_server
from service.imaging import encode, to_uint8
from service.repository import scan_repository
from service.runtimes import load_runtime
from service.settings import Settings
from service.model_config import serving_config
from service.registry import IMAGE_TO_IMAGE
from service.tiling import TilePlacer, blend_tiles, cut_tiles, padded_size, pad_to, plan_tiles

console = Console(width=None if sys.stdout.isatty() else 200)  # piped to a file: wide enough for the tables


def test_frame(size: int) -> np.ndarray:
    """A size x size crop of a held-out photo (scikit-image's chelsea), RGB uint8."""
    import skimage.data

    photo = skimage.data.chelsea()
    return np.asarray(Image.fromarray(photo).resize((size, size), Image.Resampling.BICUBIC))


def measure_forward(entry, runtime_kind: str, device: str, threads: int, frame: np.ndarray, tile: int, overlap: int, frames_per_batch: list[int], seconds: float,
                    precision: str = "fp32") -> list[dict]:
    runtime = load_runtime(entry, runtime_kind, device, threads, precision=precision)
    x = (frame.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)
    grid = plan_tiles(frame.shape[0], frame.shape[1], tile, overlap)
    tiles = np.stack(cut_tiles(x, grid))
    rows = []
    for frames in frames_per_batch:
        batch = np.ascontiguousarray(np.concatenate([tiles] * frames))
        per_call = timed(seconds, lambda: runtime.run({"image": batch}))
        rows.append({"what": f"tiles: {frames} frame(s) = {len(batch)} tiles of {tile} px per forward", "frames_per_s": frames / per_call, "tiles": len(batch)})
    return rows + [whole_frame(runtime, entry, x, seconds)]


def whole_frame(runtime, entry, x: np.ndarray, seconds: float) -> dict:
    """The frame [C, H, W] in one forward pass, mirror-padded to the network's size multiple."""
    whole = np.ascontiguousarray(pad_to(x, *padded_size(x.shape[1], x.shape[2], entry.spec["size_multiple"]))[None])
    per_call = timed(seconds, lambda: runtime.run({"image": whole}))
    return {"what": f"whole frame {whole.shape[2]}x{whole.shape[3]}, one forward (no tiling)", "frames_per_s": 1 / per_call, "tiles": 0}


def measure_whole_frame(entry, runtime_kind: str, device: str, threads: int, frame: np.ndarray, seconds: float, precision: str = "fp32") -> list[dict]:
    runtime = load_runtime(entry, runtime_kind, device, threads, precision=precision)
    return [whole_frame(runtime, entry, (frame.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1), seconds)]


def measure_encoding(size: int, seconds: float) -> dict[str, float]:
    image = np.asarray(Image.fromarray(test_frame(size // 4)).resize((size, size), Image.Resampling.BICUBIC))
    return {fmt: timed(seconds, lambda f=fmt: encode(image, f)) * 1000 for fmt in ("jpeg", "png", "webp")}


def measure_assembly(size: int, scale: int, tile: int, overlap: int, seconds: float) -> dict[str, float]:
    """ms of host work per frame: cutting the decoded frame into the tiles the batcher stacks (the
    side that decides whether cutting is worth moving onto the device: the frame crosses to the
    device either way, whole or as tiles), and turning its tile outputs into the uint8 image, per
    path (service/upscaling.py): float tiles blended then converted (any overlap; the configured one),
    and, at overlap 0, tiles converted one by one then placed (ONNX Runtime on a CPU converts on
    the lane's thread) or only placed (the torch runtimes, and ONNX Runtime on CUDA, convert on
    the device: what is left on the host)."""
    rng = np.random.default_rng(0)

    def outputs(grid) -> list[np.ndarray]:
        side = grid.tile * scale
        return [rng.uniform(-1, 1, (3, side, side)).astype(np.float32) for _ in range(grid.rows * grid.cols)]

    def blend(grid, tiles) -> np.ndarray:
        return to_uint8(blend_tiles(tiles, grid, scale)[None], (-1, 1))

    def place(grid, tiles, convert: bool) -> np.ndarray:
        placer = TilePlacer(grid, scale, 3)
        for index, output in enumerate(tiles):
            placer.add(index, to_uint8(output[None], (-1, 1))[0] if convert else output)
        return placer.result()

    blended = plan_tiles(size, size, tile, overlap)
    seamless = plan_tiles(size, size, tile, 0)
    float_tiles, pixel_tiles = outputs(blended), outputs(seamless)
    uint8_tiles = [np.ascontiguousarray(to_uint8(t[None], (-1, 1))[0]) for t in pixel_tiles]  # as torch hands them over
    frame = rng.uniform(-1, 1, (3, size, size)).astype(np.float32)
    return {f"cut the frame into {len(float_tiles)} tiles (overlap {overlap}) + stack them": timed(seconds, lambda: np.stack(cut_tiles(frame, blended))) * 1000,
            f"blend {len(float_tiles)} float tiles (overlap {overlap}) + convert": timed(seconds, lambda: blend(blended, float_tiles)) * 1000,
            f"convert + place {len(pixel_tiles)} tiles (overlap 0)": timed(seconds, lambda: place(seamless, pixel_tiles, True)) * 1000,
            f"place {len(pixel_tiles)} uint8 tiles (overlap 0, converted on the device)": timed(seconds, lambda: place(seamless, uint8_tiles, False)) * 1000}


def measure_stream(url: str, model: str, frame: bytes, fmt: str, duration_s: float) -> dict:
    """One client on the upscale stream (WebSocket), closed loop: the next frame is sent when the
    last answer has arrived, so nothing is dropped and frames/s is what one stream sustains."""
    import json
    import time

    from websockets.sync.client import connect

    latencies: list[float] = []
    with connect(url.replace("http://", "ws://") + f"/v1/models/{model}/upscale/stream?format={fmt}", max_size=2**26) as ws:
        json.loads(ws.recv(timeout=60))  # ready
        started = time.perf_counter()
        while time.perf_counter() - started < duration_s or not latencies:
            sent = time.perf_counter()
            ws.send(frame)
            answer = json.loads(ws.recv(timeout=120))
            if answer["type"] != "frame":
                raise RuntimeError(f"the stream answered {answer}")
            ws.recv(timeout=120)  # the image
            latencies.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"frames": len(latencies), "frames_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "server_stats": answer["stats"]}


def run_upscale_bench(repository: Path, model: str, runtime: str, concurrencies: list[int], duration_s: float, size: int, fmt: str,
                      max_batch_size: int, threads: int, out: Path | None, measure_s: float = 3.0, graph_capture: str = "none", workers: int = 1) -> dict:
    """`measure_s`: how long each bare forward is repeated (encoding: a third of it); a report's
    figures want seconds, a smoke test of the tool a fraction of one."""
    entries = [e for e in scan_repository(repository) if e.name == model]
    if not entries:
        raise SystemExit(f"no model {model!r} in {repository}")
    entry = max(entries, key=lambda e: e.version)
    if entry.kind not in IMAGE_TO_IMAGE:
        raise SystemExit(f"{model} is a {entry.kind} model, not an image-to-image model")
    endpoint = IMAGE_TO_IMAGE[entry.kind]
    from bench.runner import _cuda

    device = "cuda" if runtime != "onnx" and _cuda() else "cpu"
    settings = Settings(runtime=runtime, graph_capture=graph_capture)
    config = serving_config(entry, settings)  # the entry's own tile, where it carries one
    frame = test_frame(size)
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    request = {"content": buffer.getvalue(), "headers": {"content-type": "image/png"}}
    loads = []
    with launched_server(repository, log_level="warning", runtime=runtime, intra_op_threads=threads, max_batch_size=max_batch_size, max_queue_delay_ms=0,
                         max_queue_size=100_000, graph_capture=graph_capture, workers=workers, models=[model]) as (process, url):
        precision = served_precision(url, model)
        for c in concurrencies:
            result = run_load(url, model, f"{size}→{size * entry.spec['scale']} px, {fmt} out", {}, c, duration_s, path=f"/v1/models/{model}/{endpoint}?format={fmt}",
                              request=request, pid=process.pid)
            loads.append(result.to_dict())
        stream = measure_stream(url, model, buffer.getvalue(), fmt, duration_s) if endpoint == "upscale" else None
    if endpoint == "upscale":
        grid = plan_tiles(size, size, config.upscale_tile, config.upscale_overlap)
        tiles_per_frame = grid.rows * grid.cols
        forward = measure_forward(entry, runtime, device, threads, frame, config.upscale_tile, config.upscale_overlap,
                                  sorted({1, max(1, max_batch_size // tiles_per_frame)}), seconds=measure_s, precision=precision)
    else:  # translate: the whole frame, mirror-padded to the network's size multiple, in one pass
        tiles_per_frame = 1
        forward = measure_whole_frame(entry, runtime, device, threads, frame, seconds=measure_s, precision=precision)
    report = {"machine": machine(), "model": model, "runtime": runtime, "precision": precision, "graph_capture": graph_capture, "workers": workers, "device": device, "size": size, "scale": entry.spec["scale"], "format": fmt,
              "endpoint": endpoint, "tile": config.upscale_tile if endpoint == "upscale" else None, "overlap": config.upscale_overlap if endpoint == "upscale" else None,
              "tiles_per_frame": tiles_per_frame, "max_batch_size": max_batch_size,
              "load": loads, "stream": stream, "forward": forward, "encode_ms": measure_encoding(size * entry.spec["scale"], measure_s / 3),
              "assembly_ms": measure_assembly(size, entry.spec["scale"], config.upscale_tile, config.upscale_overlap, measure_s / 3) if endpoint == "upscale" else {}}
    print_upscale_report(report)
    write_report(report, out)
    return report


def print_upscale_report(report: dict) -> None:
    tiling = (f"tiles {report['tile']} px / overlap {report['overlap']} → {report['tiles_per_frame']} tiles per {report['size']} px frame"
              if report.get("endpoint", "upscale") == "upscale" else f"whole {report['size']} px frame per request")
    processes = f", {report['workers']} fronts + one engine" if report.get("workers", 1) > 1 else ""
    console.print(f"[bold]{report['model']}[/] x{report['scale']} on {report['machine']}, runtime {report['runtime']} "
                  f"({report['device']}, {report.get('precision') or 'fp32'}){processes}, {tiling}")
    table = Table(title="service (HTTP, real server)")
    for column in ("scenario", "clients", "frames/s", "p50 ms", "p99 ms", "errors", "mean tiles per batch", "queue ms per tile", "compute/encode ms per request"):
        table.add_column(column, justify="right" if column != "scenario" else "left")
    for r in report["load"]:
        errors = sum(v for k, v in r["statuses"].items() if k != "200")
        # the queue histogram observes every tile; compute and encode are per batch and per frame
        queue_per_tile = r["stage_ms"]["queue"] / report["tiles_per_frame"]
        stages = f"{r['stage_ms']['compute']:.0f}/{r['stage_ms']['encode']:.0f}"
        table.add_row(r["scenario"], str(r["concurrency"]), f"{r['requests_per_s']:.2f}", f"{r['latency_ms']['p50']:.0f}", f"{r['latency_ms']['p99']:.0f}",
                      str(errors), f"{r['mean_batch_items']:.1f}", f"{queue_per_tile:.0f}", stages)
    console.print(table)
    if report.get("stream"):
        stream = report["stream"]
        console.print(f"one upscale stream (WebSocket, closed loop): {stream['frames_per_s']:.2f} frames/s, p50 {stream['p50_ms']:.0f} ms, "
                      f"p99 {stream['p99_ms']:.0f} ms over {stream['frames']} frames")
    ceiling = Table(title="bare forward pass (same runtime, no HTTP)")
    ceiling.add_column("what")
    ceiling.add_column("frames/s", justify="right")
    for row in report["forward"]:
        ceiling.add_row(row["what"], f"{row['frames_per_s']:.2f}")
    console.print(ceiling)
    if report.get("assembly_ms"):
        console.print("assembling one output frame on the host: " + ", ".join(f"{k} {v:.1f} ms" for k, v in report["assembly_ms"].items()))
    console.print("encoding one output frame: " + ", ".join(f"{k} {v:.1f} ms" for k, v in report["encode_ms"].items()))

