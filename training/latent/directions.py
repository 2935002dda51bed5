"""Edit directions in W.

Supervised (InterFaceGAN-style): draw many w, synthesize, read attributes off the images with
the shapes reader (the predictor trained on a wide size range), fit a linear model attribute ≈ a·w + b; the direction is a / |a|.
Shape classes get one-vs-rest logistic boundaries. Unsupervised (GANSpace-style): the principal
components of W.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge

from models.stylegan import StyleGenerator
from training.data.shapes import SHAPE_NAMES
from training.metrics.shapes_features import Judge, edit_readings


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


def supervised_directions(w: np.ndarray, attributes: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """One unit direction per attribute: size, x, y, hue (its cosine), and each shape class."""
    directions = {}
    for name in ("size", "x", "y"):
        directions[name] = unit(Ridge(alpha=1.0).fit(w, attributes[name]).coef_)
    hue_angle = 2 * np.pi * attributes["hue"]
    directions["hue"] = unit(Ridge(alpha=1.0).fit(w, np.cos(hue_angle)).coef_)
    for index, shape in enumerate(SHAPE_NAMES):
        labels = attributes["shape"] == index
        if 0 < labels.sum() < len(labels):
            directions[shape] = unit(LogisticRegression(max_iter=2000).fit(w, labels).coef_[0])
    return directions


def pca_directions(w: np.ndarray, count: int = 8) -> dict[str, torch.Tensor]:
    pca = PCA(n_components=min(count, w.shape[1])).fit(w)
    return {f"pc{i}": unit(component) for i, component in enumerate(pca.components_)}


def fit_directions(generator: StyleGenerator, samples: int = 5000, seed: int = 7,
                   read: Judge = edit_readings) -> dict[str, torch.Tensor]:
    w, images = sample_ws(generator.eval(), samples, seed)
    attributes = read(images)
    w_np = w.double().numpy()
    return supervised_directions(w_np, attributes) | pca_directions(w_np)


def directions_for_run(run_dir, checkpoint: str = "best") -> dict[str, torch.Tensor] | None:
    """What `ganserve export` ships with a style model: supervised directions when the model draws
    32 px shapes (the predictor can read them), PCA directions always; None for other kinds."""
    from training.run_eval import load_generator

    generator, spec, cfg = load_generator(run_dir, checkpoint)
    if spec.kind != "style":
        return None
    if cfg.data.name == "shapes" and cfg.data.resolution == 32:
        return fit_directions(generator)
    w, _ = sample_ws(generator.eval(), 2000, seed=7)
    return pca_directions(w.double().numpy())
