import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import DataConfig
from training.data import TensorData, load_dataset
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
    assert data.x.shape == (6, 3, 16, 16) and data.x.dtype == torch.uint8  # held as pixels: a quarter of the floats
    assert data.class_names == ["cats", "dogs"] and data.y.tolist() == [0, 0, 0, 1, 1, 1]
    batch, labels = data.minibatch(6, torch.Generator().manual_seed(0))  # the networks see floats in [-1, 1]
    first = batch[labels == 0][0]
    assert batch.dtype == torch.float32 and first[0].mean() == pytest.approx(1.0) and first[2].mean() == pytest.approx(-1.0)


def test_empty_image_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        read_image_folder(tmp_path, 16)


def test_a_users_folder_is_read_as_they_see_it(tmp_path, caplog):
    """What a real folder holds: nested folders inside a class, hidden folders and macOS's `._`
    files, a linked class folder, TIFF, a 16-bit PNG, a phone photo stored sideways with an EXIF
    tag, an empty class folder, and a broken file among good ones. Each was mis-read before (a
    class per nested folder, `.thumbnails` a class, the link and TIFF ignored, 16-bit clipped to
    white, the photo sideways, the whole load failed on one bad file without naming it)."""
    red, blue = (255, 0, 0), (0, 0, 255)
    for folder in ("cats/kittens/small", "dogs", ".thumbnails", "empty"):
        (tmp_path / "set" / folder).mkdir(parents=True)
    Image.new("RGB", (20, 20), red).save(tmp_path / "set" / "cats" / "kittens" / "small" / "a.tif")
    Image.new("RGB", (20, 20), red).save(tmp_path / "set" / ".thumbnails" / "t.png")
    (tmp_path / "set" / "cats" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    gradient = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(gradient).save(tmp_path / "set" / "cats" / "grey16.png")
    sideways = np.zeros((16, 48, 3), np.uint8)
    sideways[:, :24] = blue  # stored: blue on the left; EXIF 6 shows it turned clockwise, blue on top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sideways).save(tmp_path / "set" / "dogs" / "phone.jpg", exif=exif, quality=95)
    (tmp_path / "set" / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (tmp_path / "elsewhere" / "birds").mkdir(parents=True)
    Image.new("RGB", (20, 20), blue).save(tmp_path / "elsewhere" / "birds" / "b.webp")
    (tmp_path / "set" / "birds").symlink_to(tmp_path / "elsewhere" / "birds")
    (tmp_path / "set" / "dogs" / "loop").symlink_to(tmp_path / "set")  # walked once, not forever
    with caplog.at_level("WARNING"):
        data = read_image_folder(tmp_path / "set", resolution=16)
    assert data.class_names == ["birds", "cats", "dogs"] and sorted(data.y.tolist()) == [0, 1, 1, 2]
    assert "broken.jpg" in caplog.text and "skipped 1 of 5" in caplog.text and "empty" in caplog.text
    grey = data.x[data.y == 1][0].float().numpy()  # (sorted: cats/grey16.png before cats/kittens/…)
    assert grey.min() < 20 and grey.max() > 235 and grey.mean() == pytest.approx(127.5, abs=12)  # a gradient, not all white
    photo = data.x[data.y == 2][0]
    assert photo.shape == (3, 16, 16) and photo[2, :4].float().mean() > 230 and photo[2, -4:].float().mean() < 25  # upright: blue on top


def test_deep_grey_images_pipes_and_links_out_of_the_folder_are_read_as_they_are(tmp_path, caplog):
    """int32 and float TIFFs came out black; a named pipe called x.png hung the load; a link to
    another folder tree added its images without a word."""
    import os

    folder = tmp_path / "set"
    (folder / "deep").mkdir(parents=True)
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.int32), (32, 1))).save(folder / "deep" / "int32.tif")
    Image.fromarray(np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))).save(folder / "deep" / "float.tif")
    os.mkfifo(folder / "deep" / "pipe.png")
    (tmp_path / "elsewhere").mkdir()
    Image.new("L", (8, 8), 200).save(tmp_path / "elsewhere" / "far.png")
    (folder / "linked").symlink_to(tmp_path / "elsewhere")
    with caplog.at_level("WARNING"):
        data = read_image_folder(folder, 16, channels=1)
    assert len(data) == 3 and "links lead out of the folder" in caplog.text and "elsewhere" in caplog.text
    deep = data.x[:, 0].float()  # sorted: deep/float.tif, deep/int32.tif, linked/far.png
    for row in deep[:2]:
        assert row.min() < 30 and row.max() > 220, row  # a ramp, not black


def test_a_cifar_batch_of_nested_lists_or_a_meta_of_thousands_of_classes_is_refused_by_name(tmp_path):
    """400 KB of nested lists ended in NumPy's 64-dimension traceback; 100,000 class names made a
    conditional model of 9.7 GB; a batch without labels was reported as float labels."""
    from training.data.readers import DataError

    nested = [0]
    for _ in range(70):
        nested = [nested]
    cases = {"data_batch_1": {b"data": nested, b"labels": [0]}}, {"data_batch_1": {b"data": np.zeros((20, 3072), np.uint8)}}
    for files, expected in zip(cases, ("no arrays", "no labels")):
        for name, content in files.items():
            (tmp_path / name).write_bytes(pickle.dumps(content, protocol=4))
        with pytest.raises(DataError, match=expected):
            load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 20}, protocol=4))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(5000)]}, protocol=4))
    with pytest.raises(DataError, match="lists 5000 class names"):
        load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))


def test_a_folder_too_small_to_train_on_and_one_whose_images_all_fail_are_refused_by_name(tmp_path):
    """One image: it was held out, training ran on nothing (loss nan) and the first evaluation
    crashed; two: KID failed after the run."""
    from training.data.readers import DataError

    (tmp_path / "few").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "few" / f"{i}.png")
    with pytest.raises(DataError, match="holds 3 samples: too few"):
        load_dataset(DataConfig(name="image_folder", path=str(tmp_path / "few"), resolution=16))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    big = Image.new("1", (9000, 9000))
    big.save(tmp_path / "bad" / "huge.png")  # a few KB on disk, 81 M pixels decoded
    with pytest.raises(DataError, match="none of the 2 images.*9000x9000"):
        read_image_folder(tmp_path / "bad", 16)


def test_a_large_set_is_split_without_a_second_copy_and_the_split_is_fixed(monkeypatch):
    from training.data import registry
    from training.data.registry import split_off

    monkeypatch.setattr(registry, "COMPACT_BYTES", 3 * 16)  # moved three rows at a time

    data = TensorData(x=torch.arange(40.0).view(40, 1, 1, 1).expand(40, 1, 2, 2).contiguous(), y=torch.arange(40))
    storage = data.x.untyped_storage().data_ptr()
    train, held_out = split_off(data, "a set")
    assert len(held_out) == 4 and len(train) == 36 and train.x.untyped_storage().data_ptr() == storage  # a view, not a copy
    assert sorted(train.y.tolist() + held_out.y.tolist()) == list(range(40)) and train.y.tolist() == sorted(train.y.tolist())
    assert torch.equal(train.x[:, 0, 0, 0].long(), train.y)  # images moved with their labels
    again = TensorData(x=torch.arange(40.0).view(40, 1, 1, 1).expand(40, 1, 2, 2).contiguous(), y=torch.arange(40))
    assert split_off(again, "a set")[1].y.tolist() == held_out.y.tolist()


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
    assert np.array_equal(data.x[:, 0].numpy(), images)
    assert data.y.tolist() == [3, 1, 4, 1, 5]


def test_a_file_that_is_not_idx_is_refused(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x89PNG not idx")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")


def test_cifar10_python_batches_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, 20)]
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # the published batches are protocol-2 pickles
        with open(tmp_path / "data_batch_1", "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle, protocol=protocol)
        with open(tmp_path / "batches.meta", "wb") as handle:
            pickle.dump({b"label_names": [f"n{i}".encode() for i in range(10)]}, handle, protocol=protocol)
        loaded = read_cifar10([tmp_path / "data_batch_1"], tmp_path / "batches.meta")
        assert loaded.x.shape == (20, 3, 32, 32) and loaded.y.tolist() == labels
        # CIFAR stores the red plane first: pixel (0, 0) red is data[:, 0]
        assert np.array_equal(loaded.x[:, 0, 0, 0].numpy(), data[:, 0])
        assert loaded.class_names[9] == "n9"
    (tmp_path / "data_batch_1.bak").write_bytes(b"an editor's backup")  # matched data_batch_* and failed the load
    train, held_out = load_dataset(DataConfig(name="cifar10", path=str(tmp_path), resolution=64))
    assert len(train) + len(held_out) == 20 and train.x.shape[1:] == (3, 64, 64)


class WritesAFile:
    """A pickle that, when loaded, opens a file: what a hostile 'CIFAR batch' would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_cifar_batch_is_read_without_running_code_and_a_broken_one_is_named(tmp_path):
    """`pickle.load` ran whatever a downloaded batch named (here: it created a file)."""
    from training.data.readers import DataError

    marker = tmp_path / "ran"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": WritesAFile(str(marker)), b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_1: the pickle asks for (io|builtins)\.open"):
        load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    assert not marker.exists()
    for broken in (pickle.dumps({b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 20})[:-40], pickle.dumps([1, 2]),
                   pickle.dumps({b"data": np.zeros((20, 3072), np.uint8), b"labels": [10] * 20})):
        (tmp_path / "data_batch_1").write_bytes(broken)
        with pytest.raises(DataError, match="data_batch_1"):
            load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))


def test_mnist_trains_at_the_configured_resolution_and_bad_files_are_named(tmp_path):
    """MNIST's 28 px fit no generator (DCGAN: 32 or 64): the data stayed 28 whatever the config said."""
    from training.data.readers import DataError

    images = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "images", images)
    write_idx(tmp_path / "labels", np.arange(30) % 10)
    train, held_out = load_dataset(DataConfig(name="mnist", path=str(tmp_path / "images"), labels_path=str(tmp_path / "labels"), resolution=32))
    assert train.x.shape[1:] == (1, 32, 32) and len(train) + len(held_out) == 30 and sorted(train.y.tolist() + held_out.y.tolist()) == sorted(np.arange(30) % 10)
    write_idx(tmp_path / "labels", images)  # a labels file of images
    (tmp_path / "cut.gz").write_bytes(gzip.compress((tmp_path / "images").read_bytes())[:300])
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 30]))
    for images_file, labels_file in (("images", "labels"), ("cut.gz", None), ("short", None)):
        with pytest.raises(DataError, match=images_file if labels_file is None else labels_file):
            load_dataset(DataConfig(name="mnist", path=str(tmp_path / images_file), labels_path=labels_file and str(tmp_path / labels_file)))


def test_a_dataset_needing_a_path_says_so():
    with pytest.raises(ValueError, match="data.path is required"):
        load_dataset(DataConfig(name="mnist"))


def test_a_users_pixels_become_the_floats_the_networks_and_judges_saw_before():
    """A user's set is held as uint8 pixels; what the generator, the judge and FID see is the
    float set the readers used to store (p / 127.5 - 1), exactly."""
    from training.data import as_floats
    from training.metrics.generic_features import RandomConvFeatures

    pixels = torch.randint(0, 256, (6, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    floats = pixels.float() / 127.5 - 1
    assert torch.equal(as_floats(pixels), floats) and as_floats(floats) is floats
    judge = RandomConvFeatures(3)
    assert np.array_equal(judge(pixels), judge(floats))
    data = TensorData(x=pixels, y=torch.arange(6))
    batch, labels = data.minibatch(6, torch.Generator().manual_seed(1))
    assert torch.equal(batch, floats[labels])
