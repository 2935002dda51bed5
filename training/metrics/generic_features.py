"""Feature spaces for image sets the project has no trained judge for (a user's image folder,
MNIST, CIFAR-10, shapes at sizes other than 32 px), so that every run can keep a best checkpoint.

Two candidates, measured against the real judges on digits and shapes (`training/judge_study.py`,
docs/results.md "Generic judge"):

- `random_conv_features`: a fixed random convolutional network (seeded weights, nothing trained).
  Random conv features keep local structure (edges, blobs, textures) and the distances between
  images in proportion, which is what KID needs; they cost nothing and are identical across runs.
- `autoencoder_features`: the same encoder trained as an autoencoder on the run's own training
  images, its bottleneck as the feature space: fitted to the data, but trained at the first
  evaluation (seconds) and only as good as its few hundred steps.

The runs use the random network (it tracked the real judges better; see the study).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.data import as_floats

JUDGE_SIDE = 32  # images are resized to 32x32 before the network: the judge sees one scale
RANDOM_SEED = 0


def encoder(channels: int) -> nn.Sequential:
    """[B, C, 32, 32] → [B, 128, 4, 4]: three stride-2 stages after a stride-1 stem."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(128, 128, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
    )


def at_judge_size(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (uint8 pixels scaled) at the judge's 32x32."""
    images = as_floats(images)
    if images.shape[-1] == JUDGE_SIDE and images.shape[-2] == JUDGE_SIDE:
        return images
    return F.interpolate(images, size=(JUDGE_SIDE, JUDGE_SIDE), mode="area" if images.shape[-1] > JUDGE_SIDE else "bilinear", align_corners=None if images.shape[-1] > JUDGE_SIDE else False)


@torch.no_grad()
def pooled_features(net: nn.Module, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """[N, 512]: the encoder's [128, 4, 4] map pooled to 2x2, so coarse layout survives."""
    out = [F.adaptive_avg_pool2d(net(at_judge_size(images[i : i + batch_size]).cpu()), 2).flatten(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).double().numpy()


def random_conv_net(channels: int, seed: int = RANDOM_SEED) -> nn.Sequential:
    """The fixed random encoder: Kaiming-uniform weights from `seed` (a private generator, so the
    caller's random state is untouched)."""
    with torch.random.fork_rng(devices=[]):  # nn.Conv2d's own init draws from the global RNG
        net = encoder(channels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Conv2d):
                fan_in = layer.weight[0].numel()
                bound = (6 / ((1 + 0.2**2) * fan_in)) ** 0.5
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
                layer.bias.zero_()
    return net.eval().requires_grad_(False)


class RandomConvFeatures:
    """Featurizer: images → [N, 512] features of the fixed random encoder."""

    name = "random_conv"

    def __init__(self, channels: int, seed: int = RANDOM_SEED) -> None:
        self.net = random_conv_net(channels, seed)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return pooled_features(self.net, images)


class AutoencoderFeatures:
    """Featurizer: the encoder trained for `steps` as an autoencoder on `train_images` (seeded,
    on a private generator), its pooled bottleneck as features."""

    name = "autoencoder"

    def __init__(self, train_images: torch.Tensor, steps: int = 200, batch_size: int = 32, seed: int = RANDOM_SEED) -> None:
        channels = train_images.shape[1]
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = encoder(channels)
            decoder = nn.Sequential(
                nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                nn.Conv2d(32, channels, 3, padding=1), nn.Tanh(),
            )
        optimizer = torch.optim.Adam([*self.net.parameters(), *decoder.parameters()], lr=1e-3)
        images = at_judge_size(train_images)
        for _ in range(steps):
            batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
            loss = F.mse_loss(decoder(self.net(batch)), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.net.eval().requires_grad_(False)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return pooled_features(self.net, images)
