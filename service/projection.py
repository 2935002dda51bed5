"""Projection jobs' networks and their memory: the eager generator (gradients need it, not the
exported graph) and the entry's feature network, built for each job and freed when it ends, and
what a job holds while it runs, counted before it is accepted.

The networks are not kept between jobs: a 1024² generator's weights are hundreds of MiB that the
memory budget would not see once the job that built them released its reservation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from models.classifier import ShapesPredictor
from models.projection import step_memory
from models.spec import ModelSpec
from models.zoo import build_generator
from service.repository import ModelEntry

# what the count leaves out — the target, Adam's state, the loss's temporaries, the allocator's
# slack: real peaks of config-f StyleGAN2 jobs at 64²–256² ran 2–7 % over the count alone
MARGIN = 1.1
SMALL_BUFFERS_BYTES = 8 * 2**20
FEATURE_NETWORKS: dict[str, Callable[[], nn.Module]] = {"shapes_predictor": ShapesPredictor}


@dataclass
class ProjectionNetworks:
    generator: nn.Module
    feature_network: nn.Module | None

    @property
    def features(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.feature_network.features if self.feature_network is not None else None


def projection_networks(entry: ModelEntry, device: str = "cpu") -> ProjectionNetworks:
    """The entry's eager generator and feature network; on `device="meta"` only their structure
    (no weights read, nothing allocated), which is what `projection_bytes` counts on."""
    with torch.device(device):
        generator = build_generator(ModelSpec.from_dict(entry.spec["model"]))
        info = entry.spec.get("feature_network")
        feature_network = FEATURE_NETWORKS[info["name"]]() if info else None
    if device != "meta":
        generator.load_state_dict(load_file(str(entry.file_for("eager"))))
        if feature_network is not None:
            feature_network.load_state_dict(load_file(str(entry.file_within(info["file"]))))
    for network in (generator, feature_network):
        if network is not None:
            network.eval().requires_grad_(False)
    return ProjectionNetworks(generator, feature_network)


def projection_bytes(entry: ModelEntry) -> int:
    """The memory one projection job of `entry` holds at its peak, counted on the meta device in
    well under a second whatever the resolution (`counted_bytes`)."""
    return counted_bytes(projection_networks(entry, "meta"), entry.spec["num_ws"])


def counted_bytes(networks: ProjectionNetworks, num_ws: int) -> int:
    """`networks` built on the meta device: their weights, and the larger of what loading adds
    (the file's copy of the weights, for a moment beside the built modules') and what one
    optimisation step adds (models.projection.step_memory), with a margin."""
    ws = torch.zeros(num_ws, networks.generator.w_avg.shape[-1], device="meta", requires_grad=True)

    def step() -> torch.Tensor:
        image = networks.generator.synthesis(ws[None])
        return networks.features(image) if networks.features is not None else image

    memory = step_memory([n for n in (networks.generator, networks.feature_network) if n is not None], step)
    return int(MARGIN * (memory.weights + max(memory.weights, memory.activations))) + SMALL_BUFFERS_BYTES
