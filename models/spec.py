"""`ModelSpec`: everything needed to rebuild a generator and to call it, as plain JSON.

The spec travels with every checkpoint (and later every model-repository entry), which is the
contract between training and use: weights are plain state_dicts, the architecture is this.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["unconditional", "conditional", "style", "translation", "super_resolution"]


@dataclass
class ModelSpec:
    arch: str  # "mlp" | "dcgan" | "cdcgan" | "stylegan" | "stylegan2-ada" (imported)
    kind: Kind = "unconditional"
    z_dim: int = 100
    width: int = 64
    depth: int = 3
    resolution: int = 32  # 0 for non-image (point) models
    channels: int = 1
    out_dim: int = 0  # point models only: dimension of a sample
    data_scale: float = 1.0  # point models only: spread of the data, see MLPGenerator
    w_dim: int = 0  # style models only
    mapping_layers: int = 0
    max_channels: int = 0
    synthesis: str = "skip"  # style models: StyleGAN2 output architecture, "skip" or "orig"
    class_names: list[str] = field(default_factory=list)
    value_range: tuple[float, float] = (-1.0, 1.0)
    options: dict = field(default_factory=dict)  # architecture-specific hyperparameters (imported networks)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_ws(self) -> int:
        """Style models: how many w vectors synthesis takes (two per resolution from 8x8, two at 4x4)."""
        return 2 * (self.resolution.bit_length() - 1) - 2 if self.kind == "style" else 0

    @property
    def is_image(self) -> bool:
        return self.resolution > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "value_range" in known:
            known["value_range"] = tuple(known["value_range"])
        return cls(**known)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ModelSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))
