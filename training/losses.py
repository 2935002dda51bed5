"""GAN objectives, written on the discriminator's raw outputs (logits or critic scores).

Each loss is a pair: what D minimises and what G minimises. The logistic losses use softplus
forms, which are the numerically stable spellings of -log σ(x) and -log(1 - σ(x)).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossPair = tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def logistic_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))): the original discriminator objective."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def minimax_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """log(1 - D(G(z))): Goodfellow's saturating form; its gradient vanishes once D wins."""
    return -F.softplus(fake).mean()


def nonsaturating_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)): the non-saturating form everyone trains with."""
    return F.softplus(-fake).mean()


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def critic_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))], the generator side of hinge and Wasserstein losses."""
    return -fake.mean()


def wasserstein_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[D(G(z))] - E[D(x)]: minus the critic's estimate of the Wasserstein-1 distance."""
    return fake.mean() - real.mean()


def lsgan_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake**2).mean()


def lsgan_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((fake - 1) ** 2).mean()


LOSSES: dict[str, LossPair] = {
    "minimax": (logistic_d_loss, minimax_g_loss),
    "nonsaturating": (logistic_d_loss, nonsaturating_g_loss),
    "hinge": (hinge_d_loss, critic_g_loss),
    "wgan": (wasserstein_d_loss, critic_g_loss),
    "wgan-gp": (wasserstein_d_loss, critic_g_loss),
    "lsgan": (lsgan_d_loss, lsgan_g_loss),
}
LOGISTIC = {"minimax", "nonsaturating"}


def loss_pair(name: str) -> LossPair:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose from {sorted(LOSSES)}")
    return LOSSES[name]


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al.): E[(||∇D(x̂)||₂ - 1)²] on random points between real and fake."""
    alpha_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(alpha_shape, generator=generator).to(real.device, real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def path_length_penalty(images: torch.Tensor, ws: torch.Tensor, pl_mean: torch.Tensor, generator: torch.Generator | None = None, decay: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """StyleGAN2's path-length regularisation: a fixed-size step in W should move the image by a
    fixed amount. Returns (penalty, updated running mean of the path lengths); `ws` must require
    grad through `images`."""
    h, w = images.shape[2:]
    noise = torch.randn(images.shape, generator=generator).to(images) / (h * w) ** 0.5
    (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    lengths = grad.pow(2).sum(dim=2).mean(dim=1).sqrt()  # [B]
    new_mean = pl_mean.detach() + decay * (lengths.detach().mean() - pl_mean.detach())
    return (lengths - new_mean).pow(2).mean(), new_mean


def r1_penalty(real_scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al.): E[||∇D(x)||²] on real data; `real` must require grad. Scale by γ/2."""
    (grad,) = torch.autograd.grad(real_scores.sum(), real, create_graph=True)
    return grad.flatten(1).pow(2).sum(dim=1).mean()
