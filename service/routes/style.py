"""Style-model endpoints: style mixing, interpolation and editing. Each is W arithmetic on the
server followed by batched synthesis calls shared with every other request (service/style.py)."""
from __future__ import annotations

import dataclasses
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from models import latent
from service import style
from service.errors import ApiError, error_responses
from service.pipeline import JsonBodyRoute, begin, combined, context, estimate, execute, generated_bytes, output_pixels, registry_of, with_encoding
from service.registry import LoadedModel, ModelRegistry
from service.responses import choose_format, respond, respond_animation
from service.operations import resolve_label
from service.schemas import ClassIndex, ClassName, ImageFormat, Layers, Layout, Psi, Seed, WVector

router = APIRouter(prefix="/v1", tags=["style"], route_class=JsonBodyRoute)  # JSON bodies: 415 for any other type
MAX_FRAMES = 120
MAX_GRID = 16
STYLE_ERRORS = error_responses(404, 406, 413, 415, 422, 429, 503, 504)


def check_seed_options(body: BaseModel, w: object) -> BaseModel:
    """`truncation_psi` and `class` shape how a seed becomes w; with w given there is nothing for
    them to act on, and a client who sent them would get an answer that silently ignored them."""
    if w is not None:
        ignored = [name for name in ("truncation_psi", "class_label") if name in body.model_fields_set]
        if ignored:
            named = " and ".join("class" if name == "class_label" else name for name in ignored)
            raise ValueError(f"{named} {'apply' if len(ignored) > 1 else 'applies'} to seeds, not to a given w (it is used as it is)")
    return body


class StyleMixRequest(BaseModel):
    """Grid of `row_seeds` × `col_seeds`: image (i, j) has row i's styles with column j's at `layers`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    row_seeds: list[Seed] = Field(min_length=1, max_length=MAX_GRID)
    col_seeds: list[Seed] = Field(min_length=1, max_length=MAX_GRID)
    layers: Layers = Field("fine", description="coarse, middle, fine, or ws indices")
    truncation_psi: Psi = 1.0
    class_label: ClassIndex | ClassName | None = Field(None, alias="class", description="class index or name (conditional style models)")
    format: ImageFormat | None = None
    layout: Layout = "grid"


class InterpolateRequest(BaseModel):
    """Frames from A to B: two seeds (slerp in Z or lerp in W) or two w vectors (lerp in W)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra={"oneOf": [{"required": ["seeds"]}, {"required": ["w"]}]})
    seeds: list[Seed] | None = Field(None, min_length=2, max_length=2)
    w: list[WVector] | None = Field(None, min_length=2, max_length=2)
    steps: int = Field(8, ge=2, le=MAX_FRAMES, strict=True)
    space: str = Field("w", pattern="^(z|w)$")
    truncation_psi: Psi = 1.0
    class_label: ClassIndex | ClassName | None = Field(None, alias="class", description="class index or name (conditional style models)")
    format: str | None = Field(None, pattern="^(gif|webp|png|npy)$",
                               description="gif/webp: animation; png: a grid of frames; npy: [T, H, W, C]; default: what Accept names, else gif")
    frame_ms: int = Field(80, ge=10, le=5000, strict=True)

    @model_validator(mode="after")
    def check(self) -> "InterpolateRequest":
        if (self.seeds is None) == (self.w is None):
            raise ValueError("give either two seeds or two w vectors")
        if self.w is not None and self.space == "z":
            raise ValueError("w vectors interpolate in W only")
        return check_seed_options(self, self.w)


class EditRequest(BaseModel):
    """One image per strength: w moved along a named direction."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra={"oneOf": [{"required": ["seed"]}, {"required": ["w"]}]})
    seed: Seed | None = None
    w: WVector | None = None
    direction: str = Field(min_length=1, max_length=128)
    strengths: list[Annotated[float, Strict(), Field(ge=-100, le=100, allow_inf_nan=False)]] = Field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0], min_length=1, max_length=64)
    units: str = Field("sigma", pattern="^(sigma|w)$",
                       description="sigma: strengths in standard deviations of the model's W along the direction (GET /v1/models/{name} lists them); w: raw W distance")
    layers: Layers | None = Field(None, description="apply the edit at these ws only (default: all)")
    truncation_psi: Psi = 1.0
    class_label: ClassIndex | ClassName | None = Field(None, alias="class", description="class index or name (conditional style models)")
    format: ImageFormat | None = None
    layout: Layout = "grid"

    @model_validator(mode="after")
    def check(self) -> "EditRequest":
        if (self.seed is None) == (self.w is None):
            raise ValueError("give either a seed or a w vector")
        if any(not np.isfinite(s) or abs(s) > 100 for s in self.strengths):
            raise ValueError("strengths must be finite numbers within ±100")
        return check_seed_options(self, self.w)


def style_model(request: Request, name: str, operation: str) -> LoadedModel:
    model = begin(request, name, operation)
    style.require_style(model)
    return model


def style_cost(registry: ModelRegistry, model: LoadedModel, mapped: int, synthesized: int, fmt: str, smaller: str):
    """Mapping `mapped` z and synthesising `synthesized` images, with their outputs and their
    encoding in `fmt`; `smaller` says what the client can ask for less of (a style model's images
    cannot be made smaller: an interpolation was told to send "fewer or smaller images")."""
    cost = combined(estimate(model, "mapping", [1.0] * mapped), estimate(model, "model", [1.0] * synthesized, generated_bytes(model, synthesized)))
    return dataclasses.replace(with_encoding(registry, cost, fmt, output_pixels(model), synthesized), smaller=smaller)


@router.post("/models/{name}/style-mix", responses=STYLE_ERRORS)
async def style_mix(name: str, body: StyleMixRequest, request: Request) -> Response:
    registry, model = registry_of(request), style_model(request, name, "style-mix")
    layers = style.layers_for(model, body.layers)
    fmt = choose_format(body.format, request.headers.get("accept"))
    rows, cols = len(body.row_seeds), len(body.col_seeds)
    label = style.one_class(model, resolve_label(model.entry, body.class_label))

    async def work(state) -> np.ndarray:
        w = await style.seeds_to_w(registry, model, body.row_seeds + body.col_seeds, body.truncation_psi, state, label)
        row_ws, col_ws = style.broadcast(model, w[:rows]), style.broadcast(model, w[rows:])
        ws = np.stack([latent.mix_styles(torch.from_numpy(row_ws[i : i + 1]), torch.from_numpy(col_ws[j : j + 1]), layers)[0].numpy()
                       for i in range(rows) for j in range(cols)])
        return await style.synthesize(registry, model, ws, state)

    images = await execute(request, model, style_cost(registry, model, rows + cols, rows * cols, fmt, "send fewer row or column seeds"), work)
    return await respond(registry, model.entry, "style-mix", images, fmt, body.layout, cols, list(range(rows * cols)), ctx=context(request), tag_name="index")


INTERPOLATE_FORMATS = ("gif", "webp", "png", "npy")  # the first is the default
ANIMATION_FORMATS = ("gif", "webp")


@router.post("/models/{name}/interpolate", responses=STYLE_ERRORS)
async def interpolate(name: str, body: InterpolateRequest, request: Request) -> Response:
    registry, model = registry_of(request), style_model(request, name, "interpolate")
    ends = style.check_w(model, body.w) if body.w is not None else None
    times = latent.frame_times(body.steps)
    label = style.one_class(model, resolve_label(model.entry, body.class_label))

    async def work(state) -> np.ndarray:
        if ends is not None:
            w = latent.lerp(torch.from_numpy(ends[0]), torch.from_numpy(ends[1]), times).numpy()
        elif body.space == "z":
            z = style.seed_latents(model, body.seeds)
            path = latent.slerp(torch.from_numpy(z[0]), torch.from_numpy(z[1]), times).numpy()
            w = style.truncate(model, await style.map_z(registry, model, path, state, label), body.truncation_psi)
        else:
            w_ends = await style.seeds_to_w(registry, model, body.seeds, body.truncation_psi, state, label)
            w = latent.lerp(torch.from_numpy(w_ends[0]), torch.from_numpy(w_ends[1]), times).numpy()
        return await style.synthesize(registry, model, style.broadcast(model, w), state)

    timed = "frame_ms" in body.model_fields_set  # an animation is asked for: Accept chooses among those
    fmt = choose_format(body.format, request.headers.get("accept"), ANIMATION_FORMATS if timed and body.format is None else INTERPOLATE_FORMATS)
    if fmt in ("png", "npy") and timed:  # (it was silently ignored)
        raise ApiError(422, f"frame_ms times an animation's frames (gif, webp); {fmt} is {'a grid' if fmt == 'png' else 'a stack'} of frames")
    mapped = 0 if ends is not None else (body.steps if body.space == "z" else 2)
    frames = await execute(request, model, style_cost(registry, model, mapped, body.steps, fmt, "ask for fewer frames (steps)"), work)
    if fmt in ("png", "npy"):
        return await respond(registry, model.entry, "interpolate", frames, fmt, "grid", body.steps, list(range(body.steps)), ctx=context(request), tag_name="index")
    return await respond_animation(registry, model.entry, frames, fmt, body.frame_ms, ctx=context(request))


@router.post("/models/{name}/edit", responses=STYLE_ERRORS)
async def edit(name: str, body: EditRequest, request: Request) -> Response:
    registry, model = registry_of(request), style_model(request, name, "edit")
    vector = style.direction(model, body.direction)
    layers = style.layers_for(model, body.layers) if body.layers is not None else list(range(model.entry.spec["num_ws"]))
    given_w = style.check_w(model, [body.w])[0] if body.w is not None else None
    fmt = choose_format(body.format, request.headers.get("accept"))
    count = len(body.strengths)
    label = style.one_class(model, resolve_label(model.entry, body.class_label))

    async def work(state) -> np.ndarray:
        w = given_w if given_w is not None else (await style.seeds_to_w(registry, model, [body.seed], body.truncation_psi, state, label))[0]
        scale = model.spreads[body.direction] if body.units == "sigma" else 1.0
        edited = latent.edit(torch.from_numpy(w), vector, [scale * s for s in body.strengths]).numpy()  # [S, w_dim]
        ws = np.repeat(style.broadcast(model, w[None]), count, axis=0)
        ws[:, layers] = edited[:, None, :]
        return await style.synthesize(registry, model, ws, state)

    images = await execute(request, model, style_cost(registry, model, 0 if given_w is not None else 1, count, fmt, "send fewer strengths"), work)
    return await respond(registry, model.entry, "edit", images, fmt, body.layout, count, list(range(count)), ctx=context(request), tag_name="index")
