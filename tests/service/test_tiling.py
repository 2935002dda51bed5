"""Tiling geometry: cutting into overlapping tiles and blending back is exact for a model that
only upsamples, for any image size, and the blend weights of neighbouring tiles sum to one."""
import numpy as np
import pytest

from service.imaging import to_uint8
from service.tiling import MIN_SIDE, TileBlender, TilePlacer, blend_tiles, cut_tiles, pad_to, padded_size, plan_tiles, ramp


def nearest(tile: np.ndarray, scale: int) -> np.ndarray:
    return tile.repeat(scale, axis=1).repeat(scale, axis=2)


@pytest.mark.parametrize("height,width", [(5, 7), (64, 64), (65, 130), (200, 33)])
@pytest.mark.parametrize("scale", [1, 4])
def test_cut_then_blend_reproduces_the_image(height, width, scale):
    image = np.random.default_rng(0).random((3, height, width)).astype(np.float32)
    grid = plan_tiles(height, width, tile=32, overlap=6)
    tiles = cut_tiles(image, grid)
    assert all(t.shape == (3, 32, 32) for t in tiles)
    out = blend_tiles([nearest(t, scale) for t in tiles], grid, scale)
    np.testing.assert_allclose(out, nearest(image, scale), atol=1e-6)


@pytest.mark.parametrize("height,width", [(5, 7), (64, 64), (65, 130)])
def test_placing_uint8_tiles_without_overlap_equals_blending_their_floats(height, width):
    image = np.random.default_rng(1).uniform(-1, 1, (3, height, width)).astype(np.float32)
    grid = plan_tiles(height, width, tile=32, overlap=0)
    outputs = [nearest(t, 4) for t in cut_tiles(image, grid)]
    placer = TilePlacer(grid, 4, 3)
    for index, output in reversed(list(enumerate(outputs))):  # in any order, as the batcher answers
        placer.add(index, to_uint8(output[None], (-1, 1))[0])
    assert np.array_equal(placer.result()[None], to_uint8(blend_tiles(outputs, grid, 4)[None], (-1, 1)))
    with pytest.raises(ValueError):
        TilePlacer(plan_tiles(height, width, tile=32, overlap=4), 4, 3)


def test_torch_tiles_are_blended_where_they_are_like_numpy_tiles():
    """Tiles a runtime kept as tensors (on a GPU: device memory) get a canvas on their device and
    the same blend as host arrays."""
    import torch

    image = np.random.default_rng(2).random((3, 65, 130)).astype(np.float32)
    grid = plan_tiles(65, 130, tile=32, overlap=6)
    outputs = [nearest(t, 4) for t in cut_tiles(image, grid)]
    blender = TileBlender(grid, 4, 3)
    for index, output in enumerate(outputs):
        blender.add(index, torch.from_numpy(np.ascontiguousarray(output)))
    blended = blender.result()
    assert isinstance(blended, torch.Tensor) and blended.device == torch.device("cpu")
    np.testing.assert_allclose(blended.numpy(), blend_tiles(outputs, grid, 4), atol=1e-6)


def test_neighbouring_ramps_sum_to_one_across_the_overlap():
    tile, overlap = 32, 8
    left, right = ramp(tile, overlap), ramp(tile, overlap)
    shared = left[tile - overlap:] + right[:overlap]
    np.testing.assert_allclose(shared, 1.0)


def test_overlap_must_stay_below_half_a_tile():
    with pytest.raises(ValueError):
        plan_tiles(100, 100, tile=16, overlap=8)


def test_padding_adds_only_what_the_size_multiple_is_missing():
    image = np.zeros((1, 33, 64), dtype=np.float32)
    assert pad_to(image, *padded_size(33, 64, 32)).shape == (1, 64, 64)


@pytest.mark.parametrize("height,width", [(1, 1), (4, 4), (3, 40)])
def test_tiny_images_are_mirror_padded_up_to_the_smallest_side_the_networks_take(height, width):
    image = np.arange(height * width, dtype=np.float32).reshape(1, height, width)
    target = padded_size(height, width, 4)
    assert min(target) >= MIN_SIDE and target[0] % 4 == 0 and target[1] % 4 == 0
    padded = pad_to(image, *target)
    assert padded.shape == (1, *target) and np.array_equal(padded[:, :height, :width], image)


def test_a_tile_border_pixel_never_counts_where_a_neighbour_covers_it():
    """Where two tiles overlap, the outer quarter of the overlap of each gets no weight."""
    grid = plan_tiles(100, 100, tile=32, overlap=8)
    assert (grid.rows, grid.cols) == (4, 4)
    marked = []
    for y, x in grid.origins():
        tile = np.zeros((1, 32, 32), dtype=np.float32)
        tile[:, :2, :] = tile[:, -2:, :] = tile[:, :, :2] = tile[:, :, -2:] = 1.0  # poisoned borders
        marked.append(tile)
    out = blend_tiles(marked, grid, 1)[0]
    # the image's own border keeps tile borders (as a whole-image pass would); inside, none leak
    assert out[2:-2, 2:-2].max() == 0.0


def test_the_shipped_sr_model_leaves_no_seams():
    """The trained x4 model in model_repository/: a constant image stays constant across tile
    seams, and a high-contrast image upscaled tile by tile matches one forward pass over the whole
    image within 2 grey levels, except along the bottom/right border (mirrored there, zero-padded
    in one pass)."""
    from pathlib import Path

    import onnxruntime as ort

    entry = Path(__file__).resolve().parents[2] / "model_repository" / "sr-rrdb-x4" / "1" / "model.onnx"
    session = ort.InferenceSession(str(entry), providers=["CPUExecutionProvider"])

    def forward(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"image": np.ascontiguousarray(x[None])})[0][0]

    def to_levels(x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((x + 1) * 127.5), 0, 255)

    grid = plan_tiles(200, 200, tile=96, overlap=16)
    flat = np.full((3, 200, 200), 120 / 127.5 - 1, dtype=np.float32)
    flat_out = to_levels(blend_tiles([forward(t) for t in cut_tiles(flat, grid)], grid, 4))[:, 16:-16, 16:-16].reshape(3, -1)
    assert (flat_out.max(axis=1) - flat_out.min(axis=1) <= 1).all()
    photo = np.random.default_rng(0).random((3, 50, 50)).astype(np.float32)
    photo = np.kron(photo, np.ones((1, 4, 4), dtype=np.float32)) * 2 - 1  # blocky 200 px image
    tiled = to_levels(blend_tiles([forward(t) for t in cut_tiles(photo, grid)], grid, 4))
    whole = to_levels(forward(photo))
    difference = np.abs(tiled - whole)[:, :-32, :-32]
    assert difference.max() <= 2 and difference.mean() < 0.05  # the receptive field reaches a little past the blending margin
