"""Quality metrics for a generator on its dataset, used during training (to keep the best
checkpoint) and by `ganserve evaluate`.

Which metrics apply depends on the data: 2-D mixtures get mode coverage; digits and 32 px shapes
get FID, KID, precision/recall and IS in the feature space of the project's own network for
them (and class accuracy for conditional models); any image set gets standard FID when
InceptionV3 weights are given.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from models.spec import ModelSpec
from training.config import DataConfig
from training.data.base import TensorData
from training.data.gaussians import mixture
from training.metrics.digits_features import digits_features
from training.metrics.fid import fid_from_features
from training.metrics.inception_score import inception_score
from training.metrics.kid import kernel_inception_distance
from training.metrics.modes import mode_metrics
from training.metrics.shapes_features import shapes_readings
from training.metrics.precision_recall import precision_recall
from training.sampling import balanced_labels, generate, latents

EVAL_SEED = 12345  # evaluation latents never touch the training RNG


def evaluate_mixture(samples: torch.Tensor, mixture_name: str) -> dict[str, float]:
    gm = mixture(mixture_name)
    return mode_metrics(samples.numpy(), gm.centres.numpy(), gm.std)


def feature_metrics(real: np.ndarray, fake: np.ndarray, prefix: str = "") -> dict[str, float]:
    kid, kid_std = kernel_inception_distance(real, fake, subsets=50, subset_size=min(1000, len(real), len(fake)))
    precision, recall = precision_recall(real, fake, k=3)
    return {f"{prefix}fid": fid_from_features(real, fake), f"{prefix}kid": kid, f"{prefix}kid_std": kid_std, f"{prefix}precision": precision, f"{prefix}recall": recall}


def evaluate_in_feature_space(samples: torch.Tensor, labels: torch.Tensor | None, train: TensorData, held_out: TensorData | None,
                              featurize: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """FID/KID/precision/recall (+ IS and class accuracy from the network's class probabilities)
    against the train set, and the real-vs-real floors against the held-out set."""
    real_features, _ = featurize(train.x)
    fake_features, fake_probs = featurize(samples)
    metrics = feature_metrics(real_features, fake_features)
    metrics["inception_score"], _ = inception_score(fake_probs)
    if labels is not None:
        metrics["class_accuracy"] = float((fake_probs.argmax(1) == labels.numpy()).mean())
    if held_out is not None:
        # FID is biased by sample count: compare the floor with the same number of generated samples
        n = len(held_out)
        held_features, _ = featurize(held_out.x)
        metrics["fid_real_floor"] = fid_from_features(real_features, held_features)
        # FID against the train set rewards memorising it; against held-out data it does not
        metrics["fid_vs_held_out"] = fid_from_features(held_features, fake_features)
        metrics["fid_train_vs_held_out"] = fid_from_features(held_features, real_features)
        metrics["kid_real_floor"], _ = kernel_inception_distance(real_features, held_features, subset_size=n)
        metrics[f"fid_at_{n}"] = float(np.mean([fid_from_features(real_features, fake_features[i * n : (i + 1) * n]) for i in range(max(1, len(fake_features) // n))]))
    return metrics


def shapes_featurize(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    features, attributes = shapes_readings(images)
    return features, attributes["shape_probs"]


def evaluate_generator(generator: nn.Module, spec: ModelSpec, data_cfg: DataConfig, train: TensorData, held_out: TensorData | None, num_samples: int) -> dict[str, float]:
    z = latents(spec, num_samples, EVAL_SEED)
    labels = balanced_labels(spec, num_samples)
    samples = generate(generator, spec, z, labels)
    if data_cfg.name == "gaussians":
        return evaluate_mixture(samples, data_cfg.mixture)
    if data_cfg.name == "digits":
        return evaluate_in_feature_space(samples, labels, train, held_out, digits_features)
    if data_cfg.name == "shapes" and data_cfg.resolution == 32:
        return evaluate_in_feature_space(samples, labels, train, held_out, shapes_featurize)
    return {}
