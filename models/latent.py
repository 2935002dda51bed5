"""Operations on a style generator's latent spaces, shared by training (directions, inversion,
measurements) and the service (truncation, mixing, interpolation, editing as W arithmetic).

Layer order of ws follows `SynthesisNetwork`: level 0 is 4x4 (ws 0-1), level j ≥ 1 (4·2^j px)
owns ws [2j, 2j+2). Named ranges split the levels into thirds: `coarse` (pose, shape, position),
`middle`, `fine` (colour, texture).
"""
from __future__ import annotations

import torch

RANGE_NAMES = ("coarse", "middle", "fine")


def seed_latent(z_dim: int, seed: int) -> torch.Tensor:
    """z [z_dim] of one seed, from its own generator on the CPU: a seed fixes its z whatever else is
    drawn beside it. The one way training's `sample`, export parity and the service draw latents
    (two torch calls: the service draws one per request on its event loop)."""
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(seed))


def seed_latents(z_dim: int, seeds: list[int]) -> torch.Tensor:
    """z [len(seeds), z_dim]: `seed_latent` of each seed."""
    return torch.stack([seed_latent(z_dim, seed) for seed in seeds])


def truncate(w: torch.Tensor, w_avg: torch.Tensor, psi: float) -> torch.Tensor:
    """Pull w toward the average: ψ = 1 leaves it, ψ = 0 gives the average image."""
    return w_avg.lerp(w, psi)


def num_levels(num_ws: int) -> int:
    return num_ws // 2


def level_layers(level: int) -> range:
    return range(2 * level, 2 * level + 2)


def named_layers(name: str, num_ws: int) -> list[int]:
    """ws indices of `coarse`, `middle` or `fine` for a network with `num_ws` layers."""
    if name not in RANGE_NAMES:
        raise ValueError(f"unknown layer range {name!r}: use {RANGE_NAMES} or explicit indices")
    levels = num_levels(num_ws)
    if levels < 3:
        raise ValueError(f"{num_ws} layers are too few to split into coarse, middle and fine")
    coarse_end = max(1, levels // 2)
    middle_end = min(levels - 1, max(coarse_end + 1, round(levels * 0.75)))
    bounds = {"coarse": (0, coarse_end), "middle": (coarse_end, middle_end), "fine": (middle_end, levels)}[name]
    return [i for level in range(*bounds) for i in level_layers(level)]


def resolve_layers(layers: str | list[int], num_ws: int) -> list[int]:
    """A range name, or explicit indices checked against the network's layer count."""
    if isinstance(layers, str):
        return named_layers(layers, num_ws)
    if not layers or any(not 0 <= i < num_ws for i in layers):
        raise ValueError(f"layer indices must lie in 0..{num_ws - 1}, got {layers}")
    return sorted(set(layers))


def mix_styles(ws_a: torch.Tensor, ws_b: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """A's styles with B's at `layers`. ws: [B, num_ws, w_dim]."""
    mixed = ws_a.clone()
    mixed[:, layers] = ws_b[:, layers]
    return mixed


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation, the right path between Gaussian latents z (their norms stay
    typical); t: [T] → [T, dim]."""
    a_unit, b_unit = a / a.norm(), b / b.norm()
    omega = torch.arccos((a_unit * b_unit).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    t = t[:, None]
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation, the right path in W (the mapping network flattens it)."""
    return a[None] + t[:, None] * (b - a)[None]


def edit(w: torch.Tensor, direction: torch.Tensor, strengths: list[float]) -> torch.Tensor:
    """w [w_dim] moved along a unit `direction` by each strength → [len(strengths), w_dim]."""
    unit = direction / direction.norm()
    return w[None] + torch.tensor(strengths, dtype=w.dtype)[:, None] * unit[None]


def spreads(w: torch.Tensor, directions: dict[str, torch.Tensor]) -> dict[str, float]:
    """The standard deviation of sampled w [N, w_dim] along each unit direction: the scale of an
    edit. Directions differ a lot in how far W spreads along them (on the shapes model, 0.5 along
    `size`, 2-3 along the first principal components), so one strength in raw W units is a mild
    edit along one and leaves the data along another; in these units ±2 is the tail of the data."""
    return {name: float((w @ (vector / vector.norm())).std()) for name, vector in directions.items()}


def frame_times(steps: int) -> torch.Tensor:
    if steps < 2:
        raise ValueError("an interpolation needs at least 2 steps")
    return torch.linspace(0.0, 1.0, steps)
