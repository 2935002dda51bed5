"""The grid25 recipe pieces: PacGAN packing in the MLP discriminator, WGAN weight clipping in the
loop, and the distance profile that explains the high-quality fraction. Fast: no real training."""
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.mlp import MLPDiscriminator
from training.config import TrainConfig
from training.data.gaussians import load_gaussians, mixture
from training.loop import build_run, train_step
from training.metrics.modes import distance_profile


def test_a_packed_discriminator_scores_each_pack_of_concatenated_samples():
    torch.manual_seed(0)
    D = MLPDiscriminator(in_dim=2, width=16, depth=2, pack=2, scale=2.0)
    x = torch.randn(6, 2)
    scores = D(x)
    assert scores.shape == (3,)
    # pack k is samples 2k and 2k+1 side by side, so the pack's score is the net on their concatenation
    assert torch.allclose(scores, D.net(torch.cat([x[0::2], x[1::2]], dim=1) / 2.0).squeeze(1))
    with pytest.raises(ValueError, match="packs of 2"):
        D(torch.randn(5, 2))


def test_an_unpacked_discriminator_is_unchanged():
    torch.manual_seed(0)
    D = MLPDiscriminator(in_dim=2, width=16, depth=2)
    assert D(torch.randn(5, 2)).shape == (5,)
    assert D.net[0].in_features == 2


def grid_config(**updates) -> TrainConfig:
    raw = {"data": {"name": "gaussians", "mixture": "grid25", "size": 2000},
           "model": {"arch": "mlp", "z_dim": 4, "width": 16, "depth": 2, "discriminator": "mlp"},
           "batch_size": 32, "max_steps": 10}
    for key, value in updates.items():
        raw[key] = raw.get(key, {}) | value if isinstance(value, dict) else value
    return TrainConfig.model_validate(raw)


def test_a_packed_run_trains_and_its_d_sees_pack_times_two_inputs():
    cfg = grid_config(model={"discriminator": "mlp-sn", "pack": 4}, loss={"name": "hinge", "r1_gamma": 0.1})
    run = build_run(cfg, load_gaussians("grid25", 2000), torch.device("cpu"))
    row = train_step(run, load_gaussians("grid25", 2000))
    assert run.D.net[0].in_features == 8 and np.isfinite(row["loss_d"])


def test_weight_clipping_keeps_every_critic_weight_in_range():
    cfg = grid_config(loss={"name": "wgan", "n_critic": 2, "clip": 0.01}, optim={"lr_d": 0.1})
    data = load_gaussians("grid25", 2000)
    run = build_run(cfg, data, torch.device("cpu"))
    for _ in range(3):
        train_step(run, data)
    assert max(p.abs().max().item() for p in run.D.parameters()) <= 0.01


def test_packing_is_rejected_where_it_is_not_implemented():
    with pytest.raises(ValueError, match="packing"):
        from models.spec import ModelSpec
        from models.zoo import build_discriminator

        build_discriminator(ModelSpec(arch="dcgan", kind="unconditional", z_dim=8, width=8, resolution=32, channels=3), "dcgan", pack=2)
    with pytest.raises(ValidationError):
        grid_config(model={"pack": 0})


def test_real_data_meets_the_high_quality_bar_and_a_blurred_model_does_not():
    m = mixture("grid25")
    real = m.sample(20_000, torch.Generator().manual_seed(0)).numpy()
    profile = distance_profile(real, m.centres.numpy(), m.std)
    assert profile["within_3_sigma"] == pytest.approx(1 - np.exp(-4.5), abs=0.005)
    assert profile["median_sigma"] == pytest.approx(np.sqrt(2 * np.log(2)), abs=0.03)  # Rayleigh median
    blurred = real + np.random.default_rng(0).normal(0, 4 * m.std, real.shape)  # every mode kept, each 4x too wide
    assert distance_profile(blurred, m.centres.numpy(), m.std)["within_3_sigma"] < 0.3
