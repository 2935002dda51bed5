"""Image-to-image building blocks and training: network shapes and size multiples, the PatchGAN
receptive field, SSIM against scikit-image, the offline datasets, the image pool, and tiny real
runs that write their evaluation next to their checkpoints and export with dynamic sizes."""
import json

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from models.superres import RRDBNet
from models.translation import PatchDiscriminator, ResnetGenerator, UnetGenerator, receptive_field
from tests.serving import REPO, tiny_i2i_run
from training.data.pairs import HELD_OUT_PHOTOS, TRAIN_PHOTOS, PhotoCrops, bicubic_upscale, edges_to_shapes, shape_domains, stroke_domains
from repository.graphs import ExportError
from training.image2image.export import export_i2i_run, load_translator
from safetensors.torch import load_file

from training.image2image.config import I2IConfig, load_i2i_config
from training.image2image.tasks import ImagePool
from training.image2image.train import linear_decay, train_image_to_image
from training.metrics.image_quality import psnr, sharpness, ssim


@pytest.mark.parametrize("num_downs,side", [(5, 32), (6, 64), (8, 256)])
def test_unet_keeps_any_multiple_of_its_size_multiple(num_downs, side):
    net = UnetGenerator(1, 3, num_downs, ngf=4).eval()
    assert net.size_multiple == 2**num_downs
    assert net(torch.zeros(1, 1, side, 2 * side)).shape == (1, 3, side, 2 * side)


def test_resnet_generator_and_rrdb_shapes():
    assert ResnetGenerator(3, 3, ngf=4, n_blocks=2)(torch.zeros(2, 3, 36, 20)).shape == (2, 3, 36, 20)
    assert RRDBNet(4, 3, features=8, blocks=1, growth=4)(torch.zeros(1, 3, 10, 7)).shape == (1, 3, 40, 28)
    assert RRDBNet(2, 3, features=8, blocks=1, growth=4)(torch.zeros(1, 3, 10, 7)).shape == (1, 3, 20, 14)


def test_patchgan_default_sees_70_pixel_patches():
    assert receptive_field(3) == 70
    assert PatchDiscriminator(6, 8, 3)(torch.zeros(1, 6, 256, 256)).shape == (1, 1, 30, 30)


def test_ssim_matches_scikit_image_and_psnr_its_closed_form():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 32, 32))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ta, tb = torch.tensor(a * 2 - 1), torch.tensor(b * 2 - 1)
    reference = np.mean([structural_similarity(a[i], b[i], channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                         for i in range(2)])
    assert ssim(ta, tb) == pytest.approx(reference, abs=1e-6)
    assert ssim(ta, ta) == pytest.approx(1.0)
    mse = ((a - b) ** 2).reshape(2, -1).mean(1)
    assert psnr(ta, tb) == pytest.approx(np.mean(10 * np.log10(1 / mse)), abs=1e-6)


def test_bicubic_upscale_is_blurrier_than_the_original():
    crops = PhotoCrops(HELD_OUT_PHOTOS, 64, "superres", 4).fixed(8, seed=0)
    assert crops.a.shape == (8, 3, 16, 16) and crops.b.shape == (8, 3, 64, 64)
    assert sharpness(bicubic_upscale(crops.a, 4)) < sharpness(crops.b)


def test_photo_splits_hold_out_whole_photos_and_colorize_pairs_are_luma():
    assert not set(TRAIN_PHOTOS) & set(HELD_OUT_PHOTOS)
    pairs = PhotoCrops(TRAIN_PHOTOS, 32, "colorize").fixed(4, seed=0)
    assert pairs.a.shape == (4, 1, 32, 32) and pairs.b.shape == (4, 3, 32, 32)
    weights = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    assert torch.allclose(pairs.a, (pairs.b * weights).sum(1, keepdim=True))


def test_rotated_crops_are_the_eight_symmetries_of_photo_patches():
    crops = PhotoCrops(TRAIN_PHOTOS, 8, "superres", 4, rotate=True)
    crops.photos = [np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)]  # one photo, one crop position
    square = crops.photos[0]
    symmetries = {np.rot90(flip, k).tobytes() for flip in (square, square[:, ::-1]) for k in range(4)}
    drawn = {c.tobytes() for c in crops.crops(200, torch.Generator().manual_seed(3))}
    assert drawn == symmetries and len(symmetries) == 8


def test_sr_learning_rate_decays_to_zero_at_the_end_of_each_phase():
    sr = I2IConfig(task="superres", data={"name": "photo_sr", "resolution": 64}, model={"generator": "rrdb"},
                   loss={"pretrain_steps": 1000}, optim={"decay_start": 0.8}, max_steps=1500)
    assert [linear_decay(sr, s) for s in (0, 799, 900, 999)] == [1.0, 1.0, pytest.approx(0.5), pytest.approx(0.005)]
    assert [linear_decay(sr, s) for s in (1000, 1399, 1450, 1499)] == [1.0, 1.0, pytest.approx(0.5), pytest.approx(0.01)]
    pix2pix = I2IConfig(task="pix2pix", optim={"decay_start": 0.5}, max_steps=100)
    assert [linear_decay(pix2pix, s) for s in (49, 75)] == [1.0, pytest.approx(0.5)]


def test_outlines_lie_on_their_shapes_and_domains_are_pure():
    pairs = edges_to_shapes(16, 32, seed=0)
    on = pairs.a.max(dim=1).values > -1
    assert on.any() and (pairs.b.max(dim=1).values[on] > -0.5).all()  # every outline pixel is on the shape
    assert on.sum() < (pairs.b.max(dim=1).values > -0.5).sum() / 2  # and an outline is thinner than the fill
    thin, thick = stroke_domains("held_out")
    assert thin.x.shape[1] == 1 and (thin.x > 0).float().mean() < (thick.x > 0).float().mean()
    circles, squares = shape_domains("circle", "square", 20, 32, seed=0)
    assert (circles.y == 0).all() and (squares.y == 1).all() and len(circles) == len(squares) == 20


def test_image_pool_returns_current_images_until_full_then_mixes_in_history():
    import random

    pool = ImagePool(4, random.Random(0))
    first = torch.arange(4.0)[:, None]
    assert torch.equal(pool.query(first), first)
    later = pool.query(torch.full((64, 1), 9.0))
    assert (later == 9).any() and (later < 9).any()


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    return tiny_i2i_run("sr-rrdb-x4", tmp_path_factory.mktemp("sr") / "run", model={"features": 8, "blocks": 1, "growth": 4}, data={"resolution": 32})


def test_sr_run_records_l1_model_and_gan_metrics_against_bicubic(sr_run):
    metrics = json.loads((sr_run / "metrics.json").read_text())
    assert {"psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "sharpness", "target_sharpness", "psnr_gain_db"} <= set(metrics["last"])
    assert metrics["l1_model"]["step"] == 1 and (sr_run / "checkpoints" / "l1.safetensors").exists()
    assert any((sr_run / "samples").glob("*.png")) and (sr_run / "curves.png").exists()


def test_pix2pix_and_cyclegan_runs_report_against_their_baselines(tmp_path):
    p2p = json.loads((tiny_i2i_run("pix2pix-edges2shapes", tmp_path / "p2p", model={"ngf": 4}) / "metrics.json").read_text())
    assert {"psnr", "ssim", "l1", "input_psnr", "mean_colour_psnr"} <= set(p2p["last"])
    cycle = json.loads((tiny_i2i_run("cyclegan-circles2squares", tmp_path / "cycle", model={"ngf": 4, "n_blocks": 1}) / "metrics.json").read_text())
    assert {"domain_accuracy", "input_accuracy", "cycle_l1"} <= set(cycle["last"])
    assert cycle["last"]["input_accuracy"] < 0.2  # the classifier does not read untranslated circles as squares
    strokes = json.loads((tiny_i2i_run("cyclegan-thin2thick", tmp_path / "strokes", model={"ngf": 4, "n_blocks": 1}) / "metrics.json").read_text())
    assert strokes["last"]["classifier_accuracy"] > 0.9 and strokes["last"]["input_accuracy"] < 0.1
    assert strokes["last"]["digit_read_on_real_thick"] > 0.9 and "digit_kept" in strokes["last"]


def test_export_has_dynamic_height_and_width_and_rebuilds_in_eval_mode(sr_run, tmp_path):
    import onnxruntime as ort

    entry = export_i2i_run(sr_run, "sr", 1, tmp_path / "repo", ["onnx", "torchscript"])
    spec = json.loads((entry / "spec.json").read_text())
    assert spec["kind"] == "super_resolution" and spec["scale"] == 4 and spec["size_multiple"] == 1
    assert spec["inputs"][0]["shape"] == [-1, 3, -1, -1]
    assert all(f["parity_max_abs_error"] <= 1e-4 for name, f in spec["formats"].items() if name != "eager")
    generator, _, _ = load_translator(sr_run)
    x = torch.rand(2, 3, 13, 21) * 2 - 1
    session = ort.InferenceSession(str(entry / "model.onnx"))
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], generator(x).numpy(), atol=1e-4)
    with pytest.raises(ExportError):
        export_i2i_run(sr_run, "sr", 1, tmp_path / "repo", ["tflite"])


def tiny_i2i_config(config: str, **changes) -> I2IConfig:
    cfg = load_i2i_config(REPO / "configs" / f"{config}.yaml").model_dump()
    cfg.update(batch_size=2, pool_size=4)
    cfg["data"].update(size=16, held_out=4)
    for section, values in changes.items():
        cfg[section].update(values) if isinstance(values, dict) else cfg.update({section: values})
    return I2IConfig.model_validate(cfg)


def halted_and_resumed_equals_straight(tmp_path, monkeypatch, cfg: I2IConfig, task_class, halt_after: int) -> tuple:
    """Trains `cfg` straight, and again killed after `halt_after` steps (past a checkpoint) then
    resumed; asserts both end with the same last and best checkpoints; returns both run dirs."""
    straight, halted = tmp_path / "straight", tmp_path / "halted"
    train_image_to_image(cfg, straight, show_progress=False)
    real_step = task_class.step

    def dies(self, step):
        if step == halt_after:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(task_class, "step", dies)
    with pytest.raises(KeyboardInterrupt):
        train_image_to_image(cfg, halted, show_progress=False)
    monkeypatch.setattr(task_class, "step", real_step)
    train_image_to_image(cfg, halted, resume=True, show_progress=False)
    for name in ("last", "best"):
        a = load_file(str(straight / "checkpoints" / f"{name}.safetensors"))
        b = load_file(str(halted / "checkpoints" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    # the log holds each step once: rows past the checkpoint were replaced, not appended again
    steps = [int(line.split(",")[0]) for line in (halted / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, cfg.max_steps + 1))
    return straight, halted


def test_halted_and_resumed_cyclegan_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    from training.image2image.tasks import CycleGAN

    # pool of 2, 2 images a step: from step 2 on D sees pooled fakes, so the run resumed from step 2 needs the pool and its random state
    cfg = tiny_i2i_config("cyclegan-circles2squares", model={"ngf": 4, "n_blocks": 1, "ndf": 8}, pool_size=2, max_steps=4, eval_every=2, sample_every=4)
    straight, _ = halted_and_resumed_equals_straight(tmp_path, monkeypatch, cfg, CycleGAN, halt_after=3)
    assert load_file(str(straight / "checkpoints" / "last.safetensors"))["pool.a"].shape[0] == 2
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["best"]["metric"] == "domain_accuracy" and "domain classifier" in metrics["best"]["judge"]


def test_halted_and_resumed_sr_run_crosses_its_phase_change_exactly(tmp_path, monkeypatch):
    from training.image2image.tasks import SuperResolution

    # L1 phase steps 1-3 (the `l1` checkpoint at 3), GAN phase 4-5; killed in step 4, resumed from step 2
    cfg = tiny_i2i_config("sr-rrdb-x4", model={"features": 8, "blocks": 1, "growth": 4}, data={"resolution": 32},
                          loss={"pretrain_steps": 3}, max_steps=5, eval_every=2, sample_every=5)
    straight, halted = halted_and_resumed_equals_straight(tmp_path, monkeypatch, cfg, SuperResolution, halt_after=3)
    a, b = (load_file(str(run / "checkpoints" / "l1.safetensors")) for run in (straight, halted))
    assert all(torch.equal(a[key], b[key]) for key in a)
    metrics = json.loads((halted / "metrics.json").read_text())
    assert metrics["l1_model"]["step"] == 3
    assert metrics["best"]["step"] > 3  # the best GAN model: the L1 model has its own checkpoint


def test_the_colour_shift_measure_reads_the_hue_a_translation_moved_the_shape_to():
    """docs/results.md reports what turning CycleGAN's identity loss down costs in colour: a hue
    change of each shape from input to output, on the colour wheel."""
    from training.data.shapes import render_shape
    from training.image2image.results import hue_gaps

    def shapes(hues: list[float], shape: int) -> torch.Tensor:
        images = np.stack([render_shape(32, shape, hue, 0.5, 0.5, 0.5, 0.3) for hue in hues])
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

    hues = [0.0, 0.2, 0.5, 0.9]
    same_colour_other_shape = hue_gaps(shapes(hues, 0), shapes(hues, 1))
    assert np.all(same_colour_other_shape < 3)  # a circle drawn as a square of its own colour moved no hue
    turned = hue_gaps(shapes(hues, 0), shapes([(h + 1 / 3) % 1 for h in hues], 1))
    assert np.allclose(turned, 120, atol=3)  # a third of the wheel is 120°, whichever way round
    wrapped = hue_gaps(shapes([0.95], 0), shapes([0.05], 0))
    assert np.allclose(wrapped, 36, atol=3)  # across red, the short way
