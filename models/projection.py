"""Projection (inversion) of an image into a style generator's W+ space by optimisation.

Starting from w_avg at every layer, Adam moves ws to minimise a pixel loss plus, when a feature
network is given, a distance between its features of the target and of the reconstruction
(a perceptual term that cares about shape more than about exact pixels). Shared by training
(to measure reconstruction PSNR) and the service (the /project job).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Projection:
    ws: torch.Tensor  # [num_ws, w_dim]
    image: torch.Tensor  # [C, H, W] reconstruction
    psnr: float  # of the reconstruction against the target, images in [-1, 1]
    steps: int


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak range 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def project(synthesis: nn.Module, target: torch.Tensor, w_avg: torch.Tensor, num_ws: int, steps: int = 200, lr: float = 0.05,
            features: Callable[[torch.Tensor], torch.Tensor] | None = None, feature_weight: float = 0.1,
            progress: Callable[[int, float], bool] | None = None) -> Projection:
    """`target` [C, H, W] in [-1, 1]. `progress(step, loss)` may return False to stop early."""
    synthesis = synthesis.eval().requires_grad_(False)
    ws = w_avg.detach().clone()[None].repeat(num_ws, 1).requires_grad_(True)  # [num_ws, w_dim]
    optimizer = torch.optim.Adam([ws], lr=lr)
    target_batch = target[None]
    target_features = features(target_batch).detach() if features is not None else None
    done = 0
    for step in range(steps):
        image = synthesis(ws[None])
        loss = F.mse_loss(image, target_batch)
        if target_features is not None:
            loss = loss + feature_weight * F.mse_loss(features(image), target_features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if progress is not None and progress(done, loss.item()) is False:
            break
    with torch.no_grad():
        image = synthesis(ws.detach()[None])[0]
    return Projection(ws.detach(), image, psnr(image, target), done)


@dataclass
class StepMemory:
    weights: int  # the modules' parameters and buffers
    activations: int  # what one step adds while it runs: saved activations and the backward's gradients


def step_memory(modules: list[nn.Module], forward: Callable[[], torch.Tensor]) -> StepMemory:
    """What one optimisation step through `forward` holds, counted without running it: call with
    `modules` built on the meta device and `forward` making meta inputs, so nothing is allocated
    however large the generator. The step holds the modules' weights, every activation autograd
    saves for the backward pass (counted once per storage, weights excluded) and, while the
    backward runs, gradients the size of the largest of them (four such: with them the count of
    StyleGAN2 projection steps at 64²–256², weights 6–109 MiB, came within −5 % to +6 % of their
    measured peaks; the service adds a margin, service/projection.py)."""
    weights = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for module in modules
               for t in (*module.parameters(), *module.buffers())}
    saved: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        forward()
    return StepMemory(sum(weights.values()), sum(saved.values()) + 4 * max(saved.values(), default=0))
