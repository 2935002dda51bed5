"""KServe v2 (Open Inference Protocol) endpoints for tensor clients: raw inputs in, raw
outputs out, through the same batcher (operation `infer`), one item per batch row.

The body is parsed and checked off the event loop, and bounded like v1: rows per request, the
model's spatial limits (image-to-image inputs), integer values that are integers in range, and
an output small enough to answer as JSON (`max_json_tensor_values`); the response is serialised
in the encoder pool."""
from __future__ import annotations

import json
import math
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from service.batcher import run_items
from service.errors import ApiError, error_responses
from service.pipeline import begin, estimate, execute, off_loop, registry_of, reserve
from service.registry import IMAGE_TO_IMAGE, LoadedModel
from service.settings import Settings
from service.tiling import padded_size

router = APIRouter(prefix="/v2", tags=["v2"])
V2_TYPES = {"float32": "FP32", "int64": "INT64"}
NUMPY_TYPES = {"FP32": np.float32, "INT64": np.int64}
PYTHON_VALUE_BYTES = 40  # a parsed JSON number: the object and its list slot
JSON_VALUE_BYTES = 24  # a float written as JSON text
PARSED_BYTES_PER_BODY_BYTE = 16  # a JSON number takes at least 2 bytes ("0,") and becomes a ~32-byte object


class InferTensor(BaseModel):
    name: str = Field(min_length=1, max_length=256)
    shape: list[Annotated[int, Strict(), Field(ge=0, le=2**31)]] = Field(min_length=1, max_length=8)
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16"]
    data: list


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = Field(None, max_length=256)
    inputs: list[InferTensor] = Field(min_length=1, max_length=16)


@router.get("/models/{name}", responses=error_responses(404, 503))
async def metadata(name: str, request: Request) -> dict:
    model = registry_of(request).get(name)
    spec = model.entry.spec
    tensors = lambda items: [{"name": t["name"], "datatype": V2_TYPES[t["datatype"]], "shape": t["shape"]} for t in items]  # noqa: E731
    return {"name": name, "versions": [str(model.entry.version)], "platform": model.runtime.name, "inputs": tensors(spec["inputs"]), "outputs": tensors(spec["outputs"])}


@router.get("/models/{name}/ready", responses=error_responses(404))
async def model_ready(name: str, request: Request) -> JSONResponse:
    versions = registry_of(request).versions(name)
    ready = any(m.ready for m in versions.values())
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


def parse_body(raw: bytes) -> InferRequest:
    """(runs in the encoder pool) JSON → a validated request; 422 for anything malformed."""
    try:
        return InferRequest.model_validate(json.loads(raw))
    except ValidationError as error:
        first = error.errors()[0]
        raise ApiError(422, f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
    except (ValueError, RecursionError) as error:  # JSONDecodeError, int digits limit, nesting
        raise ApiError(422, f"the body is not valid JSON ({type(error).__name__})")


def tensor_array(name: str, datatype: str, data: list, shape: list[int]) -> np.ndarray:
    """A tensor's values as a numpy array of its datatype; integers must be integers in range."""
    if datatype == "INT64":
        if any(type(v) is not int for v in data):
            raise ApiError(422, f"input {name!r}: INT64 values must be integers")
        if any(not -(2**63) <= v < 2**63 for v in data):
            raise ApiError(422, f"input {name!r}: INT64 values must lie in [-2^63, 2^63)")
    try:
        array = np.asarray(data, dtype=NUMPY_TYPES[datatype]).reshape(shape)
    except (TypeError, ValueError, OverflowError):
        raise ApiError(422, f"input {name!r}: the data must be a flat list of {datatype} numbers")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ApiError(422, f"input {name!r} holds NaN, infinity or a value outside FP32's range")
    return array


def parse_inputs(model: LoadedModel, body: InferRequest, settings: Settings) -> list[dict[str, np.ndarray]]:
    """(runs in the encoder pool) The request's tensors → per-row items, every bound checked."""
    spec = model.entry.spec
    expected = {t["name"]: t for t in spec["inputs"]}
    names = [t.name for t in body.inputs]
    if len(set(names)) != len(names):
        raise ApiError(422, f"input names must be unique, got {names}")
    if set(names) != set(expected):
        raise ApiError(422, f"inputs must be exactly {sorted(expected)}, got {sorted(names)}")
    arrays, batch = {}, None
    for tensor in body.inputs:
        name, want = tensor.name, expected[tensor.name]
        if tensor.datatype != V2_TYPES[want["datatype"]]:
            raise ApiError(422, f"input {name!r} must be {V2_TYPES[want['datatype']]}, not {tensor.datatype}")
        if len(tensor.shape) != len(want["shape"]) or any(w != -1 and w != g for w, g in zip(want["shape"], tensor.shape)):
            raise ApiError(422, f"input {name!r} must have shape {want['shape']} (-1 = any), got {tensor.shape}")
        if batch is not None and tensor.shape[0] != batch:
            raise ApiError(422, "all inputs must share the batch size")
        batch = tensor.shape[0]
        if not 1 <= batch <= settings.max_images_per_request:
            raise ApiError(422, f"batch of {batch}: between 1 and {settings.max_images_per_request} rows per request")
        check_spatial(model, name, tensor.shape, settings)
        if len(tensor.data) != math.prod(tensor.shape):
            raise ApiError(422, f"input {name!r}: shape {tensor.shape} needs {math.prod(tensor.shape)} values, got {len(tensor.data)}")
        arrays[name] = tensor_array(name, tensor.datatype, tensor.data, tensor.shape)
    if "label" in arrays and not ((arrays["label"] >= 0) & (arrays["label"] < len(spec.get("class_names") or []))).all():
        raise ApiError(422, "label values must be valid class indices")
    return [{name: array[i] for name, array in arrays.items()} for i in range(batch)]


def check_spatial(model: LoadedModel, name: str, shape: list[int], settings: Settings) -> None:
    """Image-to-image inputs: sides the network takes (422) within the model's pixel limit (413)."""
    spec = model.entry.spec
    if model.entry.kind not in IMAGE_TO_IMAGE or len(shape) != 4:
        return
    height, width = shape[2:]
    multiple = spec["size_multiple"]
    floor = min(padded_size(1, 1, multiple))
    if height < floor or width < floor or height % multiple or width % multiple:
        raise ApiError(422, f"input {name!r}: height and width must be multiples of {multiple} and at least {floor}, got {[height, width]}")
    limit = model.limits.max_input_pixels if model.limits else settings.max_upload_pixels
    if height * width > limit:
        raise ApiError(413, f"input {name!r}: {height}x{width} is over {model.entry.name!r}'s limit of {limit} pixels per image")


def output_values(model: LoadedModel, shapes: list[list[int]]) -> int:
    """Values of the output tensor, from the input shapes (before anything runs)."""
    spec = model.entry.spec
    out = spec["outputs"][0]["shape"]
    batch = shapes[0][0]
    if model.entry.kind in IMAGE_TO_IMAGE:
        image = next(s for s in shapes if len(s) == 4)
        return batch * spec["channels"] * image[2] * image[3] * spec["scale"] ** 2
    return batch * math.prod(d for d in out[1:])


def encode_infer_response(name: str, version: int, request_id: str | None, output_name: str, result: np.ndarray) -> bytes:
    result = result.astype(np.float32)
    return json.dumps({"model_name": name, "model_version": str(version), "id": request_id,
                       "outputs": [{"name": output_name, "datatype": "FP32", "shape": list(result.shape), "data": result.ravel().tolist()}]}).encode()


@router.post("/models/{name}/infer", responses=error_responses(404, 413, 415, 422, 429, 503, 504),
             openapi_extra={"requestBody": {"content": {"application/json": {"schema": InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}, "required": True}})
async def infer(name: str, request: Request) -> Response:
    registry = registry_of(request)
    model = begin(request, name, "infer")
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("", "application/json"):
        raise ApiError(415, f"send the inference request as application/json (got {media!r})")
    raw = await request.body()
    reserve(request, len(raw) * PARSED_BYTES_PER_BODY_BYTE)
    body = await off_loop(request, parse_body, raw)
    shapes = [t.shape for t in body.inputs]
    items = await off_loop(request, parse_inputs, model, body, registry.settings)
    values = output_values(model, shapes)
    if values > registry.settings.max_json_tensor_values:
        raise ApiError(413, f"the output would hold {values} values; JSON answers hold at most {registry.settings.max_json_tensor_values}: send fewer rows or smaller images")
    cost = model.costs.get("model")
    units = [cost.units(item) if cost else 1.0 for item in items]
    in_values = sum(math.prod(s) for s in shapes)
    resident = in_values * (PYTHON_VALUE_BYTES + 8) + values * (4 + PYTHON_VALUE_BYTES + JSON_VALUE_BYTES)

    async def work(state) -> np.ndarray:
        return np.stack(await run_items(registry.batcher(model, "infer"), items, state))

    result = await execute(request, model, estimate(model, "model", units, resident), work)
    entry = model.entry
    content = await off_loop(request, encode_infer_response, name, entry.version, body.id, entry.spec["outputs"][0]["name"], result)
    return Response(content, media_type="application/json")
