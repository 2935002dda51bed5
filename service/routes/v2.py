"""The Open Inference Protocol (KServe v2) for tensor clients such as `tritonclient`: server and
model metadata and readiness (with or without `/versions/{v}`), and `infer` through the same
batcher as v1 (operation `infer`), one item per batch row. JSON and the binary tensor data
extension both ways (service/tensor_protocol.py); errors in the protocol's `{"error": "..."}` shape.

The body is parsed and checked off the event loop, and bounded like v1: rows per request, the
model's spatial limits (image-to-image inputs), integer values that are integers in range, and
a JSON output small enough to write (`max_json_tensor_values`; binary outputs are bounded by the
same image limits and reserved in the memory budget); the response is serialised in the encoder pool."""
from __future__ import annotations

import importlib.metadata
import math
import sys
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse

from service.admission import servable_rows
from service.batcher import run_items
from service.digits import ascii_count
from service.errors import ApiError, error_responses
from service.pipeline import begin, checked_on_headers, client_timeout, declared_media, estimate, execute, off_loop, path_value, registry_of, reserve
from service.registry import IMAGE_TO_IMAGE, LoadedModel
from service.schemas import VERSION_TEXT, VersionText
from service.settings import Settings
from service.tensor_protocol import ACCEPTED, InferRequest, encode_response, header_length_of, json_part_bytes, parse_request, to_model_dtype
from service.tiling import padded_size
from service.version_policy import triton_policy

router = APIRouter(prefix="/v2", tags=["v2"])
PYTHON_VALUE_BYTES = 40  # a parsed JSON number: the object and its list slot
JSON_VALUE_BYTES = 24  # a float written as JSON text
PARSED_BYTES_PER_BODY_BYTE = 16  # a JSON number takes at least 2 bytes ("0,") and becomes a ~32-byte object
MAX_JSON_BYTES_PER_VALUE = 48  # the longest float's text, its separator, and a pretty-printer's indentation
JSON_HEADER_SLACK = 64 * 1024  # names, shapes, datatypes, parameters, the request id
JSON_STRUCTURE_COMMAS = 4096  # the commas of a header's keys, shapes and strings, beside its values'
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "eager": "pytorch_eager"}  # as Triton names them
VersionPath = Annotated[VersionText, Path()]


@router.get("")
async def server_metadata() -> dict:
    """`schedule_policy`: a request's `timeout` is its deadline where shorter than the server's, and
    its `priority` is taken and, as in Triton without `priority_levels` (none in `/config`), has no effect."""
    return {"name": "ganserve", "version": importlib.metadata.version("ganserve"),
            "extensions": ["binary_tensor_data", "model_repository", "schedule_policy"]}


def wire_tensors(items: list[dict]) -> list[dict]:
    """A graph's tensors as the protocol names them: the model's own datatype's wire name."""
    return [{"name": t["name"], "datatype": ACCEPTED[t["datatype"]][0], "shape": t["shape"]} for t in items]


def model_metadata(request: Request, name: str, version: int | None) -> dict:
    registry = registry_of(request)
    model = registry.get(name, version)
    spec = model.entry.spec
    return {"name": name, "versions": [str(v) for v in sorted(registry.versions(name))], "platform": PLATFORMS.get(model.runtime.name, model.runtime.name),
            "inputs": wire_tensors(spec["inputs"]), "outputs": wire_tensors(spec["outputs"])}


@router.get("/models/{name}", responses=error_responses(404, 503, protocol=True))
async def metadata(name: str, request: Request) -> dict:
    return model_metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", responses=error_responses(404, 503, protocol=True))
async def version_metadata(name: str, version: VersionPath, request: Request) -> dict:
    return model_metadata(request, name, version)


def model_configuration(request: Request, name: str, version: int | None) -> dict:
    """Triton's model configuration (`tritonclient`'s `get_model_config`: it was a bare 404), from
    what this server serves: `max_batch_size` the most rows one request is served (as Triton
    refuses a larger one; it said the batcher's 64 where 256 were taken, and clients split their
    batches by it; for an upscaler, whose rows take any size, rows of one tile each: rows smaller
    than a tile cost less and a few more may be served, so it is the safe figure), the batcher's
    own batch as `dynamic_batching`'s preferred size, `instance_group` one instance per lane
    thread, each tensor's dims without the batch dimension, -1 where any size is taken."""
    registry = registry_of(request)
    model = registry.get(name, version)
    spec, config = model.entry.spec, model.config

    def tensors(items: list[dict]) -> list[dict]:
        return [{"name": t["name"], "data_type": f"TYPE_{ACCEPTED[t['datatype']][0]}", "dims": t["shape"][1:]} for t in items]

    runtime = model.runtime.name
    return {"name": name, "platform": PLATFORMS.get(runtime, runtime), "backend": "onnxruntime" if runtime == "onnx" else "pytorch",
            "max_batch_size": servable_rows(model, registry.settings), "input": tensors(spec["inputs"]), "output": tensors(spec["outputs"]),
            "dynamic_batching": {"preferred_batch_size": [config.max_batch_size], "max_queue_delay_microseconds": round(1000 * config.max_queue_delay_ms),
                                 "default_queue_policy": {"max_queue_size": config.max_queue_size}},
            "instance_group": [{"name": name, "kind": "KIND_GPU" if registry.device == "cuda" else "KIND_CPU", "count": config.lane_threads}],
            "version_policy": triton_policy(registry.settings.policy_for(name))}


@router.get("/models/{name}/config", responses=error_responses(404, 503, protocol=True))
async def config(name: str, request: Request) -> dict:
    return model_configuration(request, name, None)


@router.get("/models/{name}/versions/{version}/config", responses=error_responses(404, 503, protocol=True))
async def version_config(name: str, version: VersionPath, request: Request) -> dict:
    return model_configuration(request, name, version)


def readiness(request: Request, name: str, version: int | None) -> JSONResponse:
    versions = registry_of(request).versions(name)
    if version is not None and version not in versions:
        raise ApiError(404, f"model {name!r} has no version {version} (has {sorted(versions)})")
    ready = versions[version].ready if version is not None else any(m.ready for m in versions.values())
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


@router.get("/models/{name}/ready", responses=error_responses(404, protocol=True))
async def model_ready(name: str, request: Request) -> JSONResponse:
    return readiness(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses=error_responses(404, protocol=True))
async def version_ready(name: str, version: VersionPath, request: Request) -> JSONResponse:
    return readiness(request, name, version)


def parse_inputs(model: LoadedModel, body: InferRequest, arrays: dict[str, np.ndarray], settings: Settings) -> list[dict[str, np.ndarray]]:
    """(runs in the encoder pool) The request's tensors → per-row items, every bound checked."""
    spec = model.entry.spec
    expected = {t["name"]: t for t in spec["inputs"]}
    names = [t.name for t in body.inputs]
    if len(set(names)) != len(names):
        raise ApiError(422, f"input names must be unique, got {names}")
    if set(names) != set(expected):
        raise ApiError(422, f"inputs must be exactly {sorted(expected)}, got {sorted(names)}")
    outputs = {t["name"] for t in spec["outputs"]}
    unknown = [o.name for o in body.outputs or [] if o.name not in outputs]
    if unknown:
        raise ApiError(422, f"unknown outputs {unknown}: this model gives {sorted(outputs)}")
    asked = [o.name for o in body.outputs or []]
    if len(set(asked)) != len(asked):  # (one as JSON, one as binary data: answered binary without a word)
        raise ApiError(422, f"output names must be unique, got {asked}")
    converted, batch = {}, None
    for tensor in body.inputs:
        name, want = tensor.name, expected[tensor.name]
        if len(tensor.shape) != len(want["shape"]) or any(w != -1 and w != g for w, g in zip(want["shape"], tensor.shape)):
            raise ApiError(422, f"input {name!r} must have shape {want['shape']} (-1 = any), got {tensor.shape}")
        if batch is not None and tensor.shape[0] != batch:
            raise ApiError(422, "all inputs must share the batch size")
        batch = tensor.shape[0]
        if not 1 <= batch <= settings.max_images_per_request:
            raise ApiError(422, f"batch of {batch}: between 1 and {settings.max_images_per_request} rows per request")
        check_spatial(model, name, tensor.shape, settings)
        converted[name] = to_model_dtype(name, tensor.datatype, arrays[name], want["datatype"])
    if "label" in converted and not ((converted["label"] >= 0) & (converted["label"] < len(spec.get("class_names") or []))).all():
        raise ApiError(422, "label values must be valid class indices")
    return [{name: array[i] for name, array in converted.items()} for i in range(batch)]


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
        raise ApiError(413, f"input {name!r}: {height}x{width} is over the limit of model {model.entry.name!r}, {limit} pixels per image")


def output_values(model: LoadedModel, shapes: list[list[int]]) -> int:
    """Values of the output tensor, from the input shapes (before anything runs)."""
    spec = model.entry.spec
    out = spec["outputs"][0]["shape"]
    batch = shapes[0][0]
    if model.entry.kind in IMAGE_TO_IMAGE:
        image = next(s for s in shapes if len(s) == 4)
        return batch * spec["channels"] * image[2] * image[3] * spec["scale"] ** 2
    return batch * math.prod(d for d in out[1:])


@dataclass(frozen=True)
class JsonValueLimit:
    """What a JSON header to a model may carry: `rows` (`servable_rows`) of `per_row` values."""

    rows: int
    per_row: int

    @property
    def values(self) -> int:
        return self.rows * self.per_row


def json_value_limit(model: LoadedModel, settings: Settings) -> JsonValueLimit | None:
    """The most values a JSON header to this model may carry: what the rows it can serve need
    (`servable_rows`) where every input has a fixed shape past its batch axis (generators); None
    where an input's size is dynamic (images: bounded by `max_json_header_bytes` instead). It was
    what 256 rows need: a 256² StyleGAN that serves about 5 parsed 8 MB of them (0.64 s holding the
    GIL; a benign request's p99 60 → 1,055 ms in a probe) before its 413 for their compute."""
    per_row = 0
    for tensor in model.entry.spec["inputs"]:
        dims = tensor["shape"][1:]
        if any(d < 0 for d in dims):
            return None
        per_row += math.prod(dims)
    return JsonValueLimit(servable_rows(model, settings), per_row)


def json_header_limit(limit: JsonValueLimit | None, settings: Settings) -> int:
    """The most JSON header bytes a request may send, refused past it (413) before it is parsed:
    parsing holds the GIL, ~1 s per 8 MiB of values, and stalled every other request while the
    value count was only checked after. Where the inputs have a fixed size (`limit`), what its
    values can need written long; where an input's size is dynamic (images),
    `max_json_header_bytes`: their pixel limits allow far more values than the body limit, so no
    shape bounds the parse, and images travel as binary."""
    return settings.max_json_header_bytes if limit is None else limit.values * MAX_JSON_BYTES_PER_VALUE + JSON_HEADER_SLACK


def check_json_values(name: str, limit: JsonValueLimit | None, raw: bytes, json_bytes: int) -> None:
    """413 for a JSON header of more values than `limit`, counted by its commas before it is
    parsed. The byte limit allows for long floats: 6.3 MB of `0,` under the 512-value StyleGAN's
    limit were 3.1 M values, 0.4 s of parsing that held the GIL (a hostile probe: a benign
    request's p50 4 → 165 ms); counting them takes milliseconds."""
    if limit is not None and raw.count(b",", 0, json_bytes) > limit.values + JSON_STRUCTURE_COMMAS:
        raise ApiError(413, f"the inference header holds more than {limit.values} values; {name!r} takes at most "
                            f"{limit.rows} rows of its inputs ({limit.values} values) in one request here")


# the body is read as JSON (then binary tensors) whatever it says: `curl -d` labels it a form and a
# browser's fetch of a string text/plain, and both were 415; only other declared formats are refused
INFER_MEDIA_TYPES = ("", "application/json", "application/octet-stream", "application/x-www-form-urlencoded", "text/plain")


def infer_media(request: Request) -> None:
    media = declared_media(request)
    if media not in INFER_MEDIA_TYPES:
        raise ApiError(415, f"send the inference request as JSON, or JSON followed by binary tensors (got {media!r})")


def infer_headers(request: Request) -> None:
    """What an inference request is refused on its path and headers alone (`checked_on_headers`):
    an unknown or unready model or version, a content type it does not read, an
    `Inference-Header-Content-Length` that is no count within the declared body, or given twice
    (a probe's `abc` was read with 8 MB after `Expect: 100-continue` for its 422)."""
    begin(request, request.path_params["name"], "infer", path_value(request, "version", VERSION_TEXT))
    infer_media(request)
    if (header_length := header_length_of(request.headers)) is not None:
        declared = ascii_count(request.headers.get("content-length"))  # (None where chunked: its size is not known yet)
        json_part_bytes(header_length, sys.maxsize if declared is None else declared)


async def infer_on(request: Request, name: str, version: int | None) -> Response:
    registry = registry_of(request)
    model = begin(request, name, "infer", version)
    infer_media(request)
    raw = await request.body()
    header_length = header_length_of(request.headers)
    json_bytes = json_part_bytes(header_length, len(raw))  # (422 for a header that is no count: "0" or "abc" once read as "all JSON", then 413)
    value_limit = json_value_limit(model, registry.settings)  # (once: its rows come from a search over the compute limit)
    limit = json_header_limit(value_limit, registry.settings)
    if json_bytes > limit:
        raise ApiError(413, f"the inference header is {json_bytes} bytes of JSON; {name!r} takes at most {limit} "
                            "(send the tensors as binary data)")
    check_json_values(name, value_limit, raw, json_bytes)
    reserve(request, json_bytes * PARSED_BYTES_PER_BODY_BYTE + len(raw))
    body, arrays = await off_loop(request, parse_request, raw, header_length)
    client_timeout(request, body.timeout_s)
    shapes = [t.shape for t in body.inputs]
    items = await off_loop(request, parse_inputs, model, body, arrays, registry.settings)
    output_name = model.entry.spec["outputs"][0]["name"]
    values = output_values(model, shapes)
    json_values = 0 if body.wants_binary(output_name) else values
    if json_values > registry.settings.max_json_tensor_values:
        raise ApiError(413, f"the output would hold {values} values; JSON answers hold at most {registry.settings.max_json_tensor_values}: "
                            "send fewer rows or smaller images, or ask for the output as binary data")
    cost = model.costs.get("model")
    units = [cost.units(item) if cost else 1.0 for item in items]
    in_values = sum(math.prod(s) for s in shapes)
    resident = in_values * 8 + values * 8 + json_values * (PYTHON_VALUE_BYTES + JSON_VALUE_BYTES)

    async def work(state) -> list[np.ndarray]:  # each item's output: encode_response writes them into the body as they are
        return await run_items(registry.batcher(model, "infer"), items, state)

    rows = await execute(request, model, estimate(model, "model", units, resident), work)
    entry = model.entry
    content, headers, media_type = await off_loop(request, encode_response, name, entry.version, body, {output_name: rows})
    del rows  # (the answer's bytes are all that is held while it is sent)
    return Response(content, media_type=media_type, headers=headers)


def inlined(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` written in place: refs to them named
    `#/components/schemas/…`, where nothing put them, so ReDoc failed on the request body
    ("Invalid reference token: InferTensor") and other tools could not read it (no model here is recursive)."""
    definitions = schema.pop("$defs", {})

    def expand(node):
        if isinstance(node, dict):
            if set(node) == {"$ref"} and node["$ref"].startswith("#/$defs/"):
                return expand(definitions[node["$ref"].removeprefix("#/$defs/")])
            return {key: expand(value) for key, value in node.items()}
        if isinstance(node, list):
            return [expand(item) for item in node]
        return node

    return expand(schema)


INFER_SCHEMA = inlined(InferRequest.model_json_schema())
# JSON (under any of the types clients send it with), or JSON followed by the binary tensors, its length in Inference-Header-Content-Length
INFER_DOC = {"requestBody": {"content": {media: {"schema": INFER_SCHEMA} for media in INFER_MEDIA_TYPES if media}
                             | {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}, "required": True}}


@router.post("/models/{name}/infer", responses=error_responses(404, 413, 415, 422, 429, 503, 504, protocol=True), openapi_extra=INFER_DOC)
@checked_on_headers(infer_headers)
async def infer(name: str, request: Request) -> Response:
    return await infer_on(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", responses=error_responses(404, 413, 415, 422, 429, 503, 504, protocol=True), openapi_extra=INFER_DOC)
@checked_on_headers(infer_headers)
async def version_infer(name: str, version: VersionPath, request: Request) -> Response:
    return await infer_on(request, name, version)
