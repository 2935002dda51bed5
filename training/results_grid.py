"""The grid25 seed-robustness section of docs/results.md: the chosen recipe on every seed, the
two WGAN critics (weight clipping, gradient penalty) side by side, and where each model's samples
sit relative to the modes, which is what the high-quality fraction measures.

The runs are trained by `train_once` (reused when their metrics.json exists), so `ganserve results
--sections grid-seeds` rebuilds this section alone.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from training.data.gaussians import mixture
from training.metrics.modes import distance_profile, mode_metrics

RECIPE = "nsgan-r1-pack2-grid25"  # the chosen recipe: its config is configs/<RECIPE>.yaml
RECIPE_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)  # screened on seed 1 only; the SN-hinge baseline was tuned on 0-2
PROFILED = {  # config: (row title, seeds)
    RECIPE: ("non-saturating + R1, pack 2, 30k steps (the recipe)", RECIPE_SEEDS),
}
WGAN_CLIP = ("wgan-clip-grid25", "WGAN, weight clipping (c = 0.01)", (0,))
WITH_WGAN_CLIP = True  # False drops its row (its run is the slowest of the section)
if WITH_WGAN_CLIP:
    PROFILED[WGAN_CLIP[0]] = WGAN_CLIP[1:]
PROFILE_SAMPLES, PROFILE_SEED = 5000, 7
CHANCE_SAMPLES = 200_000


def planned_steps(name: str) -> int:
    import yaml

    return int(yaml.safe_load((Path("configs") / f"{name}.yaml").read_text())["max_steps"])


def cloud_chance(centres: np.ndarray, std: float, half_width: float = 5.0) -> float:
    """The high-quality fraction of a cloud spread evenly over [-half_width, half_width]²: what a
    generator scores by chance, with no mode learnt."""
    cloud = np.random.default_rng(0).uniform(-half_width, half_width, (CHANCE_SAMPLES, 2))
    return distance_profile(cloud, centres, std)["within_3_sigma"]
TARGET_MODES, TARGET_HQ = 24, 0.90

# Screening runs (runs/screen/, `runs/run.py CONFIG OUT SEED key=value…` on the shared 2-core
# machine): each line is one config change against configs/sngan-hinge-grid25.yaml, the seed it
# ran on, and its best checkpoint. Kept as text: they are not rebuilt by `ganserve results`.
TRIED = [
    "SN-hinge as shipped (`configs/sngan-hinge-grid25.yaml`, first table): seeds 0 / 1 / 2 reach 25 / 92 %, 24 / 37 %, 25 / 93 %; "
    "seed 1 sits on 6 modes for 10k of its 20k steps.",
    "SN-hinge with `model.pack: 2` (PacGAN2), 20k steps, seed 1: 25 modes from step 8000 on (no collapse), but 77.5 % high quality at step 20000 "
    "(reverse KL 0.019): the missing 22 % lie on bridges between neighbouring modes (11 % beyond 10σ), not in wide modes (median distance "
    "0.88σ, tighter than the data's 1.18σ). High quality was still rising as the learning rate reached 0 (59, 68, 76, 78 % at steps 14k–20k). "
    "Its D never left the hinge's linear region (loss_d ≈ 2.0, D(real) ≈ D(fake) ≈ 0.15–0.3 at every 2,000th step): spectral norm bounds "
    "its slope, so it acts as a Lipschitz critic, and the pull on a bridge sample toward a mode stays small.",
    "SN-hinge, `model.pack: 4`, 20k steps, seed 1: 18–24 modes and ≤ 8 % high quality up to step 14000; stopped there.",
    "SN-hinge, `model.pack: 2` with 256-wide G and D, seed 1: slower than width 128 at every evaluation (15 % against 31 % high quality at step 8000); "
    "stopped there.",
    "SN-hinge, `model.pack: 2`, linear decay stretched to 30k steps (`configs/sngan-hinge-pack2-grid25.yaml`, last session's candidate): "
    "25 modes on seeds 1, 3 and 4 with 90.1, 89.8 and 88.6 % high quality (89.3 % of 5,000 fresh samples within 3σ, median 0.64σ): "
    "at the bar on one seed and under it on two. High quality rose 78 → 83 → 86 % at steps 14k–18k, then flattened at 88–89 %.",
    "The same with an R1 penalty added (γ = 0.5), seed 1: 57 % high quality at step 12000, behind the SN-hinge candidate's pace; stopped there. "
    "With spectral norm bounding D's slope, R1 only flattens it further at the data.",
    "The non-saturating loss with R1 (γ = 1) on an MLP critic without spectral norm, pack 2, lr 5e-4, 30k steps, seed 1 (the screening run of "
    "the recipe; the table's seed 1 is this run): 25 modes, 93.0 % high quality, against 90.1 % for the SN-hinge candidate on the same seed. "
    "This changed four things at once (loss, R1, no spectral norm, lr), so which of them matters was not separated. A likely reason, not "
    "measured: unlike spectral norm, R1 bounds D's slope only at the real samples, so D can score the bridges between modes steeply low "
    "and pull their samples in. High quality passed the SN-hinge candidate's at step 22000 (91.8 %) and kept rising to the end.",
    "Two variants of the recipe, seed 1, each stopped early to give the machine to the recipe's seeds (no result): batch 1024 "
    "(22 % at step 4000) and no packing (33 % at step 6000).",
]


def _samples(run_dir: Path, checkpoint: str = "best") -> np.ndarray:
    from training.run_eval import load_generator

    generator, spec, _ = load_generator(run_dir, checkpoint)
    z = torch.randn(PROFILE_SAMPLES, spec.z_dim, generator=torch.Generator().manual_seed(PROFILE_SEED))
    with torch.no_grad():
        return generator(z).numpy()


def clipped_share(run_dir: Path) -> float:
    """The share of the critic's weights sitting at the clipping bound (|w| ≥ 0.99 c) in the last
    checkpoint: Gulrajani et al. (2017) observed clipping drives most weights to ±c."""
    import json

    from models.spec import ModelSpec
    from models.zoo import build_discriminator
    from training.checkpoint import load_checkpoint
    from training.config import TrainConfig

    meta = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    cfg = TrainConfig.model_validate(meta["config"])
    critic = build_discriminator(ModelSpec.from_dict(meta["spec"]), cfg.model.discriminator, cfg.model.pack)
    load_checkpoint(run_dir / "checkpoints" / "last.safetensors", {"D": critic})
    weights = torch.cat([p.detach().flatten() for p in critic.parameters()])
    return float((weights.abs() >= 0.99 * cfg.loss.clip).float().mean())


def _pct(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f} %" if len(values) > 1 else f"{100 * values[0]:.1f} %"


def _mean(values: list[float], fmt: str) -> str:
    return format(statistics.mean(values), fmt)


def grid_seeds_section(runs: Path, train_once: Callable[..., dict], wall_minutes: Callable[[dict, Path], float]) -> list[str]:
    grid = mixture("grid25")
    centres, std = grid.centres.numpy(), grid.std
    lines = [
        "## 2-D grid of 25 Gaussians: seed robustness",
        "",
        f"The recipe (`configs/{RECIPE}.yaml`) on seed{'s' if len(RECIPE_SEEDS) > 1 else ''} {', '.join(map(str, RECIPE_SEEDS))}, "
        "best checkpoint (lowest `mode_kl`, below) and last. "
        f"Target: ≥ {TARGET_MODES} modes and ≥ {100 * TARGET_HQ:.0f} % high-quality samples on every seed. Train time is wall time on the "
        "project's 2-core CPU machine, which other jobs shared while these ran: read it as an upper bound.",
        "",
        "| seed | modes covered (of 25) | high-quality samples | reverse KL | mode_kl | best step | last checkpoint: modes / high quality / reverse KL | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    records = [train_once(RECIPE, runs / f"{RECIPE}-seed{seed}", seed) for seed in RECIPE_SEEDS]
    for seed, record in zip(RECIPE_SEEDS, records):
        best, last = record["best"]["metrics"], record["last"]
        lines.append(f"| {seed} | {best['modes_covered']} | {100 * best['high_quality_fraction']:.1f} % | {best['reverse_kl']:.3f} | {best['mode_kl']:.3f} | {record['best']['step']} "
                     f"| {last['modes_covered']} / {100 * last['high_quality_fraction']:.1f} % / {last['reverse_kl']:.3f} "
                     f"| {wall_minutes(record, runs / f'{RECIPE}-seed{seed}'):.1f} min |")
    from training.results import copy_picture

    for seed, record in zip(RECIPE_SEEDS, records):
        copy_picture(runs / f"{RECIPE}-seed{seed}", record["best"]["step"], Path("docs/images") / f"{RECIPE}-seed{seed}.png")
    best = [r["best"]["metrics"] for r in records]
    missing = [seed for seed in range(5) if seed not in RECIPE_SEEDS]
    held = all(b["modes_covered"] >= TARGET_MODES and b["high_quality_fraction"] >= TARGET_HQ for b in best)
    lines += [
        f"| worst seed | {min(b['modes_covered'] for b in best)} | {100 * min(b['high_quality_fraction'] for b in best):.1f} % "
        f"| {max(b['reverse_kl'] for b in best):.3f} | {max(b['mode_kl'] for b in best):.3f} | | | |",
        "",
        f"The issue's target on ≥ 5 seeds: **{('met' if len(RECIPE_SEEDS) >= 5 else 'not shown') if held else 'not met'}**. "
        f"Seed{'s' if len(RECIPE_SEEDS) > 1 else ''} run: {', '.join(map(str, RECIPE_SEEDS))} ({'every one meets' if held else 'not every one meets'} "
        "≥ 24 modes and ≥ 90 % at the evaluation)"
        + (f"; seed{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} not run to the end for lack of machine time (stopped at step 4000 of 30000 at the deadline). " if missing else ". ")
        + "These are the 2,500-sample evaluations that pick the checkpoints; at 90 % their standard error is "
        "0.6 points, so a seed within a point of 90 % is at the threshold, on either side of it by chance (5,000 fresh samples below).",
        "",
        "Scatter plots of the best checkpoints (red) over real data (grey): "
        + " ".join(f"[seed {seed}](images/{RECIPE}-seed{seed}.png)" for seed in RECIPE_SEEDS),
        "",
        "What was tried (screening runs on seed 1, the seed that collapsed; each line names what it changed against the run before it):",
        "",
        *[f"- {line}" for line in TRIED],
        "",
    ]
    lines += profile_lines(runs, train_once, wall_minutes, centres, std)
    return lines


def profile_lines(runs: Path, train_once: Callable[..., dict], wall_minutes: Callable[[dict, Path], float], centres: np.ndarray, std: float) -> list[str]:
    """Where samples sit: distance to the nearest mode in units of the data's σ (best checkpoints,
    5,000 samples each, averaged over the seeds run)."""
    real = mixture("grid25").sample(PROFILE_SAMPLES, torch.Generator().manual_seed(PROFILE_SEED)).numpy()
    lines = [
        "### Where the samples sit, and why WGAN-GP scores so low",
        "",
        f"Distance from each sample to its nearest mode centre, in units of the data's σ ({std}); high quality is within 3σ (0.15), "
        f"mode spacing is 2.0 = {2 / std:.0f}σ. {PROFILE_SAMPLES:,} samples of each best checkpoint.",
        "",
        "| model (config) | seeds | modes covered | within 3σ (high quality) | within 6σ | within 10σ | median distance | 90th percentile | train time per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    profile = distance_profile(real, centres, std)
    lines.append(f"| real data | — | 25 | {100 * profile['within_3_sigma']:.1f} % | {100 * profile['within_6_sigma']:.1f} % | {100 * profile['within_10_sigma']:.1f} % "
                 f"| {profile['median_sigma']:.2f}σ | {profile['p90_sigma']:.2f}σ | — |")
    measured: dict[str, dict[str, float]] = {}
    for name, (title, seeds) in PROFILED.items():
        records = [train_once(name, runs / f"{name}-seed{seed}", seed) for seed in seeds]
        profiles, modes = [], []
        for seed in seeds:
            samples = _samples(runs / f"{name}-seed{seed}")
            profiles.append(distance_profile(samples, centres, std))
            modes.append(mode_metrics(samples, centres, std)["modes_covered"])
        mean = {key: statistics.mean(p[key] for p in profiles) for key in profiles[0]}
        measured[name] = mean
        minutes = statistics.mean(wall_minutes(r, runs / f"{name}-seed{s}") for s, r in zip(seeds, records))
        lines.append(f"| {title} (`configs/{name}.yaml`) | {', '.join(map(str, seeds))} | {_mean(modes, '.1f')} | {100 * mean['within_3_sigma']:.1f} % | {100 * mean['within_6_sigma']:.1f} % "
                     f"| {100 * mean['within_10_sigma']:.1f} % | {mean['median_sigma']:.2f}σ | {mean['p90_sigma']:.2f}σ | {minutes:.1f} min |")
    clip = measured.get("wgan-clip-grid25")
    chance = cloud_chance(centres, std)
    first_table = {name: [train_once(name, runs / f"{name}-seed{seed}", seed) for seed in range(3)] for name in ("wgan-gp-grid25", "gan-grid25")}

    def high_quality(name: str, which: str) -> float:
        return 100 * statistics.mean((r["best"]["metrics"] if which == "best" else r["last"])["high_quality_fraction"] for r in first_table[name])

    gp_best, gp_last, gan_best, gan_last = (high_quality(n, w) for n in ("wgan-gp-grid25", "gan-grid25") for w in ("best", "last"))
    gp_steps = ", ".join(str(r["best"]["step"]) for r in first_table["wgan-gp-grid25"])
    lines += [
        "",
        f"Why WGAN-GP's high-quality fraction is low (first table: {gp_best:.1f} % at its best checkpoints, {gp_last:.1f} % at its last): its samples form a diffuse "
        "cloud over the grid, not 25 clusters, and a cloud's share within 3σ of some centre is set by area alone. The 25 disks of radius 3σ = 0.15 "
        f"cover {100 * chance:.1f} % of the square [−5, 5]², so a cloud spread evenly over it scores {100 * chance:.1f} % (measured here on "
        f"{CHANCE_SAMPLES:,} uniform points) — WGAN-GP's number. The scatter plots under the first table show the clouds. `mode_kl` (KL over the "
        "25 modes plus an off-mode bin, `training/metrics/modes.py`), which picks every checkpoint on this page, ranks a cloud last, but where "
        f"every checkpoint of a run is a cloud it has nothing better to pick (best steps {gp_steps} for seeds 0–2); and the modes-covered column "
        "counts a mode hit by any one of 2,500 samples, which a cloud does by chance. Reverse KL, which the first table's configs used before, "
        "sees only the high-quality samples, so a cloud's few such samples, spread evenly over the modes, scored well: it picked the vanilla "
        f"GAN's early clouds (3.7 % high quality) over the later checkpoints that now lead its row ({gan_best:.1f} % at the best, {gan_last:.1f} % "
        "at the last, on fewer modes). Why WGAN-GP's generator is "
        "still a cloud after 6,000 steps at lr 1e-4 (30,000 critic steps) was not measured here (its runs were not repeated).",
    ]
    if clip is not None:
        run_dir = runs / "wgan-clip-grid25-seed0"
        record = train_once("wgan-clip-grid25", run_dir, 0)
        planned = planned_steps("wgan-clip-grid25")
        stopped = "" if record["step"] >= planned else f" of {planned:,}, stopped by a time budget on the shared machine"
        from training.results import copy_picture

        copy_picture(run_dir, record["best"]["step"], Path("docs/images") / "wgan-clip-grid25-seed0.png")
        lines += [
            "",
            f"WGAN with weight clipping (seed 0, {record['step']:,} generator steps{stopped}): {100 * clip['within_3_sigma']:.1f} % of its samples "
            f"within 3σ, median distance {clip['median_sigma']:.1f}σ (points spread evenly over a 2 × 2 cell sit a median 16σ from its centre), "
            f"90 % within {clip['p90_sigma']:.0f}σ: a cloud, like WGAN-GP's, at the cloud's chance rate of {100 * chance:.1f} %. "
            f"{100 * clipped_share(run_dir):.0f} % of its critic's weights sit at the bound ±0.01 at the end, the saturation Gulrajani et al. (2017) "
            "report for weight clipping; how much of the failure that explains, against the short schedule (6,000 generator steps at lr 5e-5), "
            "was not separated here. [Scatter plot](images/wgan-clip-grid25-seed0.png).",
        ]
    lines.append("")
    return lines
