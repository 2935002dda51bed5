import pytest
import torch

from models.classifier import DigitsClassifier
from models.spec import ModelSpec
from models.zoo import build_discriminator, build_generator

DIGITS = [str(i) for i in range(10)]


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("discriminator", ["dcgan", "sngan"])
def test_dcgan_generates_images_in_range_that_its_discriminator_scores(resolution, discriminator):
    spec = ModelSpec(arch="dcgan", z_dim=16, width=8, resolution=resolution, channels=3)
    G, D = build_generator(spec), build_discriminator(spec, discriminator)
    images = G(torch.randn(4, 16))
    assert images.shape == (4, 3, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert D(images).shape == (4,)


def test_conditional_generator_draws_different_images_for_different_classes_from_one_latent():
    spec = ModelSpec(arch="cdcgan", kind="conditional", z_dim=16, width=8, resolution=32, channels=1, class_names=DIGITS)
    G, D = build_generator(spec).eval(), build_discriminator(spec, "dcgan-projection")
    z = torch.randn(1, 16).expand(2, -1)
    images = G(z, torch.tensor([0, 1]))
    assert images.shape == (2, 1, 32, 32)
    assert not torch.allclose(images[0], images[1])
    assert D(images, torch.tensor([0, 1])).shape == (2,)
    with pytest.raises(ValueError, match="class labels"):
        D(images)


def test_mlp_gan_maps_latents_to_points():
    spec = ModelSpec(arch="mlp", z_dim=4, width=32, depth=2, resolution=0, channels=0, out_dim=2)
    G, D = build_generator(spec), build_discriminator(spec, "mlp-sn")
    points = G(torch.randn(10, 4))
    assert points.shape == (10, 2) and D(points).shape == (10,)


def test_spec_round_trips_through_json(tmp_path):
    spec = ModelSpec(arch="cdcgan", kind="conditional", z_dim=64, class_names=DIGITS)
    spec.save(tmp_path / "spec.json")
    assert ModelSpec.load(tmp_path / "spec.json") == spec


def test_unknown_architectures_are_clear_errors():
    with pytest.raises(ValueError, match="unknown generator"):
        build_generator(ModelSpec(arch="biggan"))
    with pytest.raises(ValueError, match="32 or 64"):
        build_generator(ModelSpec(arch="dcgan", resolution=48))


def test_digits_classifier_exposes_features_and_logits():
    model = DigitsClassifier()
    x = torch.randn(3, 1, 32, 32)
    assert model.features(x).shape == (3, 64) and model(x).shape == (3, 10)


def test_sn_projection_discriminator_scores_labelled_images():
    spec = ModelSpec(arch="cdcgan", kind="conditional", z_dim=16, width=8, resolution=32, channels=1, class_names=DIGITS)
    D = build_discriminator(spec, "projection")
    assert D(torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 2])).shape == (3,)
