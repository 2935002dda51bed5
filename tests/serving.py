"""Helpers that build a real model repository and start the real server as a subprocess."""
from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import httpx
import torch

from bench.server import launched_server
from tests.parallel import run_two_at_a_time
from training.config import TrainConfig, load_config
from training.export import export_run
from training.image2image.config import I2IConfig, load_i2i_config
from training.image2image.export import export_i2i_run
from training.image2image.train import train_image_to_image
from training.loop import train

REPO = Path(__file__).resolve().parents[1]


def tiny_run(config: str, out: Path) -> Path:
    cfg = load_config(REPO / "configs" / f"{config}.yaml").model_dump()
    cfg.update(max_steps=2, sample_every=2, checkpoint_every=2, batch_size=8)
    cfg["eval"].update(every=2, num_samples=50)
    cfg["model"].update(width=8)
    train(TrainConfig.model_validate(cfg), out, show_progress=False)
    return out


def tiny_style_run(out: Path) -> Path:
    cfg = load_config(REPO / "configs" / "stylegan-shapes.yaml").model_dump()
    cfg.update(max_steps=2, sample_every=2, checkpoint_every=2, batch_size=4, panel_size=8)
    cfg["data"].update(size=64, resolution=16)
    cfg["model"].update(width=4, max_channels=16, w_dim=8, z_dim=8, mapping_layers=2)
    cfg["eval"].update(every=2, num_samples=16)
    train(TrainConfig.model_validate(cfg), out, show_progress=False)
    return out


def tiny_i2i_run(config: str, out: Path, **changes) -> Path:
    """An image-to-image config shrunk to two real training steps (with both SR phases)."""
    cfg = load_i2i_config(REPO / "configs" / f"{config}.yaml").model_dump()
    cfg.update(max_steps=2, eval_every=2, sample_every=2, batch_size=2)
    cfg["data"].update(size=16, held_out=4)
    cfg["loss"].update(pretrain_steps=1)
    for section, values in changes.items():
        cfg[section].update(values)
    train_image_to_image(I2IConfig.model_validate(cfg), out, show_progress=False)
    return out


def build_image_to_image_entries(root: Path, repo: Path) -> None:
    """edges, gray and upx4: trained and exported (one worker's half of the repository)."""
    export_i2i_run(tiny_i2i_run("pix2pix-edges2shapes", root / "edges", model={"ngf": 4}), "edges", 1, repo, ["onnx", "torchscript"])
    export_i2i_run(tiny_i2i_run("pix2pix-gray2color", root / "gray", model={"ngf": 4}, data={"resolution": 64}), "gray", 1, repo, ["onnx", "torchscript"])
    export_i2i_run(tiny_i2i_run("sr-rrdb-x4", root / "upx4", model={"features": 8, "blocks": 0, "growth": 4}, data={"resolution": 32}), "upx4", 1, repo, ["onnx", "torchscript"])


def build_generator_entries(root: Path, repo: Path, directions: dict[str, torch.Tensor]) -> None:
    """styles, digits and cdigits: trained and exported (the other worker's half)."""
    export_run(tiny_style_run(root / "style"), "styles", 1, repo, ["onnx", "torchscript"], "last", directions=directions)
    export_run(tiny_run("dcgan-digits", root / "dcgan"), "digits", 1, repo, ["onnx", "torchscript"], "last")
    export_run(tiny_run("cdcgan-digits", root / "cdcgan"), "cdigits", 1, repo, ["onnx", "torchscript"], "last")


def build_repository(root: Path) -> Path:
    """digits (unconditional), cdigits (conditional), styles (style, 16 px), edges (pix2pix,
    32 px), gray (pix2pix luma → colour) and upx4 (x4 super-resolution without an RRDB body: its receptive
    field, ~3 input px, stays inside the tiles' blending margin, so tiling must be exact), each
    v1, trained two steps and exported.

    Two halves of similar cost (~50 s each), built at once (tests/parallel.py)."""
    repo = root / "model_repository"
    directions = {"size": torch.nn.functional.normalize(torch.randn(8), dim=0), "hue": torch.nn.functional.normalize(torch.randn(8), dim=0)}
    run_two_at_a_time([(build_image_to_image_entries, (root, repo)), (build_generator_entries, (root, repo, directions))])
    return repo


class Server:
    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process, self.url = process, url

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)

    def wait_loaded(self, timeout_s: float = 120) -> None:
        """Until every model has been tried (none `loading`): for servers started with wait=False
        whose settings keep them unready once loaded (readiness cannot be what is waited for)."""
        deadline = time.monotonic() + timeout_s
        with self.client(timeout=5) as client:  # one client: a polling `httpx.get` costs ~18 ms of CPU beside the warm-up
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    models = client.get("/v1/models").json()["models"]
                    if models and all(model["state"] != "loading" for model in models):
                        return
                time.sleep(0.3)
        raise TimeoutError(f"the models were still loading after {timeout_s} s")

    def wait_for_side(self, model: str, side: int, timeout_s: float = 60) -> None:
        """Until `model` takes image-to-image inputs of `side`² (its listed limits): a warm-up
        slowed by what ran beside it (the fronts starting beside a `--workers` engine measured
        sr-rrdb-x4's tiles 2.4x slower) tightens them until the idle re-measure relaxes them,
        which a server started with a short `remeasure_idle_s` does within seconds."""
        deadline = time.monotonic() + timeout_s
        with self.client(timeout=5) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                    if client.get(f"/v1/models/{model}").json()["versions"][-1]["limits"]["max_input_side"] >= side:
                        return
                time.sleep(0.5)
        raise TimeoutError(f"{model} did not take {side}² inputs within {timeout_s} s")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample over the series matching `labels`."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                series, value = line.rsplit(" ", 1)
                if all(f'{k}="{v}"' in series for k, v in labels.items()):
                    total += float(value)
        return total


@contextlib.contextmanager
def running_server(repository: Path, wait: bool = True, **settings):
    """`ganserve serve` on a free port, as a user starts it; GANSERVE_* variables set the rest
    (one intra-op thread and two encoder threads unless a test says otherwise: 2 cores here)."""
    settings = {"intra_op_threads": 1, "encoder_threads": 2, **settings}
    with launched_server(repository, wait=wait, **settings) as (process, url):
        yield Server(process, url)

