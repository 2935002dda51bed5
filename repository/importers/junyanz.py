"""pix2pix / CycleGAN generators of junyanz/pytorch-CycleGAN-and-pix2pix (`latest_net_G.pth`,
`*_net_G_A.pth`, …: a plain state dict) → the project's `ResnetGenerator` or `UnetGenerator`.

Everything is read off the state dict, since users rarely have the training options:
- the generator: `model.model.0.weight` is a U-Net (its depth is the nesting of `model.1.…`),
  `model.{i}.conv_block.…` a ResNet generator (its blocks are the `conv_block`s);
- width (`ngf`) and channels from the first and last convolutions' shapes;
- the norm: a norm position with a weight is batch norm (affine, running statistics); one without
  is instance norm, which at test time uses the input image's own statistics — running statistics
  that checkpoints from old PyTorch versions carry there are dropped, as the reference's loader
  drops them;
- dropout in the ResNet blocks shifts the second conv's key (`conv_block.6` instead of `.5`); in
  the U-Net it owns no tensor and is off in eval mode either way.
Our networks share the reference's module order, so keys map one to one; where the reference
has no tensor for ours (conv biases before batch norm, instance norm without affine parameters)
the import supplies the identity (zero bias, unit gain), which computes the same function.
"""
from __future__ import annotations

import re

import torch

from models.zoo import build_translator
from repository.importers.checkpoint import CheckpointError, built_within, load_checked, load_torch_archive, tensor_values

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def generator_state(archive: dict) -> dict[str, torch.Tensor]:
    """The generator's tensors of a loaded torch.save archive (a DataParallel `module.` prefix dropped)."""
    state = {k.removeprefix("module."): v for k, v in archive.items() if isinstance(v, torch.Tensor)}
    if "model.model.0.weight" not in state and not any(".conv_block." in k for k in state):
        raise CheckpointError("the state dict is not a pix2pix/CycleGAN generator (no model.model.0.weight, no ResNet conv_block)")
    return state


def norm_at(state: dict[str, torch.Tensor], prefix: str) -> str | None:
    """batch (affine weight), instance (no weight: maybe stale running statistics), or None if
    there is no norm tensor there at all (then it can't be told; the caller decides)."""
    if f"{prefix}.weight" in state:
        return "batch" if f"{prefix}.running_mean" in state else "instance_affine"
    return "instance" if f"{prefix}.running_mean" in state else None


def resnet_params(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """Parameters for `build_translator` and the map our key → the checkpoint's key."""
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"model\.(\d+)\.conv_block\.", k))})
    if not blocks or blocks != list(range(blocks[0], blocks[0] + len(blocks))) or blocks[0] != 10:
        raise CheckpointError(f"the ResNet generator's blocks sit at {blocks[:3]}…, not at model.10 onwards as the reference builds them")
    first = blocks[0]
    dropout = f"model.{first}.conv_block.6.weight" in state
    n = len(blocks)
    stem, head = state.get("model.1.weight"), state.get(f"model.{first + n + 7}.weight")
    if stem is None or head is None:
        raise CheckpointError("the ResNet generator lacks its 7x7 stem (model.1) or output conv")
    norm = norm_at(state, "model.2") or "instance"
    params = {"generator": "resnet", "in_channels": stem.shape[1], "out_channels": head.shape[0], "ngf": stem.shape[0], "n_blocks": n,
              "norm": "batch" if norm == "batch" else "instance"}
    keys = {}  # the stem, the down/up convolutions and the output conv have the same names in both
    for block in blocks:
        for ours, theirs in ((1, 1), (2, 2), (5, 6 if dropout else 5), (6, 7 if dropout else 6)):
            keys[f"model.{block}.body.{ours}"] = f"model.{block}.conv_block.{theirs}"
    return params | {"dropout": dropout}, keys


def unet_params(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """The U-Net's depth from the nesting of its levels (the outermost holds the next at index 1,
    every other level at index 3), then the same names as ours."""
    prefix, depth = "model.model.1.model", 2
    if f"{prefix}.1.weight" not in state:
        raise CheckpointError("the U-Net has no inner level (model.model.1.model.1)")
    while f"{prefix}.3.model.1.weight" in state:
        prefix, depth = f"{prefix}.3.model", depth + 1
    first, last = state["model.model.0.weight"], state.get("model.model.3.weight")
    if last is None:
        raise CheckpointError("the U-Net lacks its outermost up-convolution (model.model.3)")
    inner_norm = norm_at(state, "model.model.1.model.2" if depth > 2 else "model.model.1.model.4")  # level 1's first norm
    norm = "batch" if inner_norm == "batch" else "instance"
    # dropout owns no tensor and is off in eval mode: whether the checkpoint was trained with it cannot be told, nor matters here
    params = {"generator": "unet", "in_channels": first.shape[1], "out_channels": last.shape[1], "ngf": first.shape[0],
              "num_downs": depth, "norm": norm, "dropout": False}
    return params, {}


def translator_tensors(state: dict[str, torch.Tensor], generator: torch.nn.Module, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """Our state dict from the checkpoint's: renamed where our names differ, identity where the
    reference keeps no tensor, instance-norm running statistics dropped; anything left over is an error."""
    out, used = {}, set()
    for name, tensor in generator.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        theirs_owner = keys.get(owner, owner)
        theirs = f"{theirs_owner}.{leaf}"
        if theirs in state:
            out[name] = state[theirs].to(tensor.dtype)
            used.add(theirs)
        elif leaf == "bias" and tensor.ndim == 1:
            out[name] = torch.zeros_like(tensor)  # a conv before batch norm, or instance norm without affine
        elif leaf == "weight" and tensor.ndim == 1:
            out[name] = torch.ones_like(tensor)  # instance norm without affine parameters
        elif leaf == "num_batches_tracked":
            out[name] = torch.zeros_like(tensor)  # checkpoints from before PyTorch 0.4.1 do not count (eval mode never reads it)
        elif leaf in STATISTICS:
            raise CheckpointError(f"the checkpoint has no {theirs}, which batch norm needs")
        else:
            raise CheckpointError(f"the checkpoint has no {theirs}, which its layout implies")
    stale = {k for k in state if k.rpartition(".")[2] in STATISTICS and k not in used}
    unused = sorted(set(state) - used - stale)
    if unused:
        raise CheckpointError(f"the checkpoint has tensors this generator does not use: {unused[:5]}{' …' if len(unused) > 5 else ''}")
    return out


def import_junyanz(data: bytes) -> tuple[torch.nn.Module, dict]:
    """(our generator in eval mode, its `build_translator` parameters)."""
    state = generator_state(load_torch_archive(data))
    params, keys = unet_params(state) if "model.model.0.weight" in state else resnet_params(state)
    try:
        generator = built_within(lambda: build_translator(params), tensor_values(state))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"the generator cannot be built: {error}") from None
    load_checked(generator, translator_tensors(state, generator, keys))
    return generator.eval(), params


def is_junyanz(archive: dict) -> bool:
    """A loaded torch.save archive holding a pix2pix/CycleGAN generator state dict."""
    try:
        generator_state(archive)
    except CheckpointError:
        return False
    return True


CHECKED_OPTIONS = ("generator", "ngf", "n_blocks", "num_downs", "norm", "in_channels", "out_channels")
STATED_OPTIONS = ("direction", "domains", "train_resolution", "task")


def translation_fields(params: dict, options: dict[str, str]) -> dict:
    """The entry's fields: what the state dict says, checked against what `--options` states,
    plus what only the user can say (direction, domain names, the training size)."""
    unknown = set(options) - set(CHECKED_OPTIONS) - set(STATED_OPTIONS)
    if unknown:
        raise CheckpointError(f"unknown --options {sorted(unknown)}: use {', '.join(STATED_OPTIONS + CHECKED_OPTIONS)}")
    for key in CHECKED_OPTIONS:
        if key in options and options[key] != str(params.get(key)):
            raise CheckpointError(f"--options says {key}={options[key]}, but the checkpoint's tensors make it {params.get(key)}")
    direction = options.get("direction", "AtoB")
    if direction not in ("AtoB", "BtoA"):
        raise CheckpointError(f"direction must be AtoB or BtoA, not {direction!r}")
    domains = options.get("domains", "A:B").split(":")
    try:
        train_resolution = int(options.get("train_resolution", "256"))
    except ValueError:
        raise CheckpointError(f"train_resolution must be an integer, not {options['train_resolution']!r}") from None
    if len(domains) != 2 or not all(domains) or not 16 <= train_resolution <= 4096:
        raise CheckpointError("domains takes two names (domains=horse:zebra) and train_resolution a size of 16-4096 px")
    multiple = 4 if params["generator"] == "resnet" else 2 ** params["num_downs"]
    return {"kind": "translation", "arch": params["generator"], "task": options.get("task"), "channels": params["out_channels"],
            "in_channels": params["in_channels"], "size_multiple": multiple, "scale": 1, "train_resolution": train_resolution,
            "domains": domains, "direction": direction, "value_range": [-1.0, 1.0], "norm": params["norm"], "model": params,
            # instance norm normalises by the whole input's statistics: tiles would each see other statistics
            "tiling": "whole image" if params["norm"] == "instance" else "whole image (tiles would be allowed: batch norm)"}
