"""The small CNN whose penultimate layer is the project's feature space for digits metrics.

Standard FID needs Inception weights that cannot be downloaded here, so digits FID/KID/precision/
recall use this network instead (trained on the train split only; weights ship with the repo).
"""
from __future__ import annotations

import torch
from torch import nn


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
        nn.MaxPool2d(2),
    )


class DigitsClassifier(nn.Module):
    """[B, 1, 32, 32] in [-1, 1] → logits [B, num_classes]; `features` gives [B, feature_dim]."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 64, channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_block(channels, 32), conv_block(32, 64), conv_block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(128, feature_dim), nn.ReLU(True))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ShapesPredictor(nn.Module):
    """Reads the generating factors back off a `shapes` image: [B, 3, 32, 32] in [-1, 1] →
    class logits [B, 3] and regressed factors [B, 5] = (size, x, y, cos 2πhue, sin 2πhue).
    Its penultimate layer is the feature space of shapes FID/KID; its readings measure edits."""

    REGRESSED = ("size", "x", "y", "hue_cos", "hue_sin")

    def __init__(self, num_classes: int = 3, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_block(3, 32), conv_block(32, 64), conv_block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(128, feature_dim), nn.ReLU(True))
        self.head = nn.Linear(feature_dim, num_classes)
        self.regress = nn.Linear(feature_dim, len(self.REGRESSED))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phi = self.features(x)
        return self.head(phi), self.regress(phi)
