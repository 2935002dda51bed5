"""Checkpoints as safetensors (every tensor) plus JSON (everything else), never pickles.

A checkpoint holds every network of the task (G, D, the EMA of G…), its optimizers, the training
RNG state and whatever else the task carries (torch's global RNG, CycleGAN's image pools), so that
`--resume` continues bit-for-bit where training stopped.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict:
    """Moves the optimizer's tensors into `tensors`; returns its JSON-able remainder."""
    state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + ".state."):
            index, key = name[len(prefix) + 7 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def load_module(prefix: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    start = len(prefix) + 1
    module.load_state_dict({k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def save_checkpoint(path: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], rng: torch.Generator, meta: dict,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> str:
    """Writes `path` (.safetensors) and its `.json` twin; returns the weights' SHA-256.
    `extra_tensors` are stored as they are named (e.g. `rng.torch`, `pool.a`)."""
    tensors: dict[str, torch.Tensor] = {k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()}
    for name, module in modules.items():
        tensors.update(module_tensors(name, module))
    optimizer_meta = {name: flatten_optimizer(f"opt_{name}", opt, tensors) for name, opt in optimizers.items()}
    tensors["rng.train"] = rng.get_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint behind
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps({**meta, "optimizers": optimizer_meta, "sha256": digest}, indent=2))
    return digest


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer] | None = None, rng: torch.Generator | None = None) -> dict:
    """Restores what is asked for; returns the checkpoint's JSON metadata, with the tensors that
    belong to no module or optimizer under `extra_tensors`."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    for name, module in modules.items():
        load_module(name, module, tensors)
    for name, optimizer in (optimizers or {}).items():
        restore_optimizer(f"opt_{name}", optimizer, tensors, meta["optimizers"][name])
    if rng is not None:
        rng.set_state(tensors["rng.train"])
    owned = tuple(f"{name}." for name in modules) + tuple(f"opt_{name}." for name in (optimizers or {}))
    meta["extra_tensors"] = {k: v for k, v in tensors.items() if k != "rng.train" and not k.startswith(owned)}
    return meta
