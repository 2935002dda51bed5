import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import DataConfig
from training.data import load_dataset
from training.data.digits import load_digits
from training.data.gaussians import grid25, load_gaussians, ring8
from training.data.readers import read_cifar10, read_idx, read_image_folder, read_mnist
from training.data.shapes import load_shapes


def test_digits_are_real_scaled_to_minus_one_one_with_a_fixed_disjoint_split():
    train, held_out = load_digits("train", 32), load_digits("held_out", 32)
    assert train.x.shape == (1500, 1, 32, 32) and held_out.x.shape == (297, 1, 32, 32)
    assert train.x.min() >= -1 and train.x.max() <= 1
    assert set(train.y.tolist()) == set(range(10))
    train_rows = {row.numpy().tobytes() for row in train.x}
    assert not any(row.numpy().tobytes() in train_rows for row in held_out.x)
    assert torch.equal(load_digits("held_out", 32).x, held_out.x)  # fixed across calls
    assert load_digits("train", 64).x.shape[-1] == 64


def test_gaussian_mixtures_draw_points_around_their_centres():
    assert len(ring8().centres) == 8 and len(grid25().centres) == 25
    data = load_gaussians("grid25", 5000)
    distances = torch.cdist(data.x, grid25().centres).min(dim=1).values
    assert (distances < 3 * 0.05 * 1.5).float().mean() > 0.99


def test_shapes_keep_their_generating_factors_and_bigger_shapes_cover_more_pixels():
    data = load_shapes(300, 32, seed=3)
    assert data.x.shape == (300, 3, 32, 32) and data.class_names == ["circle", "square", "triangle"]
    assert set(data.factors) == {"hue", "size", "x", "y", "rotation"}
    coverage = (data.x.max(dim=1).values > -0.8).float().mean(dim=(1, 2))
    for shape in range(3):  # a triangle of one size covers less than a square of it: compare within a class
        mine = data.y == shape
        assert np.corrcoef(coverage[mine].numpy(), data.factors["size"][mine].numpy())[0, 1] > 0.9
    assert torch.equal(load_shapes(5, 32, seed=3).x, data.x[:5])  # a seed fixes the set


def test_shapes_size_range_widens_the_sizes_drawn_and_a_bad_range_is_refused():
    wide = load_shapes(400, 32, seed=3, size_range=(0.2, 0.7))
    assert 0.2 <= float(wide.factors["size"].min()) < 0.25 and 0.65 < float(wide.factors["size"].max()) <= 0.7
    # the shape stays inside the frame at any size
    assert bool(((wide.factors["x"] - wide.factors["size"] / 2) >= 0).all() and ((wide.factors["x"] + wide.factors["size"] / 2) <= 1).all())
    assert torch.equal(load_shapes(5, 32, seed=3).x, load_shapes(5, 32, seed=3, size_range=(0.3, 0.6)).x)  # the default is the data's range
    with pytest.raises(ValueError, match="size range"):
        load_shapes(5, 32, size_range=(0.6, 0.3))


def test_image_folder_with_class_subfolders_is_resized_cropped_and_labelled(tmp_path):
    for name, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (40 + i * 10, 30), colour).save(tmp_path / name / f"{i}.png")
    data = read_image_folder(tmp_path, resolution=16)
    assert data.x.shape == (6, 3, 16, 16)
    assert data.class_names == ["cats", "dogs"] and data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.x[0, 0].mean() == pytest.approx(1.0) and data.x[0, 2].mean() == pytest.approx(-1.0)


def test_empty_image_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        read_image_folder(tmp_path, 16)


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_round_trip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"images{suffix}", images, compress)
    write_idx(tmp_path / f"labels{suffix}", labels, compress)
    data = read_mnist(tmp_path / f"images{suffix}", tmp_path / f"labels{suffix}")
    assert data.x.shape == (5, 1, 28, 28)
    assert np.array_equal(((data.x[:, 0] + 1) * 127.5).round().byte().numpy(), images)
    assert data.y.tolist() == [3, 1, 4, 1, 5]


def test_a_file_that_is_not_idx_is_refused(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x89PNG not idx")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")


def test_cifar10_python_batches_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": data, b"labels": [0, 9, 2, 3]}, handle)
    with open(tmp_path / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"n{i}".encode() for i in range(10)]}, handle)
    loaded = read_cifar10([tmp_path / "data_batch_1"], tmp_path / "batches.meta")
    assert loaded.x.shape == (4, 3, 32, 32) and loaded.y.tolist() == [0, 9, 2, 3]
    # CIFAR stores the red plane first: pixel (0, 0) red is data[:, 0]
    assert np.array_equal(((loaded.x[:, 0, 0, 0] + 1) * 127.5).round().byte().numpy(), data[:, 0])
    assert loaded.class_names[9] == "n9"
    train, held_out = load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    assert len(train) + len(held_out) == 4


def test_a_dataset_needing_a_path_says_so():
    with pytest.raises(ValueError, match="data.path is required"):
        load_dataset(DataConfig(name="mnist"))
