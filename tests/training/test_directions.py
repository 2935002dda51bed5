import torch

from models.stylegan import StyleGenerator
from training.latent.directions import fit_directions


def test_supervised_and_pca_directions_are_unit_vectors_named_after_attributes():
    torch.manual_seed(0)
    generator = StyleGenerator(z_dim=8, w_dim=8, resolution=32, img_channels=3, width=4, max_channels=16, mapping_layers=2)
    directions = fit_directions(generator, samples=300)
    assert {"size", "x", "y", "hue", "pc0"} <= set(directions)
    for vector in directions.values():
        assert vector.shape == (8,) and abs(float(vector.norm()) - 1) < 1e-5
