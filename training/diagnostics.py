"""Watches a run for the failure signatures the seed notes describe, and says so in the log:

- D loss sitting near 0: the discriminator wins outright and G's gradient is about to vanish;
- G's gradient norm vanishing: G has stopped moving (the quiet failure of the saturating loss);
- the fixed latent panel's diversity collapsing: mode collapse, seen as near-identical samples.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

WINDOW = 100
D_LOSS_FLOOR = 0.05
G_GRAD_FLOOR = 1e-4
DIVERSITY_FLOOR = 0.25  # panel diversity relative to the real data's


def mean_pairwise_distance(samples: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """Mean distance between two samples; with labels, between two samples of one class
    (a conditional G that ignores z draws one image per class, which only this exposes)."""
    if labels is not None:
        groups = [samples[labels == c] for c in labels.unique()]
        return sum(mean_pairwise_distance(g) for g in groups if len(g) > 1) / max(1, sum(len(g) > 1 for g in groups))
    flat = samples.flatten(1).double()
    distances = torch.cdist(flat, flat)
    n = len(flat)
    return float(distances.sum() / (n * (n - 1)))


@dataclass
class CollapseMonitor:
    logistic_loss: bool  # D-loss-near-zero only means something for bounded-below losses
    real_diversity: float
    d_losses: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    g_grads: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    silenced_until: dict[str, int] = field(default_factory=dict)

    def warn_once(self, kind: str, step: int, message: str) -> list[str]:
        """At most one warning of each kind per 5 windows, so a stuck run does not flood the log."""
        if step < self.silenced_until.get(kind, 0):
            return []
        self.silenced_until[kind] = step + 5 * WINDOW
        return [f"step {step}: {message}"]

    def observe_step(self, step: int, loss_d: float, grad_norm_g: float) -> list[str]:
        self.d_losses.append(loss_d)
        self.g_grads.append(grad_norm_g)
        if len(self.d_losses) < WINDOW:
            return []
        warnings = []
        mean_d = sum(self.d_losses) / WINDOW
        if self.logistic_loss and abs(mean_d) < D_LOSS_FLOOR:
            warnings += self.warn_once("d_loss", step, f"D loss sits near 0 ({mean_d:.4f} over {WINDOW} steps): the discriminator is winning; expect vanishing G gradients")
        mean_g = sum(self.g_grads) / WINDOW
        if mean_g < G_GRAD_FLOOR:
            warnings += self.warn_once("g_grad", step, f"G gradient norm vanished ({mean_g:.2e} over {WINDOW} steps): the generator has stopped learning")
        return warnings

    def observe_panel(self, step: int, panel: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[float, list[str]]:
        """Returns the panel's diversity relative to real data (within class when labelled), and any warning."""
        relative = mean_pairwise_distance(panel, labels) / max(self.real_diversity, 1e-12)
        if relative < DIVERSITY_FLOOR:
            return relative, self.warn_once("diversity", step, f"sample diversity collapsed: the fixed panel spreads {relative:.2f}x as much as real data (mode collapse?)")
        return relative, []
