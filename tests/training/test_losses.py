import math

import pytest
import torch

from training.losses import (
    critic_g_loss, gradient_penalty, hinge_d_loss, logistic_d_loss, loss_pair, lsgan_d_loss,
    minimax_g_loss, nonsaturating_g_loss, r1_penalty, wasserstein_d_loss,
)

W = torch.tensor([3.0, 4.0])  # ||W|| = 5


def linear_critic(x: torch.Tensor) -> torch.Tensor:
    return x @ W


def test_gradient_penalty_of_a_linear_critic_is_norm_minus_one_squared():
    real, fake = torch.randn(16, 2), torch.randn(16, 2)
    assert gradient_penalty(linear_critic, real, fake).item() == pytest.approx((5 - 1) ** 2)


def test_gradient_penalty_is_zero_for_a_one_lipschitz_critic():
    real, fake = torch.randn(8, 2), torch.randn(8, 2)
    assert gradient_penalty(lambda x: x @ (W / 5), real, fake).item() == pytest.approx(0.0, abs=1e-10)


def test_gradient_penalty_backpropagates_into_the_critic():
    weight = torch.tensor([1.0, 1.0], requires_grad=True)
    penalty = gradient_penalty(lambda x: x @ weight, torch.randn(4, 2), torch.randn(4, 2))
    penalty.backward()
    # d/dw (||w|| - 1)^2 = 2(||w|| - 1) w / ||w||
    expected = 2 * (math.sqrt(2) - 1) / math.sqrt(2)
    assert torch.allclose(weight.grad, torch.full((2,), expected))


def test_r1_penalty_of_a_linear_critic_is_squared_weight_norm():
    real = torch.randn(10, 2, requires_grad=True)
    assert r1_penalty(linear_critic(real), real).item() == pytest.approx(25.0)


def test_logistic_losses_at_an_undecided_discriminator():
    zero = torch.zeros(5)
    assert logistic_d_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert nonsaturating_g_loss(zero).item() == pytest.approx(math.log(2))
    assert minimax_g_loss(zero).item() == pytest.approx(-math.log(2))


def test_saturating_loss_gradient_vanishes_when_discriminator_wins_but_nonsaturating_does_not():
    fake = torch.full((1,), -10.0, requires_grad=True)  # D is sure the sample is fake
    (saturating,) = torch.autograd.grad(minimax_g_loss(fake), fake)
    (nonsaturating,) = torch.autograd.grad(nonsaturating_g_loss(fake), fake)
    assert abs(saturating.item()) < 1e-4
    assert abs(nonsaturating.item()) > 0.99


def test_hinge_and_wasserstein_and_lsgan_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.25 + 0.5)
    assert wasserstein_d_loss(real, fake).item() == pytest.approx(-1.0 - 1.25)
    assert critic_g_loss(fake).item() == pytest.approx(1.0)
    assert lsgan_d_loss(torch.ones(3), torch.zeros(3)).item() == pytest.approx(0.0)


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown loss"):
        loss_pair("softmax")
