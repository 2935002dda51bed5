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
    from training.latent.measure import measure_crossovers, measure_judge_stability, measure_projection, measure_size_edit, measure_style_mixing
    from training.metrics.shapes_features import edit_readings

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
    stability = measure_judge_stability(generator, edit_readings, pairs=20)
    assert 0 <= stability["class_kept"] <= 1 and stability["size_change_median"] >= 0


def test_the_size_proof_is_reported_under_each_judge_with_its_own_fit_and_the_shipped_direction():
    from training.latent.measure import measure_judge_seeds, measure_size_edit, measure_style_mixing
    from training.metrics.shapes_features import edit_readings, predictor_readings

    torch.manual_seed(0)
    generator = StyleGenerator(z_dim=8, w_dim=8, resolution=32, img_channels=3, width=4, max_channels=16, mapping_layers=2).requires_grad_(False)
    shipped = fit_directions(generator, samples=300)["size"]
    judged = measure_judge_seeds(generator, shipped, {"reader": edit_readings, "predictor": predictor_readings}, seeds=10, fit_samples=300)
    assert judged["reader"]["mixing"] == measure_style_mixing(generator)
    assert set(judged) == {"reader", "predictor"}
    assert judged["reader"]["shipped_direction"] == measure_size_edit(generator, shipped, seeds=10)  # the same walk, the same judge
    for result in judged.values():
        assert set(result) == {"own_fit", "shipped_direction", "stability", "mixing"}
        assert 0 <= result["own_fit"]["both"] <= result["own_fit"]["shape_kept"] <= 1


def test_the_shapes_reader_reads_size_rising_with_true_size_past_the_data_range():
    """The judge of size edits must read shapes that an edit grows or shrinks past the data's 0.3–0.6:
    rendered shapes of known size 0.2–0.7 read in order, close to true, and of the right class."""
    from training.data.shapes import SHAPE_NAMES
    from training.metrics.shapes_features import load_shapes_reader
    from training.shapes_predictor import size_calibration

    calibration = size_calibration(load_shapes_reader(), per_size=60, seed=5)
    for name in SHAPE_NAMES:
        assert calibration["size_read_rises_with_size"][name], (name, calibration[name]["size_read"])
        errors = [abs(read - true) for read, true in zip(calibration[name]["size_read"], calibration["sizes"])]
        assert max(errors) < 0.04, (name, errors)
        assert min(calibration[name]["class_accuracy"]) > 0.9


def test_an_averaged_judge_reads_between_its_readers_and_agrees_with_one_reader_averaged_with_itself():
    import numpy as np

    from training.data.shapes import load_shapes
    from training.metrics.shapes_features import PREDICTOR_PATH, READER_PATH, averaged_judge, reader_at

    shapes = load_shapes(60, 32, seed=3)
    reader, predictor = reader_at(READER_PATH)(shapes.x), reader_at(PREDICTOR_PATH)(shapes.x)
    alone = averaged_judge([READER_PATH, READER_PATH])(shapes.x)
    assert np.allclose(alone["size"], reader["size"]) and np.array_equal(alone["shape"], reader["shape"])
    assert np.allclose(np.angle(np.exp(2j * np.pi * (alone["hue"] - reader["hue"]))), 0, atol=1e-6)  # hue is circular
    both = averaged_judge([READER_PATH, PREDICTOR_PATH])(shapes.x)
    low, high = np.minimum(reader["size"], predictor["size"]), np.maximum(reader["size"], predictor["size"])
    assert np.all((low - 1e-9 <= both["size"]) & (both["size"] <= high + 1e-9))
    assert np.mean(both["shape"] == shapes.y.numpy()) > 0.95
