"""The image-to-image section of docs/results.md: pix2pix against trivial baselines, CycleGAN's
domain accuracy and cycle error, super-resolution against bicubic (L1 model and GAN fine-tune)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

PIX2PIX = {"pix2pix-edges2shapes": "outline → filled shape (32 px shapes)", "pix2pix-gray2color": "luma → colour (64 px photo crops)"}
CYCLEGAN = {"cyclegan-thin2thick": ("thin digits", "thick digits", "a small CNN trained on the real thin/thick training digits"),
            "cyclegan-circles2squares": ("circles", "squares", "the shipped shapes predictor")}
SUPERRES = {"sr-rrdb-x4": 4, "sr-rrdb-x2": 2}
IMAGES = Path("docs/images")


def last_samples(run_dir: Path, name: str) -> str:
    samples = sorted((run_dir / "samples").glob("*.png"))
    if not samples:
        return ""
    IMAGES.mkdir(parents=True, exist_ok=True)
    shutil.copy(samples[-1], IMAGES / f"{name}.png")
    return f"![{name}](images/{name}.png)"


def triple(m: dict, prefix: str = "") -> str:
    return f"{m[prefix + 'l1']:.4f} / {m[prefix + 'psnr']:.2f} / {m[prefix + 'ssim']:.3f}"


def steps(record: dict, config_name: str) -> str:
    """The steps run, flagged when a time budget stopped the run short of its config."""
    import yaml

    planned = yaml.safe_load((Path("configs") / f"{config_name}.yaml").read_text())["max_steps"]
    return f"{record['step']} steps" + ("" if record["step"] >= planned else f" of {planned}: stopped by its time budget")


def image_to_image_section(runs: Path, train_once: Callable[[str, Path], dict], wall_minutes: Callable[[dict, Path], float]) -> list[str]:
    lines = [
        "## Image-to-image: pix2pix, CycleGAN, super-resolution",
        "",
        "Held-out data never seen in training: freshly generated shapes (seed 1) and crops of whole held-out photos "
        "(scikit-image's `chelsea` and `coffee`; training crops come from `astronaut`, `rocket`, `hubble_deep_field`, "
        "`immunohistochemistry`, `retina`). Pixel metrics on the [0, 1] scale, averaged per image; SSIM with an 11x11 Gaussian window "
        "(σ 1.5), checked against scikit-image in the tests. Train times were measured with two or three runs sharing the 2 cores: "
        "read them as upper bounds.",
        "",
        "### pix2pix (U-Net + 70x70 PatchGAN, λ_L1 = 100), last checkpoint",
        "",
        "| task | model L1 / PSNR dB / SSIM | input as output | mean training colour everywhere | train time (2 cores) |",
        "|---|---|---|---|---|",
    ]
    pictures = []
    for name, title in PIX2PIX.items():
        record = train_once(name, runs / name)
        m = record["last"]
        lines.append(f"| {title} (`configs/{name}.yaml`, {steps(record, name)}) | {triple(m)} | {triple(m, 'input_')} | {triple(m, 'mean_colour_')} "
                     f"| {wall_minutes(record, runs / name):.1f} min |")
        pictures.append(last_samples(runs / name, name))
    lines += ["", "Held-out samples (rows: input, pix2pix output, target):", "", *pictures, ""]

    lines += [
        "### CycleGAN (ResNet generators, PatchGAN, LSGAN, cycle λ = 10, identity 0.5λ, pool 50), last checkpoint",
        "",
        "Domain accuracy: the share of translated held-out images the domain classifier reads as the target domain (target ≥ 90 %). "
        "For digits, the shipped digits classifier also checks that the translation keeps the digit (a blotted image could pass for thick).",
        "",
        "| domains A ↔ B (config) | classifier (held-out real accuracy) | A → B read as B | B → A read as A | untranslated A read as B | cycle A → B → A L1 / PSNR | digit kept A → B | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pictures = []
    for name, (a, b, judge) in CYCLEGAN.items():
        record = train_once(name, runs / name)
        m = record["last"]
        kept = f"{100 * m['digit_kept']:.1f} % (real thick: {100 * m['digit_read_on_real_thick']:.1f} %)" if "digit_kept" in m else "—"
        lines.append(f"| {a} ↔ {b} (`configs/{name}.yaml`) | {judge} ({100 * m.get('classifier_accuracy', 1.0):.1f} %) | {100 * m['domain_accuracy']:.1f} % "
                     f"| {100 * m['domain_accuracy_ba']:.1f} % | {100 * m['input_accuracy']:.1f} % | {m['cycle_l1']:.4f} / {m['cycle_psnr']:.2f} dB | {kept} "
                     f"| {wall_minutes(record, runs / name):.1f} min ({steps(record, name)}) |")
        pictures.append(last_samples(runs / name, name))
    lines += ["", "Held-out samples (rows: A, A → B, A → B → A):", "", *pictures, ""]
    lines += [
        "### Super-resolution (ESRGAN-lite RRDB), held-out photo crops, borders of `scale` px shaved",
        "",
        "The L1 model is the pre-trained checkpoint (`checkpoints/l1`); the GAN model continues from it with a relativistic "
        "average GAN loss (weight 0.005) and a feature loss from the shapes predictor's first two conv blocks. Sharpness is the mean luma "
        "gradient (higher is crisper).",
        "",
        "| scale | bicubic PSNR / SSIM | L1 model PSNR / SSIM | gain over bicubic (target ≥ 1 dB at x4) | GAN PSNR / SSIM | sharpness: bicubic / L1 / GAN / original | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    pictures = []
    for name, scale in SUPERRES.items():
        record = train_once(name, runs / name)
        gan, l1 = record["last"], record.get("l1_model") or record["last"]
        lines.append(
            f"| x{scale} (`configs/{name}.yaml`) | {gan['bicubic_psnr']:.2f} / {gan['bicubic_ssim']:.3f} | {l1['psnr']:.2f} / {l1['ssim']:.3f} | "
            f"{l1['psnr'] - l1['bicubic_psnr']:+.2f} dB | {gan['psnr']:.2f} / {gan['ssim']:.3f} | "
            f"{gan['bicubic_sharpness']:.4f} / {l1['sharpness']:.4f} / {gan['sharpness']:.4f} / {gan['target_sharpness']:.4f} | "
            f"{wall_minutes(record, runs / name):.1f} min ({steps(record, name)}) |"
        )
        pictures.append(last_samples(runs / name, name))
    lines += ["", "Before/after on held-out crops (rows: nearest-neighbour input, bicubic, GAN model, original):", "", *pictures, ""]
    return lines


def trade_off(records: dict[str, dict], colours: dict[str, dict[str, float]]) -> str:
    """What the identity-weight table says, read together: colour against shape."""
    shipped, last = "cyclegan-circles2squares", list(IDENTITY_RUNS)[-1]
    drops = [a["domain_accuracy"] - b["domain_accuracy"] for r in records.values() for a, b in zip(r["history"], r["history"][1:])]
    return (f"Read together, the identity loss trades colour for shape here. At 0.5λ each shape keeps its hue (median change "
            f"{colours[shipped]['median_hue_shift_deg']:.0f}°) and A → B stays at {100 * records[shipped]['last']['domain_accuracy']:.0f} %; at "
            f"{IDENTITY_RUNS[last]}, A → B reaches {100 * records[last]['last']['domain_accuracy']:.0f} %, but G_AB recolours the shapes (median "
            f"{colours[last]['median_hue_shift_deg']:.0f}°, {100 * colours[last]['within_30_deg']:.0f} % within 30°) and G_BA colours them back, "
            "which the cycle term cannot see. No weight tried gets both. One seed was run per setting, and A → B falls by up to "
            f"{100 * max(drops):.0f} points from one evaluation to the next, 500 steps on, so a row's last figure is not a settled value. "
            "The shipped config's run here and the one in the table above (53 %) differ: that one dates from an earlier session, and which "
            "difference (code, thread count) moved it was not checked.")


def cycle_probe(run_dir: Path, noise: float = 0.02) -> dict[str, float]:
    """How a trained CycleGAN's A → B generator behaves on real A images versus on its partner's
    translations of B (fake A), on held-out data.

    A circle carries no rotation and a square does, so the B → A → B cycle can only be closed if
    G_BA hides the square's rotation in its circle and G_AB reads it back (CycleGAN's
    steganography, Chu et al. 2017). Then G_AB draws squares from fake circles but not from real
    ones, and faint noise on the fake circle (`noise`, on the [-1, 1] scale: ~2.5 grey levels)
    breaks the reconstruction. Returns the share read as B for G_AB(real A), G_AB(fake A) and
    G_AB(fake A + noise), and the B → A → B L1 without and with the noise."""
    import json

    from training.checkpoint import load_checkpoint
    from training.image2image.config import I2IConfig
    from training.image2image.tasks import CycleGAN, run_batched

    cfg = I2IConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    task = CycleGAN(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    load_checkpoint(run_dir / "checkpoints" / "last.safetensors", task.modules())
    task.build_judge()
    a, b = task.held_a.x, task.held_b.x
    fake_a = run_batched(task.G_ba, b, task.device)
    noisy = fake_a + noise * torch.randn(fake_a.shape, generator=torch.Generator().manual_seed(1))
    out_real, out_fake, out_noisy = (run_batched(task.G_ab, x, task.device) for x in (a, fake_a, noisy))
    read_b = lambda x: float((task.domain_of(x) == 1).float().mean())  # noqa: E731
    with torch.no_grad():
        classes = task.judge(out_real)[0].argmax(1)
    from training.data.shapes import SHAPE_NAMES

    return {
        **{f"real_a_read_as_{name}": float((classes == i).float().mean()) for i, name in enumerate(SHAPE_NAMES)},
        "real_a_read_as_b": read_b(out_real), "fake_a_read_as_b": read_b(out_fake), "noisy_fake_a_read_as_b": read_b(out_noisy),
        "cycle_b_l1": float(((out_fake.clamp(-1, 1) - b) / 2).abs().mean()), "cycle_b_l1_noisy": float(((out_noisy.clamp(-1, 1) - b) / 2).abs().mean()),
    }


# The identity-weight runs (config: row title); the last one listed is probed and pictured.
IDENTITY_RUNS = {
    "cyclegan-circles2squares": "identity 0.5λ as shipped, 2,500 steps",
    "cyclegan-circles2squares-identity0": "identity 0, 2,500 steps",
    "cyclegan-circles2squares-identity01": "identity 0.1λ, 2,500 steps",
    "cyclegan-circles2squares-identity01-4000": "identity 0.1λ, 4,000 steps",
    "cyclegan-circles2squares-identity01-6000": "identity 0.1λ, 6,000 steps",
}
# Earlier attempts, kept as text (their runs are not rebuilt by `ganserve results`).
CIRCLES_SQUARES_TRIED = [
    "λ = 3 for both cycles: stopped at step ~500 of 2,500 to give the shared machine to another run (no result).",
    "λ_B = 1, λ_A = 10 (`configs/cyclegan-circles2squares-lambda-b1.yaml`, junyanz's lambda_B), testing the hidden-code hypothesis: a circle "
    "carries no rotation and a square does, so square → circle → square comes back exactly only if G_BA hides the rotation in its circle and "
    "G_AB reads it back (CycleGAN's steganography, Chu et al. 2017). A → B ended at 45 % (B → A 99 %, 72 min for 2,500 steps on the shared "
    "machine). Its G_AB read 45 % of real circles as squares, 28 % as circles and 27 % as triangles, and 60 % of G_BA's circles as squares; "
    "faint noise (σ = 0.02) on those changed neither the reading nor the B → A → B L1 (0.0193), so it did not depend on a hidden code. "
    "Not supported: what failed was drawing (polygons with the wrong number of corners).",
    "The identity weight, this section's runs (table above): at 0.5λ = 5 the identity term G_AB(square) ≈ square outweighs the adversarial "
    "one, and G_AB is pulled toward the identity, which maps circles to circles.",
    "Not tried: an identity weight between 0.1λ and 0.5λ, which might keep more colour and still draw squares; a wider generator "
    "(ngf 32); noise on the cycle's intermediate image (`loss.cycle_noise`, tested only by unit tests).",
]


def circles_squares_section(runs: Path, train_once: Callable[[str, Path], dict], wall_minutes: Callable[[dict, Path], float]) -> list[str]:
    """CycleGAN circles ↔ squares: the identity-weight runs (shape read by the shapes predictor,
    colour kept or not), each run's history, and how the last one's A → B generator reads real
    circles against its partner's fake ones."""
    records = {name: train_once(name, runs / name) for name in IDENTITY_RUNS}
    rows, histories = [], []
    colours = {name: colour_shift(runs / name) for name in IDENTITY_RUNS}
    for name, title in IDENTITY_RUNS.items():
        record, m, colour = records[name], records[name]["last"], colours[name]
        best = max(record["history"], key=lambda h: h["domain_accuracy"])
        rows.append(f"| {title} (`configs/{name}.yaml`) | {100 * m['domain_accuracy']:.1f} % | {100 * m['domain_accuracy_ba']:.1f} % "
                    f"| {100 * best['domain_accuracy']:.1f} % (step {best['step']}) | {colour['median_hue_shift_deg']:.0f}° / {100 * colour['within_30_deg']:.0f} % "
                    f"| {m['cycle_psnr']:.2f} dB | {wall_minutes(record, runs / name):.1f} min ({steps(record, name)}) |")
        histories.append(f"{title}: " + " · ".join(f"{h['step']}: {100 * h['domain_accuracy']:.0f} / {100 * h['domain_accuracy_ba']:.0f} %" for h in record["history"]))
    probed = list(IDENTITY_RUNS)[-1]
    probe = cycle_probe(runs / probed)
    met = [n for n, r in records.items() if r["last"]["domain_accuracy"] >= 0.9 and r["last"]["domain_accuracy_ba"] >= 0.9]
    shipped = colours["cyclegan-circles2squares"]["median_hue_shift_deg"]
    verdict = ("The ≥ 90 % target both ways is reached at the last checkpoint by: "
               + ", ".join(f"{IDENTITY_RUNS[n]} (median hue change {colours[n]['median_hue_shift_deg']:.0f}°, against {shipped:.0f}° as shipped)" for n in met)
               + "." if met else "No run reaches the ≥ 90 % target both ways.")
    return [
        "## CycleGAN circles ↔ squares: why A → B falls short",
        "",
        f"The shipped config (`configs/cyclegan-circles2squares.yaml`, identity weight 0.5λ) translates circles into shapes read as squares "
        f"about half of the time (first row). The other runs turn the identity loss down; everything else is as shipped. {verdict} "
        "A → B and B → A are the shares of held-out translations the shapes predictor reads as the target shape, at the last checkpoint "
        "(the best A → B over the evaluations beside it); the hue column is the median change of each shape's hue from circle to square, "
        "and the share within 30° (`colour_shift` in `training/image2image/results.py`), the colour the identity loss exists to keep.",
        "",
        "| run | A → B read as B | B → A read as A | best A → B | hue change: median / within 30° | cycle A → B → A PSNR | train time |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        trade_off(records, colours),
        "",
        "Every evaluation (step: A → B / B → A read correctly):",
        "",
        *[f"- {line}" for line in histories],
        "",
        f"What {IDENTITY_RUNS[probed]}'s G_AB makes of real circles, and of G_BA's circles (held-out, last checkpoint; noise σ = 0.02 on [−1, 1], "
        "about 2.5 grey levels), as the shapes predictor reads them:",
        "",
        "| G_AB applied to | read as a square | read as a circle | read as a triangle | B → A → B L1 |",
        "|---|---|---|---|---|",
        f"| real held-out circles | {100 * probe['real_a_read_as_square']:.1f} % | {100 * probe['real_a_read_as_circle']:.1f} % | {100 * probe['real_a_read_as_triangle']:.1f} % | — |",
        f"| G_BA's circles made from held-out squares | {100 * probe['fake_a_read_as_b']:.1f} % | | | {probe['cycle_b_l1']:.4f} |",
        f"| the same with the faint noise added | {100 * probe['noisy_fake_a_read_as_b']:.1f} % | | | {probe['cycle_b_l1_noisy']:.4f} |",
        "",
        "What was tried:",
        "",
        *[f"- {line}" for line in CIRCLES_SQUARES_TRIED],
        "",
        f"Held-out samples of {IDENTITY_RUNS[probed]}, last checkpoint (rows: A, A → B, A → B → A):",
        "",
        last_samples(runs / probed, probed),
        "",
    ]


def shape_hues(images: torch.Tensor) -> np.ndarray:
    """The hue (degrees) of the mean colour of each image's shape pixels (the background is black)."""
    import colorsys

    rgb = (images.clamp(-1, 1) + 1) / 2
    shape = rgb.amax(1, keepdim=True) > 0.25
    mean = (rgb * shape).sum((2, 3)) / shape.sum((2, 3)).clamp(min=1)
    return np.array([colorsys.rgb_to_hsv(*m)[0] * 360 for m in mean.tolist()])


def hue_gaps(before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    """Per image, how far the shape's hue moved, in degrees on the colour wheel (0–180)."""
    gap = np.abs(shape_hues(before) - shape_hues(after)) % 360
    return np.minimum(gap, 360 - gap)


def colour_shift(run_dir: Path) -> dict[str, float]:
    """How far a CycleGAN's A → B generator moves the colour of held-out shapes (last checkpoint):
    median hue change and the share within 30°. CycleGAN's identity loss exists to keep colour
    (Zhu et al. 2017, §5.2); this measures what turning it down costs."""
    import json

    from training.checkpoint import load_checkpoint
    from training.image2image.config import I2IConfig
    from training.image2image.tasks import CycleGAN, run_batched

    cfg = I2IConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    task = CycleGAN(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    load_checkpoint(run_dir / "checkpoints" / "last.safetensors", task.modules())
    gaps = hue_gaps(task.held_a.x, run_batched(task.G_ab, task.held_a.x, task.device))
    return {"median_hue_shift_deg": float(np.median(gaps)), "within_30_deg": float((gaps <= 30).mean())}
