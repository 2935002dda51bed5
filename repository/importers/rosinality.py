"""rosinality's stylegan2-pytorch checkpoints (`*.pt`: `g_ema`, a state dict) → `StyleGAN2Generator`.

It is the same network as NVlabs' config-f `skip` generator under other names and scale
conventions: `style.{1..n}` are the mapping layers (lr multiplier 0.01 unless stated), `input`
the 4x4 constant, `conv1`/`to_rgb1` the 4x4 block, `convs[2i]`, `convs[2i+1]`, `to_rgbs[i]` each
higher resolution, `noises.noise_{k}` the constant noise of the k-th conv. Every layer keeps its
weight unscaled and applies 1/√fan_in (times its lr multiplier) at run time; those scales are
folded in here. The configuration (size, style dimension, mapping depth, channels per resolution)
is read off the tensors' shapes, so forks with other channel tables load too; the archive's
`args` are recorded. rosinality keeps no running mean of W: `latent_avg` is used where a converted
checkpoint carries it, else the mean of W over 10,000 fixed-seed z (as its `mean_latent` does).
"""
from __future__ import annotations

import math
import re

import torch

from models.spec import ModelSpec
from models.zoo import build_generator
from repository.importers.checkpoint import CheckpointError, ImportedGenerator, TensorSource, bounded, built_within, load_checked, load_torch_archive, plain, tensor_values

W_AVG_SAMPLES = 10_000


def generator_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    state = checkpoint.get("g_ema", checkpoint.get("g", checkpoint))
    if not isinstance(state, dict) or "style.1.weight" not in state or "input.input" not in state:
        raise CheckpointError("the archive holds no rosinality generator (g_ema with style.1.weight and input.input)")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def is_rosinality(archive: dict) -> bool:
    """A loaded torch.save archive that means to hold rosinality's generator: a `g_ema`/`g` entry
    (whose errors are then rosinality's to report), or a bare state dict of it."""
    if "g_ema" in archive or "g" in archive:
        return True
    try:
        generator_state(archive)
    except CheckpointError:
        return False
    return True


def inferred_configuration(state: dict[str, torch.Tensor]) -> dict:
    style_dim = state["style.1.weight"].shape[1]
    n_mlp = max(int(m.group(1)) for k in state if (m := re.fullmatch(r"style\.(\d+)\.weight", k)))
    rgbs = sum(1 for k in state if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k))
    channels = {4: state["input.input"].shape[1]}
    for level in range(rgbs):
        channels[2 ** (level + 3)] = state[f"convs.{2 * level}.conv.weight"].shape[1]
    return {"size": 2 ** (bounded("the number of to_rgbs layers", rgbs, 0, 9) + 2), "style_dim": bounded("style_dim", style_dim, 1, 4096),
            "n_mlp": bounded("n_mlp (the highest style layer)", n_mlp, 1, 32), "channels": channels}


def folded_tensors(state: dict[str, torch.Tensor], generator, lr_mlp: float, w_avg: torch.Tensor) -> dict[str, torch.Tensor]:
    source = TensorSource(state, "a rosinality StyleGAN2")
    take = source.take

    def linear(ours: str, theirs: str, lr: float, out: dict) -> None:
        weight = take(f"{theirs}.weight")
        out[f"{ours}.weight"] = weight * (lr / math.sqrt(weight.shape[1]))
        out[f"{ours}.bias"] = take(f"{theirs}.bias") * lr

    def modulated(ours: str, theirs: str, out: dict, noise: int | None) -> None:
        linear(f"{ours}.affine", f"{theirs}.conv.modulation", 1.0, out)
        weight = take(f"{theirs}.conv.weight")[0]  # [out, in, k, k]
        out[f"{ours}.weight"] = weight / math.sqrt(weight[0].numel())
        if noise is None:  # ToRGB
            out[f"{ours}.bias"] = take(f"{theirs}.bias").reshape(-1)
            return
        out[f"{ours}.bias"] = take(f"{theirs}.activate.bias")
        out[f"{ours}.noise_strength"] = take(f"{theirs}.noise.weight").reshape(())
        out[f"{ours}.noise_const"] = take(f"noises.noise_{noise}")[0, 0]

    out: dict[str, torch.Tensor] = {}
    for index in range(generator.mapping.num_layers):
        linear(f"mapping.fc{index}", f"style.{index + 1}", lr_mlp, out)
    out["mapping.w_avg"] = w_avg
    out["synthesis.b4.const"] = take("input.input")[0]
    modulated("synthesis.b4.conv1", "conv1", out, 0)
    modulated("synthesis.b4.torgb", "to_rgb1", out, None)
    for level, res in enumerate(generator.synthesis.resolutions[1:]):
        modulated(f"synthesis.b{res}.conv0", f"convs.{2 * level}", out, 2 * level + 1)
        modulated(f"synthesis.b{res}.conv1", f"convs.{2 * level + 1}", out, 2 * level + 2)
        modulated(f"synthesis.b{res}.torgb", f"to_rgbs.{level}", out, None)
    # filter buffers: rosinality's blur/upsample kernels are its [1,3,3,1] taps, ours are built from the same
    source.ignore(lambda name: name.endswith(".kernel"))
    source.check_all_used()
    return out


def import_rosinality(data: bytes, noise_mode: str = "const", lr_mlp: float = 0.01) -> ImportedGenerator:
    checkpoint = load_torch_archive(data)
    state = generator_state(checkpoint)
    try:
        config = inferred_configuration(state)
    except (KeyError, ValueError, IndexError) as error:
        raise CheckpointError(f"the generator's tensors do not follow rosinality's layout ({error})") from None
    args = vars(checkpoint["args"]) if hasattr(checkpoint.get("args"), "__dict__") else {}
    for option, inferred in (("size", config["size"]), ("latent", config["style_dim"]), ("n_mlp", config["n_mlp"])):
        if option in args and args[option] != inferred:
            raise CheckpointError(f"the checkpoint's args say {option}={args[option]}, but its tensors make it {inferred}")
    spec = ModelSpec(arch="stylegan2-ada", kind="style", z_dim=config["style_dim"], w_dim=config["style_dim"], resolution=config["size"],
                     channels=3, mapping_layers=config["n_mlp"],
                     options={"channels": {str(k): v for k, v in config["channels"].items()}, "architecture": "skip", "conv_clamp": None,
                              "use_noise": True, "noise_mode": noise_mode})
    generator = built_within(lambda: build_generator(spec), tensor_values(state))
    latent_avg = checkpoint.get("latent_avg")
    w_avg = latent_avg.float().reshape(-1) if isinstance(latent_avg, torch.Tensor) else torch.zeros(config["style_dim"])
    # the resample filters keep the [1,3,3,1] taps they were built with
    load_checked(generator, folded_tensors(state, generator, lr_mlp, w_avg), rebuilt=lambda name: name.endswith(".resample_filter"))
    if not isinstance(latent_avg, torch.Tensor):
        with torch.no_grad():
            z = torch.randn(W_AVG_SAMPLES, config["style_dim"], generator=torch.Generator().manual_seed(0))
            generator.mapping.w_avg.copy_(torch.cat([generator.mapping(chunk) for chunk in z.split(1000)]).mean(dim=0))
    hyperparameters = {"inferred": plain(config), "args": plain(args) or None, "lr_mlp": lr_mlp,
                       "w_avg": "latent_avg" if isinstance(latent_avg, torch.Tensor) else f"mean of W over {W_AVG_SAMPLES} z"}
    return ImportedGenerator(generator.eval(), spec, hyperparameters)
