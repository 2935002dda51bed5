"""Standard-FID features: the FID InceptionV3 with weights read from a user-given file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.inception import FIDInceptionV3
from training.data import as_floats

IGNORED_PREFIXES = ("fc.", "AuxLogits.")  # classification heads the feature extractor does not use


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only refuses arbitrary pickled objects: a state_dict of tensors is all we accept
    return torch.load(path, map_location="cpu", weights_only=True)


def load_fid_inception(weights_path: str | Path | None) -> FIDInceptionV3:
    """The network with the given weights; a clear error when the file is missing or wrong."""
    if weights_path is None:
        raise FileNotFoundError(
            "standard FID needs InceptionV3 weights, which cannot be downloaded here: pass --inception-weights "
            "with pytorch-fid's pt_inception-2015-12-05 file (or the project's digits features are used)"
        )
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"InceptionV3 weights file {path} does not exist")
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(IGNORED_PREFIXES)}
    model = FIDInceptionV3()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not an FID InceptionV3 state_dict: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return model.eval()


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images: torch.Tensor, batch_size: int = 50) -> np.ndarray:
    """pool3 features [N, 2048] of images in [-1, 1] (or their uint8 pixels, scaled a batch at a time)."""
    return torch.cat([model(as_floats(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]).double().numpy()
