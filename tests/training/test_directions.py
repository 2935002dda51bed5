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


def test_latent_proofs_report_fractions_and_a_psnr_for_any_style_generator():
    from training.latent.measure import measure_crossovers, measure_projection, measure_size_edit, measure_style_mixing

    torch.manual_seed(0)
    generator = StyleGenerator(z_dim=8, w_dim=8, resolution=32, img_channels=3, width=4, max_channels=16, mapping_layers=2).requires_grad_(False)
    size = measure_size_edit(generator, torch.nn.functional.normalize(torch.randn(8), dim=0), seeds=10)
    mixing = measure_style_mixing(generator, pairs=20)
    projection = measure_projection(generator, images=2, steps=3)
    assert 0 <= size["both"] <= size["shape_kept"] <= 1 and 0 <= size["size_monotonic"] <= 1
    assert 0 <= mixing["all_three"] <= 1
    crossovers = measure_crossovers(generator, pairs=20)
    assert [c["k"] for c in crossovers] == list(range(generator.num_ws + 1))
    b_itself, a_itself = crossovers[0], crossovers[-1]
    assert a_itself["keeps_shape"] == a_itself["keeps_position"] == 1.0 and a_itself["takes_colour"] == 0.0
    assert b_itself["takes_colour"] == 1.0
    assert projection["images"] == 2 and projection["psnr_min"] <= projection["psnr_mean"] <= projection["psnr_max"]
