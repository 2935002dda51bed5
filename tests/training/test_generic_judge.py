"""The generic judge (KID on a fixed random conv net's features), used where the data has no
trained judge: it must be the same for every run and rank real images above degraded ones."""
import torch

from training.data.digits import load_digits
from training.evaluate import generic_kid
from training.judge_study import degraded_sets
from training.metrics.generic_features import RandomConvFeatures


def test_generic_judge_is_fixed_and_leaves_the_callers_random_state_alone():
    images = torch.rand(4, 3, 48, 48) * 2 - 1
    state = torch.get_rng_state()
    first, second = RandomConvFeatures(3)(images), RandomConvFeatures(3)(images)
    assert (first == second).all() and first.shape == (4, 512)
    assert torch.equal(torch.get_rng_state(), state)


def test_generic_judge_ranks_held_out_digits_above_every_kind_of_degradation():
    train, held_out = load_digits("train"), load_digits("held_out")
    featurize = RandomConvFeatures(1)
    real = featurize(train.x[:500])
    kept = {name: images for name, images in degraded_sets(held_out.x[:200]).items() if name == "clean" or name[-2:] in ("_1", "_4")}
    scores = {name: generic_kid(real, featurize(images))[0] for name, images in kept.items()}
    for kind in ("blur", "noise", "pixelate", "collapse", "garbage"):
        assert scores["clean"] < scores[f"{kind}_4"], kind  # the strongest degradation of each kind scores worse than real images
        assert scores[f"{kind}_1"] < scores[f"{kind}_4"], kind  # and worse with strength
