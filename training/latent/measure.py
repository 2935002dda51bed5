"""The measured proofs of the latent toolbox on `shapes` (docs/results.md):

- editing: moving along the `size` direction raises the predicted size monotonically while the
  predicted shape class stays put;
- style mixing: coarse layers from A and the rest from B keep A's shape and position and take
  B's colour;
- projection: held-out real shapes are reconstructed to a PSNR.
All readings come from a judge read off the images, never from the generator's own latents: the shipped
shapes reader (`edit_readings`) unless another is passed (`measure_judge_seeds` compares several).
"""
from __future__ import annotations

import numpy as np
import torch

from models import latent
from models.classifier import ShapesPredictor
from models.projection import project
from models.stylegan import StyleGenerator
from training.data.shapes import load_shapes
from training.latent.directions import fit_directions, sample_ws
from training.metrics.shapes_features import Judge, edit_readings, load_shapes_predictor


def hue_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a - b) % 1.0
    return np.minimum(d, 1 - d)


@torch.no_grad()
def synthesize(generator: StyleGenerator, ws: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([generator.synthesis(ws[i : i + batch_size]) for i in range(0, len(ws), batch_size)])


def measure_size_edit(generator: StyleGenerator, direction: torch.Tensor, seeds: int = 200, steps: int = 7, reach: float = 2.0,
                      read: Judge = edit_readings) -> dict[str, float]:
    """Strengths span ±`reach` standard deviations of w along the direction; `read` is the judge."""
    w, _ = sample_ws(generator, seeds, seed=101)
    spread = latent.spreads(w, {"direction": direction})["direction"]  # the unit of the API's σ strengths
    strengths = list(np.linspace(-reach, reach, steps) * spread)
    edited = torch.stack([latent.edit(row, direction, strengths) for row in w])  # [seeds, steps, w_dim]
    images = synthesize(generator, edited.reshape(-1, w.shape[1])[:, None].expand(-1, generator.num_ws, -1))
    readings = read(images)
    size = readings["size"].reshape(seeds, steps)
    shape = readings["shape"].reshape(seeds, steps)
    monotonic = (np.diff(size, axis=1) > 0).all(axis=1)
    same_shape = (shape == shape[:, [steps // 2]]).all(axis=1)
    return {"seeds": seeds, "size_monotonic": float(monotonic.mean()), "shape_kept": float(same_shape.mean()),
            "both": float((monotonic & same_shape).mean()), "size_range": float(np.mean(size[:, -1] - size[:, 0]))}


def paired_styles(generator: StyleGenerator, pairs: int, seed_a: int, seed_b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded A and B styles ([pairs, num_ws, w_dim] each, w on every layer) and their images."""
    wa, images_a = sample_ws(generator, pairs, seed=seed_a)
    wb, images_b = sample_ws(generator, pairs, seed=seed_b)
    n = generator.num_ws
    return wa[:, None].expand(-1, n, -1).contiguous(), wb[:, None].expand(-1, n, -1).contiguous(), images_a, images_b


def mixing_readings(generator: StyleGenerator, pairs: int, read: Judge = edit_readings) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """Seeded A and B styles ([pairs, num_ws, w_dim] each) and the judge's readings of both."""
    ws_a, ws_b, images_a, images_b = paired_styles(generator, pairs, 202, 303)
    return ws_a, ws_b, read(images_a), read(images_b)


def mixing_outcome(generator: StyleGenerator, ws_a: torch.Tensor, ws_b: torch.Tensor, a: dict, b: dict, layers_from_b: list[int],
                   position_tolerance: float = 0.08, read: Judge = edit_readings) -> dict[str, float]:
    m = read(synthesize(generator, latent.mix_styles(ws_a, ws_b, layers_from_b)))
    keeps_shape = m["shape"] == a["shape"]
    keeps_position = np.hypot(m["x"] - a["x"], m["y"] - a["y"]) < position_tolerance
    takes_colour = hue_distance(m["hue"], b["hue"]) < hue_distance(m["hue"], a["hue"])
    # pairs whose colours are nearly the same say nothing about where colour comes from
    informative = hue_distance(a["hue"], b["hue"]) > 0.1
    success = keeps_shape & keeps_position & takes_colour
    return {"pairs": int(informative.sum()), "keeps_shape": float(keeps_shape[informative].mean()), "keeps_position": float(keeps_position[informative].mean()),
            "takes_colour": float(takes_colour[informative].mean()), "all_three": float(success[informative].mean())}


def measure_style_mixing(generator: StyleGenerator, pairs: int = 200, read: Judge = edit_readings) -> dict[str, float]:
    """Coarse layers from A, the rest from B."""
    ws_a, ws_b, a, b = mixing_readings(generator, pairs, read)
    coarse = latent.named_layers("coarse", generator.num_ws)
    return mixing_outcome(generator, ws_a, ws_b, a, b, [i for i in range(generator.num_ws) if i not in coarse], read=read)


def measure_crossovers(generator: StyleGenerator, pairs: int = 200) -> list[dict[str, float]]:
    """Where each attribute lives: for every crossover k, A's ws[:k] with B's ws[k:] (k = 0 is B
    itself, k = num_ws is A itself: the two ends anchor the readings)."""
    ws_a, ws_b, a, b = mixing_readings(generator, pairs)
    n = generator.num_ws
    return [{"k": k, **mixing_outcome(generator, ws_a, ws_b, a, b, list(range(k, n)))} for k in range(n + 1)]


def measure_judge_stability(generator: StyleGenerator, read: Judge, pairs: int = 500) -> dict[str, float]:
    """How steady a judge reads generated shapes when only the finest style layer (colour) is
    swapped for another sample's: the class should not change, the size barely. A check of the
    instrument on generated images, on seeds apart from the proofs'."""
    ws_a, ws_b, images_a, _ = paired_styles(generator, pairs, 404, 505)
    a, m = read(images_a), read(synthesize(generator, latent.mix_styles(ws_a, ws_b, [generator.num_ws - 1])))
    return {"pairs": pairs, "class_kept": float(np.mean(a["shape"] == m["shape"])), "size_change_median": float(np.median(np.abs(a["size"] - m["size"])))}


def measure_judge_seeds(generator: StyleGenerator, shipped_direction: torch.Tensor, judges: dict[str, Judge], seeds: int = 200,
                        fit_samples: int = 5000) -> dict[str, dict]:
    """The latent proofs under each judge (readers of one recipe, different training seeds): the
    size direction it fits itself, and the shipped one, both read by it; style mixing; its steadiness. A
    proof that holds for one judge only is a property of that judge."""
    return {name: {"own_fit": measure_size_edit(generator, fit_directions(generator, fit_samples, read=read)["size"], seeds=seeds, read=read),
                   "shipped_direction": measure_size_edit(generator, shipped_direction, seeds=seeds, read=read),
                   "stability": measure_judge_stability(generator, read), "mixing": measure_style_mixing(generator, read=read)}
            for name, read in judges.items()}


def measure_projection(generator: StyleGenerator, images: int = 16, steps: int = 200) -> dict[str, float]:
    held_out = load_shapes(images, 32, seed=1)  # the held-out split's first images
    predictor: ShapesPredictor = load_shapes_predictor()
    predictor.requires_grad_(False)
    values = [project(generator.synthesis, held_out.x[i], generator.w_avg, generator.num_ws, steps=steps, features=predictor.features).psnr for i in range(images)]
    return {"images": images, "steps": steps, "psnr_mean": float(np.mean(values)), "psnr_min": float(np.min(values)), "psnr_max": float(np.max(values))}
