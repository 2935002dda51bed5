import numpy as np
import torch

from models.stylegan import StyleGenerator
from training.data.shapes import render_shape
from training.latent.directions import best_window, fit_directions, local_directions, sample_ws


def tiny_generator() -> StyleGenerator:
    torch.manual_seed(0)
    return StyleGenerator(z_dim=8, w_dim=8, resolution=32, img_channels=3, width=4, max_channels=16, mapping_layers=2).requires_grad_(False)


def test_supervised_and_pca_directions_are_unit_vectors_named_after_attributes_with_contiguous_windows():
    generator = tiny_generator()
    directions = fit_directions(generator, samples=300, window_seeds=4)
    assert {"size", "x", "y", "hue", "circle", "pc0"} <= set(directions.vectors)
    for vector in directions.vectors.values():
        assert vector.shape == (8,) and abs(float(vector.norm()) - 1) < 1e-5
    assert set(directions.layers) <= {"size", "x", "y"}
    for window in directions.layers.values():
        assert 2 <= len(window) < generator.num_ws and window == list(range(window[0], window[-1] + 1))


W_DIM = 32  # wide enough that projecting out three fitted class effects leaves a direction mostly whole


def axes(count: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(count, W_DIM, generator=torch.Generator().manual_seed(0)), dim=1)


class RenderedShapes(torch.nn.Module):
    """A stand-in generator whose controls are known, w being z: ws[1] and ws[2] set the size along
    `size_axis`, ws[3] the x position along `x_axis`, and ws[0] the class (a square where w along
    `class_axis` passes `bound`, else a circle)."""

    num_ws = 4

    def __init__(self, size_axis: torch.Tensor, x_axis: torch.Tensor, class_axis: torch.Tensor, bound: float) -> None:
        super().__init__()
        self.mapping = torch.nn.Module()
        self.mapping.layers = torch.nn.ModuleList([torch.nn.Linear(W_DIM, W_DIM)])  # sample_ws reads z_dim from it
        self.mapping.forward = lambda z: z
        self.size_axis, self.x_axis, self.class_axis, self.bound = size_axis, x_axis, class_axis, bound

    def synthesis(self, ws: torch.Tensor) -> torch.Tensor:
        size = 0.45 + 0.12 * torch.tanh((ws[:, 1:3] @ self.size_axis).mean(1) / 2)
        x = 0.5 + 0.15 * torch.tanh(ws[:, 3] @ self.x_axis / 2)
        square = ws[:, 0] @ self.class_axis > self.bound
        images = [render_shape(32, int(q), 0.3, float(s), float(c), 0.5, 0.0) for q, s, c in zip(square, size, x)]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_local_directions_find_the_controls_without_what_changes_the_class():
    """The size control is entangled with the class (size_axis = a + c, the class follows c): the
    fitted size direction is the part of the control that leaves the class alone, a."""
    a, c, x_axis = axes(3)
    c = c - (c @ a) * a
    generator = RenderedShapes(torch.nn.functional.normalize(a + c, dim=0), x_axis, c / c.norm(), 0.0)
    directions = local_directions(generator, sample_ws(generator, 500, seed=1)[0])
    assert float(directions["size"] @ a) > 0.8  # the control itself, a + c, would be at 0.71
    assert abs(float(directions["size"] @ c)) / float(c.norm()) < 0.15
    assert float(directions["x"] @ x_axis) > 0.8


def test_the_window_of_an_edit_leaves_out_the_ws_where_it_would_change_the_class():
    size_axis, x_axis, _ = axes(3)
    generator = RenderedShapes(size_axis, x_axis, size_axis, 1.5)  # at ws[0] the size control turns circles into squares
    window = best_window(generator, sample_ws(generator, 8, seed=2)[0], size_axis, "size")
    assert 0 not in window and {1, 2} <= set(window)


def test_latent_proofs_report_fractions_and_a_psnr_for_any_style_generator():
    from training.latent.measure import measure_crossovers, measure_projection, measure_size_edit, measure_style_mixing

    torch.manual_seed(0)
    generator = tiny_generator()
    size = measure_size_edit(generator, torch.nn.functional.normalize(torch.randn(8), dim=0), seeds=10)
    mixing = measure_style_mixing(generator, pairs=20)
    projection = measure_projection(generator, images=2, steps=3)
    assert 0 <= size["both"] <= size["shape_kept"] <= 1 and 0 <= size["monotonic"] <= 1
    assert 0 <= mixing["all_three"] <= 1
    crossovers = measure_crossovers(generator, pairs=20)
    assert [c["k"] for c in crossovers] == list(range(generator.num_ws + 1))
    b_itself, a_itself = crossovers[0], crossovers[-1]
    assert a_itself["keeps_shape"] == a_itself["keeps_position"] == 1.0 and a_itself["takes_colour"] == 0.0
    assert b_itself["takes_colour"] == 1.0
    assert projection["images"] == 2 and projection["psnr_min"] <= projection["psnr_mean"] <= projection["psnr_max"]
