"""CycleGAN's per-direction cycle weights (junyanz's lambda_A / lambda_B) and the optional noise
on a translation before it is translated back. Tiny nets on a few shapes: fast."""
import pytest
import torch
import yaml
from pydantic import ValidationError

from training.image2image.config import I2IConfig
from training.image2image.tasks import CycleGAN

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def tiny_cyclegan(**loss) -> CycleGAN:
    raw = yaml.safe_load((REPO / "configs" / "cyclegan-circles2squares.yaml").read_text())
    raw["data"].update(size=16, held_out=8, resolution=16)
    raw["model"].update(ngf=4, n_blocks=1, ndf=4)
    raw["loss"].update(loss)
    raw["batch_size"] = 2
    torch.manual_seed(0)
    return CycleGAN(I2IConfig.model_validate(raw), torch.device("cpu"), torch.Generator().manual_seed(0))


def test_without_noise_the_cycle_sees_the_translation_itself():
    task = tiny_cyclegan()
    fake = torch.randn(2, 3, 16, 16)
    assert task.cycle_input(fake) is fake


def test_cycle_noise_perturbs_the_translation_by_its_std():
    task = tiny_cyclegan(cycle_noise=0.1)
    fake = torch.zeros(64, 3, 16, 16)
    assert task.cycle_input(fake).std().item() == pytest.approx(0.1, rel=0.05)


def test_lambda_b_weighs_only_the_b_cycle_in_the_generator_loss():
    """Same nets, same batch: the generator loss with lambda_B = 0 is the default's minus
    λ · (B → A → B cycle), so it is lower, and the cycle logged (both directions) is the same."""
    rows = {name: tiny_cyclegan(**loss).step(0) for name, loss in {"default": {}, "lambda_b0": {"cycle_weight_b": 0.0}}.items()}
    assert rows["lambda_b0"]["cycle"] == pytest.approx(rows["default"]["cycle"])
    assert rows["lambda_b0"]["loss_g"] < rows["default"]["loss_g"]


def test_a_training_step_runs_with_asymmetric_cycles_and_noise():
    task = tiny_cyclegan(cycle_weight_b=1.0, cycle_noise=0.05)
    row = task.step(0)
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values())


def test_cycle_options_are_validated():
    with pytest.raises(ValidationError):
        tiny_cyclegan(cycle_noise=-0.1)
    with pytest.raises(ValidationError):
        tiny_cyclegan(cycle_weight_b=-1.0)
