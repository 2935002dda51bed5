"""NVlabs network pickles (stylegan2-ada-pytorch) → the project's `StyleGAN2Generator`.

The pickle is read by the restricted unpickler (safe_pickle.py): its `G_ema` (else `G`) is a
record of class names, constructor arguments and tensors. The generator is rebuilt from the
constructor arguments with our own code, and every tensor is copied in with the reference's
run-time gains folded in (a FullyConnectedLayer's `weight_gain`/`bias_gain`, ToRGB's
`weight_gain`), so that our layers are plain. Every tensor of the checkpoint must be used and
have the shape the configuration implies; anything else is a one-line error and no entry.
"""
from __future__ import annotations

import torch

from models.spec import ModelSpec
from models.stylegan2_ada import StyleGAN2Generator
from models.zoo import build_generator
from repository.importers.checkpoint import CheckpointError, ImportedGenerator, plain
from repository.importers.safe_pickle import PersistentRecord, UnsafePickle, load_network_pickle

GENERATOR_ARGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs")


def generator_record(data) -> PersistentRecord:
    if not isinstance(data, dict):
        raise CheckpointError("the pickle does not hold a dict of networks (an NVlabs snapshot has G, D and G_ema)")
    record = data.get("G_ema") or data.get("G")
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"the pickle has no G_ema or G network (it holds {sorted(map(str, data))})")
    if record.class_name != "Generator":
        raise CheckpointError(f"G_ema is a {record.class_name}, not a Generator")
    return record


def hyperparameters_of(record: PersistentRecord) -> dict:
    arguments = dict(zip(GENERATOR_ARGS, record.init_args)) | record.init_kwargs
    missing = [name for name in GENERATOR_ARGS[:5] if name not in arguments]
    if missing:
        raise CheckpointError(f"the Generator's constructor arguments lack {missing}")
    return plain(arguments)


def is_stylegan3(record: PersistentRecord) -> bool:
    synthesis = record.children.get("synthesis")
    return synthesis is not None and ("input" in synthesis.children or "layer_names" in synthesis.state)


def build_options(arguments: dict) -> dict:
    """Our constructor's options from NVlabs' arguments (its defaults where they are left out)."""
    if arguments.get("c_dim", 0):
        raise CheckpointError(f"conditional generators (c_dim={arguments['c_dim']}) are not served yet; import an unconditional one")
    mapping, synthesis = arguments.get("mapping_kwargs") or {}, arguments.get("synthesis_kwargs") or {}
    architecture = synthesis.get("architecture", "skip")
    if architecture not in ("skip", "orig"):
        raise CheckpointError(f"synthesis architecture {architecture!r} is not served (skip or orig)")
    activation = mapping.get("activation", "lrelu"), synthesis.get("activation", "lrelu")
    if activation != ("lrelu", "lrelu"):
        raise CheckpointError(f"activations {activation} are not served (leaky ReLU only)")
    if synthesis.get("resample_filter", [1, 3, 3, 1]) != [1, 3, 3, 1]:
        raise CheckpointError(f"resample filter {synthesis['resample_filter']} is not served ([1, 3, 3, 1] only)")
    layer_features = mapping.get("layer_features")
    return {"layer_features": layer_features, "channel_base": int(synthesis.get("channel_base", 32768)),
            "channel_max": int(synthesis.get("channel_max", 512)), "architecture": architecture,
            "conv_clamp": synthesis.get("conv_clamp"), "use_noise": bool(synthesis.get("use_noise", True))}


def gain(record: PersistentRecord, name: str) -> float:
    return float(record.attribute(name, 1.0))


def folded_tensors(record: PersistentRecord, generator: StyleGAN2Generator) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names, gains folded; every source tensor accounted for."""
    source = record.tensors()
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in source:
            raise CheckpointError(f"the checkpoint has no {name}, which its configuration implies")
        used.add(name)
        return source[name].float()

    for name, module in generator.named_modules():
        kind = type(module).__name__
        prefix = f"{name}." if name else ""
        if kind == "FullyConnected":
            fc = record.module(name)
            out[prefix + "weight"] = take(prefix + "weight") * gain(fc, "weight_gain")
            out[prefix + "bias"] = take(prefix + "bias") * gain(fc, "bias_gain")
        elif kind == "ToRGB":
            out[prefix + "weight"] = take(prefix + "weight") * gain(record.module(name), "weight_gain")
            out[prefix + "bias"] = take(prefix + "bias")
        elif kind in ("SynthesisLayer", "SynthesisBlock", "MappingNetwork"):
            for local in list(module._parameters) + list(module._buffers):
                out[prefix + local] = take(prefix + local)
    # NVlabs keeps a resample filter in every layer, also those that never resample (unused there too)
    used |= {name for name in source if name.endswith(".resample_filter")}
    unused = sorted(set(source) - used)
    if unused:
        raise CheckpointError(f"the checkpoint has tensors this configuration does not use: {unused[:5]}{' …' if len(unused) > 5 else ''}")
    return out


def import_nvlabs_stylegan2(data: bytes, noise_mode: str = "const") -> ImportedGenerator:
    try:
        record = generator_record(load_network_pickle(data))
    except UnsafePickle as error:
        raise CheckpointError(str(error)) from None
    if is_stylegan3(record):
        raise CheckpointError("this is a StyleGAN3 generator, which is not served yet (StyleGAN2-ADA only)")
    arguments = hyperparameters_of(record)
    options = build_options(arguments)
    spec = ModelSpec(arch="stylegan2-ada", kind="style", z_dim=int(arguments["z_dim"]), w_dim=int(arguments["w_dim"]),
                     resolution=int(arguments["img_resolution"]), channels=int(arguments["img_channels"]),
                     mapping_layers=int((arguments.get("mapping_kwargs") or {}).get("num_layers", 8)), options=options | {"noise_mode": noise_mode})
    try:
        generator = build_generator(spec)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"the Generator's configuration cannot be built: {error}") from None
    tensors = folded_tensors(record, generator)
    expected = generator.state_dict()
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{name} is {list(tensor.shape)} in the checkpoint, but its configuration gives {list(expected[name].shape)}")
    generator.load_state_dict(tensors)
    return ImportedGenerator(generator.eval(), spec, arguments)
