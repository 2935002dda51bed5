"""KServe v2 (Open Inference Protocol) endpoints for tensor clients: raw inputs in, raw
outputs out, through the same batcher (operation `infer`), one item per batch row."""
from __future__ import annotations

import math

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from service.batcher import run_items
from service.errors import ApiError
from service.requests import ClientGone, measured, new_request_state, registry_of, require_json, until_done_or_gone

router = APIRouter(prefix="/v2", tags=["v2"])
V2_TYPES = {"float32": "FP32", "int64": "INT64"}
NUMPY_TYPES = {"FP32": np.float32, "INT64": np.int64}


class InferTensor(BaseModel):
    name: str
    shape: list[int] = Field(min_length=1)
    datatype: str
    data: list


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1)


@router.get("/models/{name}")
async def metadata(name: str, request: Request) -> dict:
    model = registry_of(request).get(name)
    spec = model.entry.spec
    tensors = lambda items: [{"name": t["name"], "datatype": V2_TYPES[t["datatype"]], "shape": t["shape"]} for t in items]  # noqa: E731
    return {"name": name, "versions": [str(model.entry.version)], "platform": model.runtime.name, "inputs": tensors(spec["inputs"]), "outputs": tensors(spec["outputs"])}


@router.get("/models/{name}/ready")
async def model_ready(name: str, request: Request) -> JSONResponse:
    versions = registry_of(request).versions(name)
    ready = any(m.ready for m in versions.values())
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


def parse_inputs(spec: dict, body: InferRequest, max_items: int) -> list[dict[str, np.ndarray]]:
    expected = {t["name"]: t for t in spec["inputs"]}
    given = {t.name: t for t in body.inputs}
    if set(given) != set(expected):
        raise ApiError(422, f"inputs must be exactly {sorted(expected)}, got {sorted(given)}")
    arrays, batch = {}, None
    for name, tensor in given.items():
        want = expected[name]
        if tensor.datatype != V2_TYPES[want["datatype"]]:
            raise ApiError(422, f"input {name!r} must be {V2_TYPES[want['datatype']]}, not {tensor.datatype}")
        if len(tensor.shape) != len(want["shape"]) or any(w != -1 and w != g for w, g in zip(want["shape"], tensor.shape)):
            raise ApiError(422, f"input {name!r} must have shape {want['shape']} (-1 = batch), got {tensor.shape}")
        if len(tensor.data) != math.prod(tensor.shape):
            raise ApiError(422, f"input {name!r}: shape {tensor.shape} needs {math.prod(tensor.shape)} values, got {len(tensor.data)}")
        try:
            array = np.asarray(tensor.data, dtype=NUMPY_TYPES[tensor.datatype]).reshape(tensor.shape)
        except (TypeError, ValueError) as error:
            raise ApiError(422, f"input {name!r}: {error}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ApiError(422, f"input {name!r} holds NaN or infinity")
        multiple = spec.get("size_multiple")
        if multiple and array.ndim == 4 and any(side < multiple or side % multiple for side in array.shape[2:]):
            raise ApiError(422, f"input {name!r}: height and width must be multiples of {multiple}, got {list(array.shape[2:])}")
        if batch is not None and array.shape[0] != batch:
            raise ApiError(422, "all inputs must share the batch size")
        batch = array.shape[0]
        arrays[name] = array
    if not 1 <= batch <= max_items:
        raise ApiError(422, f"batch of {batch}: between 1 and {max_items} rows per request")
    if "label" in arrays and not ((arrays["label"] >= 0) & (arrays["label"] < len(spec.get("class_names") or [])) ).all():
        raise ApiError(422, "label values must be valid class indices")
    return [{name: array[i] for name, array in arrays.items()} for i in range(batch)]


@router.post("/models/{name}/infer", dependencies=[Depends(require_json)])
async def infer(name: str, body: InferRequest, request: Request) -> JSONResponse:
    registry = registry_of(request)
    model = registry.get(name)
    entry = model.entry
    async with measured(request, entry.name, entry.version, "infer"):
        items = parse_inputs(entry.spec, body, registry.settings.max_images_per_request)
        state = new_request_state(request)
        try:
            outputs = await until_done_or_gone(request, state, run_items(registry.batcher(model, "infer"), items, state))
        except ClientGone:
            return JSONResponse(None, status_code=499)
        result = np.stack(outputs).astype(np.float32)
        output = entry.spec["outputs"][0]
        return JSONResponse({
            "model_name": name, "model_version": str(entry.version), "id": body.id,
            "outputs": [{"name": output["name"], "datatype": "FP32", "shape": list(result.shape), "data": result.ravel().tolist()}],
        })
