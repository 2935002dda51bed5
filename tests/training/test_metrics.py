import math

import numpy as np
import pytest
import torch

from training.metrics.fid import fid_from_features, frechet_distance
from training.metrics.inception_score import inception_score
from training.metrics.kid import kernel_inception_distance, mmd2_unbiased, polynomial_kernel
from training.metrics.modes import mode_metrics
from training.metrics.precision_recall import precision_recall


def test_fid_of_two_gaussians_matches_the_closed_form():
    d = 4
    # N(0, I) vs N(1, 4I): ||μ||² + tr(I + 4I - 2·2I) = d + d
    assert frechet_distance(np.zeros(d), np.eye(d), np.ones(d), 4 * np.eye(d)) == pytest.approx(2 * d)


def test_fid_of_non_commuting_covariances_in_2d_matches_the_trace_formula():
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    # closed form in 2-D: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = s1 s2 with positive eigenvalues
    m = s1 @ s2
    trace_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 8))
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-6)


def test_fid_from_samples_approaches_the_population_value():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(loc=2.0, scale=1.0, size=(20000, 3))
    assert fid_from_features(a, b) == pytest.approx(12.0, rel=0.02)


def test_kid_matches_the_unbiased_mmd_of_point_masses():
    x, y = np.full((10, 2), 1.0), np.full((12, 2), -1.0)
    k = lambda a, b: (a @ b / 2 + 1) ** 3  # noqa: E731
    expected = k(x[0], x[0]) + k(y[0], y[0]) - 2 * k(x[0], y[0])
    assert mmd2_unbiased(x, y) == pytest.approx(expected)
    assert polynomial_kernel(x[:1], y[:1])[0, 0] == pytest.approx(0.0)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(2)
    same, _ = kernel_inception_distance(rng.normal(size=(800, 16)), rng.normal(size=(800, 16)), subsets=20, subset_size=400)
    shifted, _ = kernel_inception_distance(rng.normal(size=(800, 16)), rng.normal(1.0, size=(800, 16)), subsets=20, subset_size=400)
    assert abs(same) < 0.01
    assert shifted > 0.5


def test_precision_recall_of_identical_sets_is_one_each():
    features = np.random.default_rng(3).normal(size=(300, 5))
    assert precision_recall(features, features) == (1.0, 1.0)


def test_a_collapsed_generator_has_full_precision_but_low_recall():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(500, 2))
    collapsed = rng.normal(scale=0.05, size=(500, 2))  # all samples in the middle of the real cloud
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.95
    assert recall < 0.2


def test_inception_score_ranges_from_one_to_the_number_of_classes():
    confident = np.eye(10)[np.arange(1000) % 10]
    score, _ = inception_score(confident * 0.99999 + 1e-6, splits=5)
    assert score == pytest.approx(10.0, rel=1e-3)
    flat, _ = inception_score(np.full((100, 10), 0.1), splits=5)
    assert flat == pytest.approx(1.0)


def test_mode_metrics_on_samples_at_every_centre_and_on_one_collapsed_mode():
    centres = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    everywhere = mode_metrics(np.repeat(centres, 5, axis=0), centres, std=0.05)
    assert everywhere == {"modes_covered": 4, "num_modes": 4, "high_quality_fraction": 1.0, "reverse_kl": 0.0,
                          "mode_kl": pytest.approx(-math.log(1 - math.exp(-4.5)))}
    collapsed = mode_metrics(np.zeros((10, 2)), centres, std=0.05)
    assert collapsed["modes_covered"] == 1
    assert collapsed["reverse_kl"] == pytest.approx(math.log(4))
    far = mode_metrics(np.full((10, 2), 1.0), centres, std=0.05)  # between modes: none is high quality
    assert far["high_quality_fraction"] == 0.0 and far["modes_covered"] == 0


def test_mode_kl_ranks_a_diffuse_cloud_below_a_sharp_model_where_reverse_kl_cannot():
    """Reverse KL sees only the high-quality samples, so a cloud that grazes every centre looks
    perfect; mode_kl counts the off-mode mass and ranks the cloud last."""
    centres = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    sharp = np.concatenate([np.repeat(centres, 20, axis=0), np.full((8, 2), 1.0)])  # 91 % on the modes, evenly
    cloud = np.concatenate([np.repeat(centres, 1, axis=0), np.full((84, 2), 1.0)])  # 5 % on the modes, evenly
    collapsed = np.repeat(centres[:1], 88, axis=0)  # all on one mode
    kl = {name: mode_metrics(x, centres, std=0.05) for name, x in {"sharp": sharp, "cloud": cloud, "collapsed": collapsed}.items()}
    assert kl["cloud"]["reverse_kl"] == kl["sharp"]["reverse_kl"] == 0.0
    assert kl["sharp"]["mode_kl"] < kl["collapsed"]["mode_kl"] < kl["cloud"]["mode_kl"]


def test_shipped_digits_classifier_reaches_97_percent_on_held_out_digits():
    from training.data.digits import load_digits
    from training.metrics.digits_features import digits_features

    held_out = load_digits("held_out", 32)
    _, probs = digits_features(held_out.x)
    assert (probs.argmax(1) == held_out.y.numpy()).mean() >= 0.97


def test_digits_fid_separates_real_digits_from_noise():
    from training.data.digits import load_digits
    from training.metrics.digits_features import digits_features

    train, held_out = load_digits("train", 32), load_digits("held_out", 32)
    real, _ = digits_features(train.x)
    held, _ = digits_features(held_out.x)
    noise, _ = digits_features(torch.rand(297, 1, 32, 32) * 2 - 1)
    assert fid_from_features(real, held) * 10 < fid_from_features(real, noise)
