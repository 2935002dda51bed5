"""Quality metrics for a generator on its dataset, used during training (to keep the best
checkpoint) and by `ganserve evaluate`.

Which metrics apply depends on the data: 2-D mixtures get mode coverage; digits and 32 px shapes
get FID, KID, precision/recall and IS in the feature space of the project's own network for
them (and class accuracy for conditional models); every other image set (a user's folder, MNIST,
CIFAR-10, shapes at other sizes) gets KID in the feature space of a fixed random conv net
(`generic_kid`, training/metrics/generic_features.py: chosen over a feature net trained on the
user's data by the study in docs/results.md), so that every run keeps a best checkpoint. Any
image set gets standard FID when InceptionV3 weights are given.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.spec import ModelSpec
from training.config import DataConfig
from training.data.base import TensorData
from training.data.gaussians import mixture
from training.metrics.digits_features import digits_features
from training.metrics.fid import fid_from_features
from training.metrics.generic_features import RandomConvFeatures
from training.metrics.inception_score import inception_score
from training.metrics.kid import kernel_inception_distance
from training.metrics.modes import mode_metrics
from training.metrics.precision_recall import precision_recall
from training.metrics.shapes_features import shapes_readings
from training.sampling import balanced_labels, generate, latents

EVAL_SEED = 12345  # evaluation latents never touch the training RNG


def evaluate_mixture(samples: torch.Tensor, mixture_name: str) -> dict[str, float]:
    gm = mixture(mixture_name)
    return mode_metrics(samples.numpy(), gm.centres.numpy(), gm.std)


def feature_metrics(real: np.ndarray, fake: np.ndarray, prefix: str = "") -> dict[str, float]:
    kid, kid_std = kernel_inception_distance(real, fake, subsets=50, subset_size=min(1000, len(real), len(fake)))
    precision, recall = precision_recall(real, fake, k=3)
    return {f"{prefix}fid": fid_from_features(real, fake), f"{prefix}kid": kid, f"{prefix}kid_std": kid_std, f"{prefix}precision": precision, f"{prefix}recall": recall}


Featurize = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class RealReference:
    """The real side of the feature-space metrics: features of the train set (and held-out set)
    and the real-vs-real floors. Fixed for a run, so computed once rather than at every
    evaluation (10k shapes through the predictor, and the floors, each time otherwise)."""

    featurize: Featurize
    train_features: np.ndarray
    held_features: np.ndarray | None
    floors: dict[str, float]

    @classmethod
    def build(cls, train: TensorData, held_out: TensorData | None, featurize: Featurize) -> RealReference:
        train_features, _ = featurize(train.x)
        held_features, floors = None, {}
        if held_out is not None:
            held_features, _ = featurize(held_out.x)
            floors = {"fid_real_floor": fid_from_features(train_features, held_features),
                      "fid_train_vs_held_out": fid_from_features(held_features, train_features)}
            floors["kid_real_floor"], _ = kernel_inception_distance(train_features, held_features, subset_size=len(held_out))
        return cls(featurize, train_features, held_features, floors)


def evaluate_in_feature_space(samples: torch.Tensor, labels: torch.Tensor | None, reference: RealReference) -> dict[str, float]:
    """FID/KID/precision/recall (+ IS and class accuracy from the network's class probabilities)
    against the train set, and the real-vs-real floors against the held-out set."""
    fake_features, fake_probs = reference.featurize(samples)
    real_features = reference.train_features
    metrics = feature_metrics(real_features, fake_features)
    metrics["inception_score"], _ = inception_score(fake_probs)
    if labels is not None:
        metrics["class_accuracy"] = float((fake_probs.argmax(1) == labels.numpy()).mean())
    if reference.held_features is not None:
        # FID is biased by sample count: compare the floor with the same number of generated samples
        n = len(reference.held_features)
        metrics["fid_real_floor"] = reference.floors["fid_real_floor"]
        # FID against the train set rewards memorising it; against held-out data it does not
        metrics["fid_vs_held_out"] = fid_from_features(reference.held_features, fake_features)
        metrics["fid_train_vs_held_out"] = reference.floors["fid_train_vs_held_out"]
        metrics["kid_real_floor"] = reference.floors["kid_real_floor"]
        metrics[f"fid_at_{n}"] = float(np.mean([fid_from_features(real_features, fake_features[i * n : (i + 1) * n]) for i in range(max(1, len(fake_features) // n))]))
    return metrics


GENERIC_JUDGE = "generic: KID on a fixed random conv net's features (seed 0)"
JUDGES = {"gaussians": "mixture modes (known centres)", "digits": "digits classifier features", "shapes": "shapes predictor features"}


@dataclass(frozen=True)
class GenericReference:
    """The real side of the generic judge: random-conv features of the train set, and the
    held-out set's KID against them (the floor a perfect generator would reach)."""

    featurize: RandomConvFeatures
    train_features: np.ndarray
    floor: float | None

    @classmethod
    def build(cls, train: TensorData, held_out: TensorData | None) -> GenericReference:
        featurize = RandomConvFeatures(train.x.shape[1])
        train_features = featurize(train.x)
        floor = None
        if held_out is not None and len(held_out) >= 2:
            floor = generic_kid(train_features, featurize(held_out.x))[0]
        return cls(featurize, train_features, floor)


def generic_kid(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    return kernel_inception_distance(real, fake, subsets=25, subset_size=min(1000, len(real), len(fake)))


def evaluate_generic(samples: torch.Tensor, reference: GenericReference) -> dict[str, float]:
    kid, kid_std = generic_kid(reference.train_features, reference.featurize(samples))
    metrics = {"generic_kid": kid, "generic_kid_std": kid_std}
    if reference.floor is not None:
        metrics["generic_kid_real_floor"] = reference.floor
    return metrics


def shapes_featurize(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    features, attributes = shapes_readings(images)
    return features, attributes["shape_probs"]


class GeneratorEvaluator:
    """Evaluates generators of one run on its data: which metrics apply depends on the data, and
    the real side of them is computed at the first call and kept."""

    def __init__(self, spec: ModelSpec, data_cfg: DataConfig, train: TensorData, held_out: TensorData | None, num_samples: int) -> None:
        self.spec, self.data_cfg, self.train, self.held_out, self.num_samples = spec, data_cfg, train, held_out, num_samples
        self.featurize: Featurize | None = {"digits": digits_features, "shapes": shapes_featurize}.get(data_cfg.name)
        if data_cfg.name == "shapes" and data_cfg.resolution != 32:
            self.featurize = None  # the shapes predictor reads 32 px images only
        self.reference: RealReference | None = None
        self.generic: GenericReference | None = None
        generic = self.featurize is None and data_cfg.name != "gaussians"
        self.judge = GENERIC_JUDGE if generic else JUDGES[data_cfg.name]
        self.fallback_metric = ("generic_kid", "min") if generic else None  # what picks "best" when the configured metric is absent

    def __call__(self, generator: nn.Module) -> dict[str, float]:
        z = latents(self.spec, self.num_samples, EVAL_SEED)
        labels = balanced_labels(self.spec, self.num_samples)
        samples = generate(generator, self.spec, z, labels)
        if self.data_cfg.name == "gaussians":
            return evaluate_mixture(samples, self.data_cfg.mixture)
        if self.featurize is None:
            if self.generic is None:
                self.generic = GenericReference.build(self.train, self.held_out)
            return evaluate_generic(samples, self.generic)
        if self.reference is None:
            self.reference = RealReference.build(self.train, self.held_out, self.featurize)
        return evaluate_in_feature_space(samples, labels, self.reference)


def evaluate_generator(generator: nn.Module, spec: ModelSpec, data_cfg: DataConfig, train: TensorData, held_out: TensorData | None, num_samples: int) -> dict[str, float]:
    """One evaluation (`ganserve evaluate`); a training run keeps a `GeneratorEvaluator`."""
    return GeneratorEvaluator(spec, data_cfg, train, held_out, num_samples)(generator)
