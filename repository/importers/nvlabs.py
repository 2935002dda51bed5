"""NVlabs network pickles (stylegan2-ada-pytorch, stylegan3) → the project's `StyleGAN2Generator`
or `StyleGAN3Generator`.

The pickle is read by the restricted unpickler (safe_pickle.py): its `G_ema` (else `G`) is a
record of class names, constructor arguments and tensors. The generator is rebuilt from the
constructor arguments with our own code, and every tensor is copied in with the reference's
run-time gains folded in (a FullyConnectedLayer's `weight_gain`/`bias_gain`, ToRGB's
`weight_gain`), so that our layers are plain. Every tensor of the checkpoint must be used and
have the shape the configuration implies; anything else is a one-line error and no entry.
"""
from __future__ import annotations

import math

import torch

from models.spec import ModelSpec
from models.stylegan2_ada import StyleGAN2Generator
from models.zoo import build_generator
from repository.importers.checkpoint import MAX_CLASSES, CheckpointError, ImportedGenerator, TensorSource, bounded, built_within, load_checked, plain, tensor_values
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


def finite_or_none(name: str, value: object) -> float | None:
    """A float setting of the network, checked before the build: a NaN `output_scale` was found
    only by the parity check, after the whole export, and 1e39 passed it (a hostile probe)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < abs(value) <= 1e6:
        raise CheckpointError(f"{name} is {str(value)[:40] if isinstance(value, (int, float)) else type(value).__name__}: "
                              "a finite number between -1e6 and 1e6, not 0, is expected")
    return float(value)


def record_values(record: PersistentRecord) -> int:
    return tensor_values(record.tensors())


def hyperparameters_of(record: PersistentRecord) -> dict:
    arguments = dict(zip(GENERATOR_ARGS, record.init_args)) | record.init_kwargs
    missing = [name for name in GENERATOR_ARGS[:5] if name not in arguments]
    if missing:
        raise CheckpointError(f"the Generator's constructor arguments lack {missing}")
    arguments = plain(arguments)
    check_sizes(arguments)
    return arguments


def check_sizes(arguments: dict) -> None:
    """Every size the network is built from, bounded before anything is built (a 308 KB pickle
    with `c_dim` 10^9 once asked for a billion class names)."""
    mapping, synthesis = arguments.get("mapping_kwargs") or {}, arguments.get("synthesis_kwargs") or {}
    if not isinstance(mapping, dict) or not isinstance(synthesis, dict):
        raise CheckpointError("mapping_kwargs and synthesis_kwargs must be dicts")
    resolution = bounded("img_resolution", arguments["img_resolution"], 4, 2048)
    if resolution & (resolution - 1):
        raise CheckpointError(f"img_resolution is {resolution}: a power of 2 is expected")
    for name, value, low, high in (("z_dim", arguments["z_dim"], 0, 4096), ("w_dim", arguments["w_dim"], 1, 4096),
                                   ("c_dim", arguments.get("c_dim") or 0, 0, MAX_CLASSES), ("img_channels", arguments["img_channels"], 1, 4),
                                   ("mapping num_layers", mapping.get("num_layers", 2), 0, 32), ("embed_features", mapping.get("embed_features") or 1, 1, 4096),
                                   ("layer_features", mapping.get("layer_features") or 1, 1, 4096),
                                   ("channel_base", synthesis.get("channel_base", arguments.get("channel_base", 32768)), 1, 1 << 20),
                                   ("channel_max", synthesis.get("channel_max", arguments.get("channel_max", 512)), 1, 4096),
                                   ("num_layers", arguments.get("num_layers", 14), 1, 64)):
        bounded(name, value, low, high)


def is_stylegan3(record: PersistentRecord) -> bool:
    """StyleGAN3's synthesis starts from Fourier features (`input`) and names its layers."""
    try:
        synthesis = record.module("synthesis")
    except KeyError:
        return False
    return "input" in (synthesis.state.get("_modules") or {}) or "layer_names" in synthesis.state


def class_options(arguments: dict) -> tuple[dict, list[str]]:
    """A conditional generator (c_dim > 0) takes one class per image; NVlabs pickles carry no class
    names, so the classes are named by their index."""
    c_dim = int(arguments.get("c_dim") or 0)
    if not c_dim:
        return {}, []
    embed = (arguments.get("mapping_kwargs") or {}).get("embed_features")
    return {"c_dim": c_dim} | ({"embed_features": int(embed)} if embed else {}), [str(i) for i in range(c_dim)]


def build_options(arguments: dict) -> dict:
    """Our constructor's options from NVlabs' arguments (its defaults where they are left out)."""
    mapping, synthesis = arguments.get("mapping_kwargs") or {}, arguments.get("synthesis_kwargs") or {}
    architecture = synthesis.get("architecture", "skip")
    if architecture not in ("skip", "orig", "resnet"):
        raise CheckpointError(f"synthesis architecture {architecture!r} is not served (skip, orig or resnet)")
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


def submodule(record: PersistentRecord, path: str) -> PersistentRecord:
    try:
        return record.module(path)
    except KeyError:
        raise CheckpointError(f"the checkpoint has no {path}, which its configuration implies") from None


def folded_tensors(record: PersistentRecord, generator: StyleGAN2Generator) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names, gains folded; every source tensor accounted for."""
    source = TensorSource(record.tensors())
    take = source.take
    out: dict[str, torch.Tensor] = {}
    for name, module in generator.named_modules():
        kind = type(module).__name__
        prefix = f"{name}." if name else ""
        if kind == "FullyConnected":
            fc = submodule(record, name)
            out[prefix + "weight"] = take(prefix + "weight") * gain(fc, "weight_gain")
            out[prefix + "bias"] = take(prefix + "bias") * gain(fc, "bias_gain")
        elif kind in ("ToRGB", "ResampledSkip"):
            out[prefix + "weight"] = take(prefix + "weight") * gain(submodule(record, name), "weight_gain")
            if kind == "ToRGB":
                out[prefix + "bias"] = take(prefix + "bias")
        elif kind in ("SynthesisLayer", "SynthesisBlock", "MappingNetwork"):
            for local in list(module._parameters) + list(module._buffers):
                out[prefix + local] = take(prefix + local)
    # NVlabs keeps a resample filter in every layer, also those that never resample (unused there too)
    source.ignore(lambda name: name.endswith(".resample_filter"))
    source.check_all_used()
    return out


def import_nvlabs(data: bytes, noise_mode: str = "const") -> ImportedGenerator:
    """Either generation of NVlabs pickle: StyleGAN3 if its synthesis has a Fourier-feature input."""
    try:
        record = generator_record(load_network_pickle(data))
    except UnsafePickle as error:
        raise CheckpointError(str(error)) from None
    return import_stylegan3(record) if is_stylegan3(record) else import_stylegan2(record, noise_mode)


def import_stylegan2(record: PersistentRecord, noise_mode: str = "const") -> ImportedGenerator:
    arguments = hyperparameters_of(record)
    options = build_options(arguments)
    conditional, class_names = class_options(arguments)
    spec = ModelSpec(arch="stylegan2-ada", kind="style", z_dim=int(arguments["z_dim"]), w_dim=int(arguments["w_dim"]),
                     resolution=int(arguments["img_resolution"]), channels=int(arguments["img_channels"]), class_names=class_names,
                     mapping_layers=int((arguments.get("mapping_kwargs") or {}).get("num_layers", 8)),
                     options=options | conditional | {"noise_mode": noise_mode})
    try:
        generator = built_within(lambda: build_generator(spec), record_values(record))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"the Generator's configuration cannot be built: {error}") from None
    load_checked(generator, folded_tensors(record, generator))
    return ImportedGenerator(generator.eval(), spec, arguments)


STYLEGAN3_GEOMETRY = ("channel_base", "channel_max", "num_layers", "num_critical", "first_cutoff", "first_stopband", "last_stopband_rel",
                      "margin_size", "conv_kernel", "filter_size", "lrelu_upsampling", "use_radial_filters")


def import_stylegan3(record: PersistentRecord) -> ImportedGenerator:
    """stylegan3-t and -r: geometry from the Generator's arguments (checked against every layer's
    recorded padding and factors), filters and Fourier features from the checkpoint's buffers."""
    arguments = hyperparameters_of(record)
    conditional, class_names = class_options(arguments)
    synthesis = record.module("synthesis")
    options = {k: arguments[k] for k in STYLEGAN3_GEOMETRY if k in arguments}
    options |= {"conv_clamp": finite_or_none("conv_clamp", synthesis.module(synthesis.attribute("layer_names")[0]).attribute("conv_clamp")),
                "output_scale": finite_or_none("output_scale", synthesis.attribute("output_scale", 0.25))} | {k: v for k, v in conditional.items() if k == "c_dim"}
    if options["output_scale"] is None:
        raise CheckpointError("output_scale is None: a number is expected")
    spec = ModelSpec(arch="stylegan3", kind="style", z_dim=int(arguments["z_dim"]), w_dim=int(arguments["w_dim"]),
                     resolution=int(arguments["img_resolution"]), channels=int(arguments["img_channels"]), class_names=class_names,
                     mapping_layers=int((arguments.get("mapping_kwargs") or {}).get("num_layers", 2)), options=options)
    try:
        generator = built_within(lambda: build_generator(spec), record_values(record))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"the Generator's configuration cannot be built: {error}") from None
    source = TensorSource(record.tensors())
    take = source.take
    names = list(synthesis.attribute("layer_names") or [])
    if len(names) != len(generator.synthesis.layers):
        raise CheckpointError(f"the checkpoint has {len(names)} synthesis layers, its configuration {len(generator.synthesis.layers)}")
    for name, layer in zip(names, generator.synthesis.layers):
        theirs = synthesis.module(name)
        g = layer.geometry
        recorded = (list(theirs.attribute("padding")), int(theirs.attribute("up_factor")), int(theirs.attribute("down_factor")))
        if recorded != (list(g.padding), g.up_factor, g.down_factor):
            raise CheckpointError(f"layer {name}: the checkpoint's padding/up/down {recorded} contradict its configuration's "
                                  f"{(list(g.padding), g.up_factor, g.down_factor)}")
    out: dict[str, torch.Tensor] = {}

    def their_name(ours: str) -> str:  # synthesis.layers.{i}.… → synthesis.{layer_names[i]}.…
        parts = ours.split(".")
        return ".".join(["synthesis", names[int(parts[2])], *parts[3:]]) if parts[:2] == ["synthesis", "layers"] else ours

    for ours in generator.state_dict():
        theirs = their_name(ours)
        owner, _, leaf = theirs.rpartition(".")
        if owner.endswith("affine") or owner.startswith("mapping.fc"):
            out[ours] = take(theirs) * gain(submodule(record, owner), "weight_gain" if leaf == "weight" else "bias_gain")
        elif ours == "synthesis.input.weight":
            out[ours] = take(theirs) / take(theirs).shape[0] ** 0.5
        else:
            out[ours] = take(theirs)
    for index, layer in enumerate(generator.synthesis.layers):  # ToRGB: the reference scales its styles by 1/√fan_in
        if layer.geometry.is_torgb:
            key = f"synthesis.layers.{index}.weight"
            out[key] = out[key] / (layer.geometry.in_channels * layer.geometry.conv_kernel**2) ** 0.5
    source.check_all_used()
    load_checked(generator, out)
    return ImportedGenerator(generator.eval(), spec, arguments)
