"""A small CNN that tells two CycleGAN domains apart, trained on the real images of each domain
(the training halves) and checked on held-out real images before it judges translations. Used for
domains no shipped network reads (thin vs thick strokes); shape domains use the shapes predictor."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def domain_cnn(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(16, 32, 3, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(32, 64, 3, 2, 1), nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2),
    )


def train_domain_classifier(a: torch.Tensor, b: torch.Tensor, held_a: torch.Tensor, held_b: torch.Tensor,
                            epochs: int = 5, seed: int = 0) -> tuple[nn.Module, float]:
    """(classifier: logit 0 = domain A, 1 = domain B; its accuracy on the held-out real images)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = domain_cnn(a.shape[1])
    x, y = torch.cat([a, b]), torch.cat([torch.zeros(len(a)), torch.ones(len(b))]).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(64):
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (torch.cat([model(held_a).argmax(1) == 0, model(held_b).argmax(1) == 1]).float().mean().item())
    return model, accuracy
