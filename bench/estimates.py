"""`ganserve bench-estimates`: how close admission's compute estimate is for images larger than
warm-up ran: a whole image sent through an upscale graph by v2 infer (the upscale route cuts
tiles; v2 sends the image as it is), or a translate past the largest warmed size.

One server, the upscale model alone, idle but for these requests, sent one at a time, each side
`repeats` times in a row. Per request: the server's own compute time (its `Server-Timing`
`compute` stage) against what admission counted for it (`estimate`), and against the tile fit
scaled by the pixels alone (what admission counted before `GraphCost.size_factor`; from the cost
`GET /v1/models/{name}` lists). The first request of a size meets the prior; the later ones what
the earlier batches of its size class showed. Observed over estimated above 1 is an
under-estimate: a request admitted to finish in its deadline that may not.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from bench.fairness import server_timing
from bench.limits import model_figures
from bench.runner import machine, write_report
from bench.server import launched_server


def infer_whole_image(client: httpx.Client, model: str, side: int, seed: int) -> dict[str, float]:
    """The server's stages (seconds) for one v2 infer of a `side`² image (binary in and out)."""
    image = np.random.default_rng(seed).uniform(-1, 1, (1, 3, side, side)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "image", "shape": list(image.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": image.nbytes}}],
                         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    answer = client.post(f"/v2/models/{model}/infer", content=header + image.tobytes(),
                         headers={"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))})
    return stages_of(answer, f"a {side}² v2 infer")


def translate_image(client: httpx.Client, model: str, side: int, seed: int) -> dict[str, float]:
    """The server's stages (seconds) for one translate of a `side`² PNG (npy out: the cheapest encoding)."""
    ramp = np.add.outer(np.arange(side), np.arange(side)) * (1 + seed) % 256  # smooth: a noise PNG of 2048² passes the upload limit
    pixels = np.stack([ramp, ramp.T, 255 - ramp], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    answer = client.post(f"/v1/models/{model}/translate?format=npy", content=buffer.getvalue(), headers={"content-type": "image/png"})
    return stages_of(answer, f"a {side}² translate")


def stages_of(answer: httpx.Response, what: str) -> dict[str, float]:
    """The answer's `estimate` and `compute` stages (seconds); a refusal ends the bench, saying why."""
    if answer.status_code != 200:
        raise SystemExit(f"{what}: {answer.status_code} {answer.text[:300]}")
    return {stage: server_timing(answer.headers["server-timing"], stage) / 1000 for stage in ("estimate", "compute")}


def run_estimates_bench(repository: Path, model: str, sides: list[int], repeats: int, out: Path | None) -> dict:
    with launched_server(repository, models=model, request_timeout_s=120, remeasure_idle_s=3600) as (_, url), \
            httpx.Client(base_url=url, timeout=300) as client:
        cost = model_figures(url, model)["cost"]
        kind = client.get(f"/v1/models/{model}").json()["versions"][-1]["kind"]
        rows = []
        for side in sides:
            ratio = side * side / cost["unit_pixels"]
            by_pixels = cost["batch_overhead_seconds"] + cost["seconds_per_unit"] * ratio
            for turn in range(repeats):
                stages = (translate_image if kind == "translation" else infer_whole_image)(client, model, side, turn)
                rows.append({"side": side, "turn": turn + 1, "units": round(ratio, 2), "observed_s": round(stages["compute"], 3),
                             "estimate_by_pixels_s": round(by_pixels, 3), "estimate_s": round(stages["estimate"], 3),
                             "observed_over_by_pixels": round(stages["compute"] / by_pixels, 3),
                             "observed_over_estimate": round(stages["compute"] / stages["estimate"], 3)})
        learned = model_figures(url, model)["cost"]
    report = {"machine": machine(), "model": model, "repeats": repeats, "cost": cost, "cost_after": learned, "rows": rows}
    print_estimates_report(report)
    if out is not None:
        write_report(report, out)
    return report


def print_estimates_report(report: dict) -> None:
    table = Table(title=f"images past warm-up's sizes through {report['model']}: compute against admission's estimate "
                        f"(prior exponent {report['cost'].get('large_item_exponent', 1.0)}) — {report['machine']}")
    for column in ("side", "turn", "units", "observed s", "by pixels s", "estimate s", "observed / by pixels", "observed / estimate"):
        table.add_column(column)
    for row in report["rows"]:
        table.add_row(str(row["side"]), str(row["turn"]), f"{row['units']:.1f}", f"{row['observed_s']:.2f}",
                      f"{row['estimate_by_pixels_s']:.2f}", f"{row['estimate_s']:.2f}", f"{row['observed_over_by_pixels']:.2f}",
                      f"{row['observed_over_estimate']:.2f}")
    Console().print(table)
    print("size factors learned:", report["cost_after"].get("size_factors"))
