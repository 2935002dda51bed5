"""Style-model endpoints: style mixing, interpolation and editing. Each is W arithmetic on the
server followed by batched synthesis calls shared with every other request (service/style.py)."""
from __future__ import annotations

import asyncio

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models import latent
from service import style
from service.imaging import CONTENT_TYPES, encode_animation, to_uint8
from service.operations import MAX_SEED
from service.requests import ClientGone, measured, new_request_state, registry_of, require_json, until_done_or_gone
from service.routes.v1 import choose_format, respond

router = APIRouter(prefix="/v1", tags=["style"])
MAX_FRAMES = 120
MAX_GRID = 16


class StyleMixRequest(BaseModel):
    """Grid of `row_seeds` × `col_seeds`: image (i, j) has row i's styles with column j's at `layers`."""

    model_config = ConfigDict(extra="forbid")
    row_seeds: list[int] = Field(min_length=1, max_length=MAX_GRID)
    col_seeds: list[int] = Field(min_length=1, max_length=MAX_GRID)
    layers: str | list[int] = Field("fine", description="coarse, middle, fine, or ws indices")
    truncation_psi: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    format: str | None = Field(None, pattern="^(png|jpeg|webp|npy)$")
    layout: str = Field("grid", pattern="^(grid|list)$")


class InterpolateRequest(BaseModel):
    """Frames from A to B: two seeds (slerp in Z or lerp in W) or two w vectors (lerp in W)."""

    model_config = ConfigDict(extra="forbid")
    seeds: list[int] | None = Field(None, min_length=2, max_length=2)
    w: list[list[float]] | None = Field(None, min_length=2, max_length=2)
    steps: int = Field(8, ge=2, le=MAX_FRAMES)
    space: str = Field("w", pattern="^(z|w)$")
    truncation_psi: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    format: str = Field("gif", pattern="^(gif|webp|png|npy)$", description="gif/webp: animation; png: a grid of frames; npy: [T, H, W, C]")
    frame_ms: int = Field(80, ge=10, le=5000)

    @model_validator(mode="after")
    def check(self) -> "InterpolateRequest":
        if (self.seeds is None) == (self.w is None):
            raise ValueError("give either two seeds or two w vectors")
        if self.w is not None and self.space == "z":
            raise ValueError("w vectors interpolate in W only")
        if self.seeds is not None and any(not 0 <= s <= MAX_SEED for s in self.seeds):
            raise ValueError(f"seeds must be between 0 and {MAX_SEED}")
        return self


class EditRequest(BaseModel):
    """One image per strength: w moved along a named direction."""

    model_config = ConfigDict(extra="forbid")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    w: list[float] | None = None
    direction: str
    strengths: list[float] = Field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0], min_length=1, max_length=64)
    units: str = Field("sigma", pattern="^(sigma|w)$",
                       description="sigma: strengths in standard deviations of the model's W along the direction (GET /v1/models/{name} lists them); w: raw W distance")
    layers: str | list[int] | None = Field(None, description="apply the edit at these ws only (default: all)")
    truncation_psi: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    format: str | None = Field(None, pattern="^(png|jpeg|webp|npy)$")
    layout: str = Field("grid", pattern="^(grid|list)$")

    @model_validator(mode="after")
    def check(self) -> "EditRequest":
        if (self.seed is None) == (self.w is None):
            raise ValueError("give either a seed or a w vector")
        if any(not np.isfinite(s) or abs(s) > 100 for s in self.strengths):
            raise ValueError("strengths must be finite numbers within ±100")
        return self


def style_model(request: Request, name: str):
    model = registry_of(request).get(name)
    style.require_style(model)
    return model


@router.post("/models/{name}/style-mix", dependencies=[Depends(require_json)])
async def style_mix(name: str, body: StyleMixRequest, request: Request) -> Response:
    registry, model = registry_of(request), style_model(request, name)
    async with measured(request, name, model.entry.version, "style-mix"):
        layers = style.layers_for(model, body.layers)
        state = new_request_state(request)

        async def work() -> np.ndarray:
            w = await style.seeds_to_w(registry, model, body.row_seeds + body.col_seeds, body.truncation_psi, state)
            rows, cols = style.broadcast(model, w[: len(body.row_seeds)]), style.broadcast(model, w[len(body.row_seeds):])
            ws = np.stack([latent.mix_styles(torch.from_numpy(rows[i : i + 1]), torch.from_numpy(cols[j : j + 1]), layers)[0].numpy()
                           for i in range(len(rows)) for j in range(len(cols))])
            return await style.synthesize(registry, model, ws, state)

        try:
            images = await until_done_or_gone(request, state, work())
        except ClientGone:
            return Response(status_code=499)
        tags = [i * len(body.col_seeds) + j for i in range(len(body.row_seeds)) for j in range(len(body.col_seeds))]
        return await respond(registry, model.entry, "style-mix", images, choose_format(body.format, request.headers.get("accept")), body.layout, len(body.col_seeds), tags)


@router.post("/models/{name}/interpolate", dependencies=[Depends(require_json)])
async def interpolate(name: str, body: InterpolateRequest, request: Request) -> Response:
    registry, model = registry_of(request), style_model(request, name)
    async with measured(request, name, model.entry.version, "interpolate"):
        state = new_request_state(request)
        times = latent.frame_times(body.steps)

        async def work() -> np.ndarray:
            if body.w is not None:
                ends = style.check_w(model, body.w)
                w = latent.lerp(torch.from_numpy(ends[0]), torch.from_numpy(ends[1]), times).numpy()
            elif body.space == "z":
                z = style.seed_latents(model, body.seeds)
                path = latent.slerp(torch.from_numpy(z[0]), torch.from_numpy(z[1]), times).numpy()
                w = style.truncate(model, await style.map_z(registry, model, path, state), body.truncation_psi)
            else:
                ends = await style.seeds_to_w(registry, model, body.seeds, body.truncation_psi, state)
                w = latent.lerp(torch.from_numpy(ends[0]), torch.from_numpy(ends[1]), times).numpy()
            return await style.synthesize(registry, model, style.broadcast(model, w), state)

        try:
            frames = await until_done_or_gone(request, state, work())
        except ClientGone:
            return Response(status_code=499)
        if body.format in ("png", "npy"):
            return await respond(registry, model.entry, "interpolate", frames, body.format, "grid", body.steps, list(range(body.steps)))
        pixels = to_uint8(frames, tuple(model.entry.spec["value_range"]))
        content = await asyncio.get_running_loop().run_in_executor(registry.encoders, encode_animation, pixels, body.format, body.frame_ms)
        return Response(content, media_type=CONTENT_TYPES[body.format], headers={"X-Model-Version": str(model.entry.version)})


@router.post("/models/{name}/edit", dependencies=[Depends(require_json)])
async def edit(name: str, body: EditRequest, request: Request) -> Response:
    registry, model = registry_of(request), style_model(request, name)
    async with measured(request, name, model.entry.version, "edit"):
        vector = style.direction(model, body.direction)
        layers = style.layers_for(model, body.layers) if body.layers is not None else list(range(model.entry.spec["num_ws"]))
        state = new_request_state(request)

        async def work() -> np.ndarray:
            if body.w is not None:
                w = style.check_w(model, [body.w])[0]
            else:
                w = (await style.seeds_to_w(registry, model, [body.seed], body.truncation_psi, state))[0]
            scale = model.spreads[body.direction] if body.units == "sigma" else 1.0
            edited = latent.edit(torch.from_numpy(w), vector, [scale * s for s in body.strengths]).numpy()  # [S, w_dim]
            ws = np.repeat(style.broadcast(model, w[None]), len(body.strengths), axis=0)
            ws[:, layers] = edited[:, None, :]
            return await style.synthesize(registry, model, ws, state)

        try:
            images = await until_done_or_gone(request, state, work())
        except ClientGone:
            return Response(status_code=499)
        return await respond(registry, model.entry, "edit", images, choose_format(body.format, request.headers.get("accept")), body.layout, len(body.strengths), list(range(len(body.strengths))))
