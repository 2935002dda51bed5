"""Drawing samples from a trained generator: latents on the CPU from a seed, so a seed fixes its
samples whatever the batch size or device."""
from __future__ import annotations

import torch
from torch import nn

from models.spec import ModelSpec


def latents(spec: ModelSpec, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, spec.z_dim, generator=torch.Generator().manual_seed(seed))


def balanced_labels(spec: ModelSpec, n: int) -> torch.Tensor | None:
    """0, 1, …, C-1, 0, 1, … for conditional models (equal class counts), None otherwise."""
    return torch.arange(n) % spec.num_classes if spec.kind == "conditional" else None


@torch.no_grad()
def generate(generator: nn.Module, spec: ModelSpec, z: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 500) -> torch.Tensor:
    """G(z[, labels]) in eval mode, in batches, returned on the CPU."""
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    outputs = []
    for start in range(0, len(z), batch_size):
        z_part = z[start : start + batch_size].to(device)
        if spec.kind == "conditional":
            if labels is None:
                raise ValueError("a conditional generator needs class labels")
            outputs.append(generator(z_part, labels[start : start + batch_size].to(device)).float().cpu())
        else:
            outputs.append(generator(z_part).float().cpu())
    generator.train(was_training)
    return torch.cat(outputs)
