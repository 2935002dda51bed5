"""Edit directions in W.

Supervised, read off generated images by the shapes predictor:
- `size`, `x`, `y`: the local effect of w on the reading, fitted by regressing the paired change
  reading(w + δ) − reading(w − δ) on 2δ around sampled w, with the effects of w on the shape-class
  log-probabilities projected out (InterFaceGAN's conditional manipulation, on local effects). A
  boundary fitted across samples (reading ≈ a·w + b) follows the correlations of W's distribution,
  not what moving one w does: on the shipped model the ridge `size` direction had cosine 0.33 with
  the average gradient and moving ±2σ along it changed the size by 0.04 of the frame against 0.09
  for the paired fit.
  Each of these also gets the contiguous window of ws it acts on best (monotonic reading, class
  kept), chosen on fitting seeds apart from the seeds results are measured on.
- `hue` (its cosine) and each shape class: linear boundaries across samples (ridge, one-vs-rest
  logistic); changing the class is what a class direction is for.
Unsupervised (GANSpace-style): the principal components of W, acting on all ws.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge

from models.stylegan import StyleGenerator
from training.data.shapes import SHAPE_NAMES
from training.metrics.shapes_features import shapes_readings

LOCAL_ATTRIBUTES = ("size", "x", "y")


@dataclass
class EditDirections:
    """Unit directions in W by name; `layers` names the ws a direction acts on where that is not all of them."""

    vectors: dict[str, torch.Tensor]
    layers: dict[str, list[int]] = field(default_factory=dict)


@torch.no_grad()
def synthesize(generator: StyleGenerator, ws: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([generator.synthesis(ws[i : i + batch_size]) for i in range(0, len(ws), batch_size)])


@torch.no_grad()
def sample_ws(generator: StyleGenerator, n: int, seed: int, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [n, w_dim], images [n, C, H, W]) from seeded z, synthesized with constant noise."""
    z = torch.randn(n, generator.mapping.layers[0].weight.shape[1], generator=torch.Generator().manual_seed(seed))
    ws, images = [], []
    for start in range(0, n, batch_size):
        w = generator.mapping(z[start : start + batch_size])
        ws.append(w)
        images.append(generator.synthesis(w[:, None].expand(-1, generator.num_ws, -1)))
    return torch.cat(ws), torch.cat(images)


def unit(vector: np.ndarray) -> torch.Tensor:
    return torch.tensor(vector / np.linalg.norm(vector), dtype=torch.float32)


def edit_outcome(generator: StyleGenerator, w: torch.Tensor, direction: torch.Tensor, attribute: str = "size", layers: list[int] | None = None,
                 steps: int = 7, reach: float = 2.0) -> dict[str, float]:
    """Moves each w [N, w_dim] along `direction` at `layers` (default all) by `steps` strengths
    over ±`reach` standard deviations of w along it; the fraction of w whose `attribute` reading
    rises at every step, whose predicted shape class never changes, and both."""
    layers = list(range(generator.num_ws)) if layers is None else layers
    d = direction / direction.norm()
    spread = float((w @ d).std())
    strengths = torch.linspace(-reach, reach, steps) * spread
    ws = w[:, None, None, :].expand(-1, steps, generator.num_ws, -1).clone()
    ws[:, :, layers] += strengths[None, :, None, None] * d
    _, readings = shapes_readings(synthesize(generator, ws.reshape(-1, generator.num_ws, w.shape[1])))
    value = readings[attribute].reshape(len(w), steps)
    shape = readings["shape"].reshape(len(w), steps)
    monotonic = (np.diff(value, axis=1) > 0).all(axis=1)
    same_shape = (shape == shape[:, [steps // 2]]).all(axis=1)
    return {"seeds": len(w), "monotonic": float(monotonic.mean()), "shape_kept": float(same_shape.mean()),
            "both": float((monotonic & same_shape).mean()), "range": float(np.mean(value[:, -1] - value[:, 0]))}


def local_readings(generator: StyleGenerator, w: torch.Tensor) -> np.ndarray:
    """[N, 3 + classes]: size, x, y and the log-probability of each shape class."""
    _, r = shapes_readings(synthesize(generator, w[:, None].expand(-1, generator.num_ws, -1)))
    return np.column_stack([r[name] for name in LOCAL_ATTRIBUTES] + [np.log(np.clip(r["shape_probs"], 1e-6, 1.0))])


def local_directions(generator: StyleGenerator, w: torch.Tensor, scale: float = 0.5, seed: int = 8) -> dict[str, torch.Tensor]:
    """size, x, y as local effects with the class effects projected out (see the module docstring).
    `scale` is the perturbation's standard deviation per w coordinate: large enough that the images
    really change (no reliance on the predictor's gradients), small enough to stay local."""
    delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * scale
    change = local_readings(generator, w + delta) - local_readings(generator, w - delta)
    effects = Ridge(alpha=1.0, fit_intercept=False).fit((2 * delta).double().numpy(), change).coef_  # [readings, w_dim]
    class_basis, _ = np.linalg.qr(effects[len(LOCAL_ATTRIBUTES) :].T)
    return {name: unit(effects[i] - class_basis @ (class_basis.T @ effects[i])) for i, name in enumerate(LOCAL_ATTRIBUTES)}


def best_window(generator: StyleGenerator, w: torch.Tensor, direction: torch.Tensor, attribute: str) -> list[int]:
    """The contiguous ws window (two or more) where moving along `direction` most often raises the
    reading monotonically and keeps the class; ties go to the wider window."""
    n = generator.num_ws
    windows = [list(range(start, stop)) for start in range(n) for stop in range(start + 2, n + 1)]
    scored = [(edit_outcome(generator, w, direction, attribute, window)["both"], len(window), window) for window in windows]
    return max(scored, key=lambda s: (s[0], s[1]))[2]


def boundary_directions(w: np.ndarray, attributes: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """hue (its cosine) and each shape class, fitted across samples."""
    directions = {"hue": unit(Ridge(alpha=1.0).fit(w, np.cos(2 * np.pi * attributes["hue"])).coef_)}
    for index, shape in enumerate(SHAPE_NAMES):
        labels = attributes["shape"] == index
        if 0 < labels.sum() < len(labels):
            directions[shape] = unit(LogisticRegression(max_iter=2000).fit(w, labels).coef_[0])
    return directions


def pca_directions(w: np.ndarray, count: int = 8) -> dict[str, torch.Tensor]:
    pca = PCA(n_components=min(count, w.shape[1])).fit(w)
    return {f"pc{i}": unit(component) for i, component in enumerate(pca.components_)}


def fit_directions(generator: StyleGenerator, samples: int = 5000, seed: int = 7, window_seeds: int = 100) -> EditDirections:
    """All directions for a 32 px shapes model. Seeds: `seed` for fitting, `seed + 10` for
    choosing windows; the measured proofs use others (training/latent/measure.py)."""
    generator = generator.eval()
    w, images = sample_ws(generator, samples, seed)
    _, attributes = shapes_readings(images)
    w_np = w.double().numpy()
    local = local_directions(generator, w[: min(samples, 2000)])
    window_w, _ = sample_ws(generator, window_seeds, seed + 10)
    layers = {name: best_window(generator, window_w, vector, name) for name, vector in local.items()}
    return EditDirections(local | boundary_directions(w_np, attributes) | pca_directions(w_np),
                          {name: window for name, window in layers.items() if len(window) < generator.num_ws})


def directions_for_run(run_dir, checkpoint: str = "best") -> EditDirections | None:
    """What `ganserve export` ships with a style model: supervised directions when the model draws
    32 px shapes (the predictor can read them), PCA directions always; None for other kinds."""
    from training.run_eval import load_generator

    generator, spec, cfg = load_generator(run_dir, checkpoint)
    if spec.kind != "style":
        return None
    if cfg.data.name == "shapes" and cfg.data.resolution == 32:
        return fit_directions(generator)
    w, _ = sample_ws(generator.eval(), 2000, seed=7)
    return EditDirections(pca_directions(w.double().numpy()))
