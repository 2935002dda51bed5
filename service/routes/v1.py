"""The v1 REST API: model listing and image generation."""
from __future__ import annotations

import dataclasses

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service import style
from service.admission import servable_rows
from service.batcher import run_items
from service.errors import ApiError, error_responses
from service.operations import generate_inputs, resolve_label, resolve_truncation
from service.pipeline import JsonBodyRoute, article, begin, combined, context, estimate, execute, generated_bytes, output_pixels, registry_of, with_encoding
from service.registry import IMAGE_TO_IMAGE, LoadedModel
from service.settings import Settings
from service.responses import choose_format, respond
from service.schemas import MAX_SEED, MAX_WS, BigGANTruncation, ClassIndex, ClassName, ImageCount, ImageFormat, Layout, Psi, Seed, Version

router = APIRouter(prefix="/v1", tags=["v1"], route_class=JsonBodyRoute)  # JSON bodies: 415 for any other type


class GenerateRequest(BaseModel):
    """Either `seeds` (one image per seed) or `n` images from `seed`, `seed + 1`, …"""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra={"not": {"required": ["seeds", "n"]}})

    seeds: list[Seed] | None = Field(None, min_length=1, max_length=4096, description="one image per seed")
    n: ImageCount | None = Field(None, description="number of images, seeded seed, seed+1, …")
    seed: Seed = 0
    class_label: ClassIndex | ClassName | None = Field(None, alias="class", description="class index or name (conditional models)")
    version: Version | None = None
    format: ImageFormat | None = Field(None, description="default: from Accept, else png")
    layout: Layout = Field("grid", description="several images: one grid image, or a JSON list of base64 images")
    columns: int | None = Field(None, ge=1, le=1024, strict=True)
    truncation_psi: Psi = 1.0
    truncation_cutoff: int | None = Field(None, ge=1, le=MAX_WS, strict=True, description="style models: apply truncation_psi to the first this many layers only")
    truncation: BigGANTruncation | None = None

    @model_validator(mode="after")
    def check(self) -> "GenerateRequest":
        if self.seeds is not None and self.n is not None:
            raise ValueError("give either seeds or n, not both")
        if self.seeds is not None and "seed" in self.model_fields_set:  # it was silently ignored
            raise ValueError("give either seeds or seed, not both")
        if self.seeds is None and self.seed + (self.n or 1) - 1 > MAX_SEED:
            raise ValueError("seed + n runs past the largest seed")
        if self.truncation_cutoff is not None and "truncation_psi" not in self.model_fields_set:  # (it was silently ignored)
            raise ValueError("truncation_cutoff applies truncation_psi to the first layers only: give truncation_psi too")
        return self

    def count(self) -> int:
        return len(self.seeds) if self.seeds is not None else self.n or 1

    def seed_list(self) -> list[int]:
        """(only called once `count()` is within the server's limit)"""
        return self.seeds if self.seeds is not None else [self.seed + i for i in range(self.n or 1)]


def describe(model: LoadedModel, settings: Settings) -> dict:
    spec = model.entry.spec
    return {
        "version": model.entry.version, "state": model.state, "error": model.error,
        "runtime": model.runtime.name if model.runtime else None, "device": model.runtime.device if model.runtime else None,
        "kind": model.entry.kind, "resolution": spec.get("resolution"), "channels": spec.get("channels"),
        "class_names": spec.get("class_names") or [], "formats": sorted(spec.get("formats") or {}),
        **({"direction_spreads": model.spreads} if model.spreads else {}),
        **({"serving": model.config.model_dump()} if model.config else {}),
        **({"served_precision": model.served_precision} if model.runtime else {}),
        **({"precision": model.parity.describe()} if model.parity else {}),
        **({"precision_rejected": [p.describe() for p in model.precision_rejected]} if model.precision_rejected else {}),
        **({"half_precision_at_export": spec["half_precision"]} if spec.get("half_precision") else {}),
        **({"capture": model.capture} if model.capture else {}),
        **({"limits": model.limits.describe() | ({} if model.entry.kind in IMAGE_TO_IMAGE else {"max_images": servable_rows(model, settings)})}
           if model.limits else {}),
        **({"costs": {graph: cost.describe() for graph, cost in model.costs.items()}} if model.costs else {}),
    }


@router.get("/models")
async def list_models(request: Request) -> dict:
    registry = registry_of(request)
    return {"models": [
        {"name": name, "latest_version": max(versions), "versions": sorted(versions), "ready": any(m.ready for m in versions.values()), **describe(versions[max(versions)], registry.settings)}
        for name, versions in sorted(registry.models.items())
    ]}


@router.get("/models/{name}", responses=error_responses(404))
async def model_detail(name: str, request: Request) -> dict:
    registry = registry_of(request)
    versions = registry.versions(name)
    return {"name": name, "ready": any(m.ready for m in versions.values()),
            "versions": [{**describe(m, registry.settings), "spec": m.entry.spec} for _, m in sorted(versions.items())]}


@router.post("/models/{name}/generate", responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/x-npy": {}, "application/json": {}}},
                        **error_responses(404, 406, 413, 415, 422, 429, 503, 504)})
async def generate(name: str, body: GenerateRequest, request: Request) -> Response:
    """Images for seeds. One image comes back as image bytes, or as a one-item JSON list with
    `layout=list`; several as one grid image (`layout=grid`, the default), a JSON list of base64
    images (`layout=list`), or an npy stack [N, H, W, C] uint8 (`format=npy`)."""
    registry = registry_of(request)
    model = begin(request, name, "generate", body.version)
    entry = model.entry
    limit = registry.settings.max_images_per_request
    if body.count() > limit:
        raise ApiError(422, f"{body.count()} images asked; at most {limit} per request")
    if entry.kind in IMAGE_TO_IMAGE:
        raise ApiError(422, f"model {entry.name!r} is {article(entry.kind)} {entry.kind} model: POST an image to /v1/models/{entry.name}/{IMAGE_TO_IMAGE[entry.kind]}")
    if entry.kind != "style" and (body.truncation_psi != 1.0 or body.truncation_cutoff is not None):
        raise ApiError(422, "truncation_psi and truncation_cutoff apply to style models only")
    label = resolve_label(entry, body.class_label)
    truncation = resolve_truncation(entry, body.truncation)
    fmt = choose_format(body.format, request.headers.get("accept"))
    if body.columns is not None and (fmt == "npy" or body.layout == "list"):  # (it was silently ignored)
        raise ApiError(422, f"columns lays out a grid image; {'an npy stack' if fmt == 'npy' else 'a list'} has none")
    if fmt == "npy" and body.layout == "list":
        raise ApiError(422, "layout list is a JSON list of encoded images; npy is one uint8 stack [N, H, W, C] (ask for png, jpeg or webp)")
    seeds = body.seed_list()
    units = [1.0] * len(seeds)
    if entry.kind == "style":
        cost = combined(estimate(model, "mapping", units), estimate(model, "model", units, generated_bytes(model, len(seeds))))

        async def work(state) -> np.ndarray:
            ws = await style.seeds_to_ws(registry, model, seeds, body.truncation_psi, body.truncation_cutoff, state, label)
            return await style.synthesize(registry, model, ws, state)
    else:
        cost = estimate(model, "model", units, generated_bytes(model, len(seeds)))

        async def work(state) -> np.ndarray:
            return np.stack(await run_items(registry.batcher(model, "generate"), generate_inputs(entry, seeds, label, truncation), state))

    cost = dataclasses.replace(with_encoding(registry, cost, fmt, output_pixels(model), len(seeds)), smaller="send fewer images (n or seeds)")
    images = await execute(request, model, cost, work)
    return await respond(registry, entry, "generate", images, fmt, body.layout, body.columns, seeds, ctx=context(request))
