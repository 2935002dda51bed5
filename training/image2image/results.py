"""The image-to-image section of docs/results.md: pix2pix against trivial baselines, CycleGAN's
domain accuracy and cycle error, super-resolution against bicubic (L1 model and GAN fine-tune)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

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
