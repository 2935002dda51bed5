"""A StyleGAN2 config-f entry at 256² with seeded random weights, for issue 16's "StyleGAN synthesis
at 256²" figure: `python -m bench.style_entry REPOSITORY [--resolution 256] [--formats torchscript]`.

Throughput does not depend on the weights, and no published pickle can be downloaded where the
benchmark runs (nor carried: its export is 113 MB), so the generator is built by the project's
own `StyleGAN2Generator` with NVlabs' config-f hyperparameters (channel_base 32768, channel_max
512, 8 mapping layers, conv_clamp 256, skip architecture; 30.0 M parameters at 256²) and written
like an import (`repository.style_entry.write_style_entry`: TorchScript by default, with its
parity check against eager). The entry's `source` says it is random, so no figure measured on it
is mistaken for a trained model's quality.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.spec import ModelSpec
from models.zoo import build_generator
from repository.style_entry import write_style_entry

CONFIG_F = {"layer_features": None, "channel_base": 32768, "channel_max": 512, "architecture": "skip", "conv_clamp": 256,
            "use_noise": True, "noise_mode": "const"}


def random_style_entry(repository: Path, resolution: int = 256, formats: tuple[str, ...] = ("torchscript",), seed: int = 0) -> Path:
    torch.manual_seed(seed)
    spec = ModelSpec(arch="stylegan2-ada", kind="style", z_dim=512, w_dim=512, resolution=resolution, channels=3, mapping_layers=8,
                     options=dict(CONFIG_F))
    generator = build_generator(spec).eval()
    source = {"format": "random", "network": spec.arch, "note": f"config-f at {resolution}², seeded random weights (seed {seed}): for throughput only"}
    return write_style_entry(generator, spec, f"stylegan2-{resolution}", 1, repository, list(formats), source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--formats", default="torchscript", help="comma-separated: onnx, torchscript")
    args = parser.parse_args()
    args.repository.mkdir(parents=True, exist_ok=True)
    print(random_style_entry(args.repository, args.resolution, tuple(f.strip() for f in args.formats.split(",") if f.strip())))


if __name__ == "__main__":
    main()
