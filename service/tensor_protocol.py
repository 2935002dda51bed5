"""The Open Inference Protocol's (KServe v2) wire format, as `tritonclient` and KServe's clients
speak it: a JSON inference header, optionally followed by binary tensors (the binary tensor data
extension: `Inference-Header-Content-Length` says where the JSON ends, each binary input says
its `binary_data_size`), and the same two shapes for the answer.

Everything here is bounded before it allocates: the body is already bounded by the intake, a
binary tensor must be exactly as long as its shape and datatype say, JSON values must be
numbers of the datatype, and the datatype must be one the model's input can take.
"""
from __future__ import annotations

import json
import math
from typing import Annotated, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError
from starlette.datastructures import Headers

from service.digits import MAX_DIGITS, ascii_count
from service.errors import ApiError, DuplicateKey, parse_failure, unique_keys
from service.schemas import MAX_INPUT_MAGNITUDE

# wire datatype → numpy; which wire datatypes each model input dtype accepts (converted on arrival)
WIRE_TYPES = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64}
ACCEPTED = {"float32": ("FP32", "FP16"), "int64": ("INT64", "INT32", "UINT8")}
MODEL_TYPES = {"float32": np.float32, "int64": np.int64}
HEADER_LENGTH = "inference-header-content-length"
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16"]


class TensorParameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data_size: Annotated[int, Strict()] | None = Field(None, ge=0, le=2**40)
    binary_data: Annotated[bool, Strict()] | None = None


class InferParameters(BaseModel):
    """The request's parameters: `binary_data_output` a JSON boolean (the string "false" was truthy);
    `timeout` Triton's schedule-policy timeout, integer microseconds (0: none; tritonclient's
    `infer(timeout=...)`)."""

    model_config = ConfigDict(extra="allow")
    binary_data_output: Annotated[bool, Strict()] | None = None
    timeout: Annotated[int, Strict()] | None = Field(None, ge=0, le=2**63 - 1)


class InferTensor(BaseModel):
    name: str = Field(min_length=1, max_length=256)
    shape: list[Annotated[int, Strict(), Field(ge=0, le=2**31)]] = Field(min_length=1, max_length=8)
    datatype: Datatype
    data: list | None = None
    parameters: TensorParameters | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=256)
    parameters: TensorParameters | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = Field(None, max_length=256)
    inputs: list[InferTensor] = Field(min_length=1, max_length=16)
    outputs: list[RequestedOutput] | None = Field(None, max_length=16)
    parameters: InferParameters | None = None

    @property
    def timeout_s(self) -> float | None:
        """The client's own deadline in seconds, where it set one (`parameters.timeout`, µs; 0 is none, as in Triton)."""
        return self.parameters.timeout / 1e6 if self.parameters and self.parameters.timeout else None

    def wants_binary(self, output: str) -> bool:
        """An output comes back binary if its request says so, else if `binary_data_output` does."""
        for requested in self.outputs or []:
            if requested.name == output and requested.parameters and requested.parameters.binary_data is not None:
                return requested.parameters.binary_data
        return bool(self.parameters and self.parameters.binary_data_output)


def json_part_bytes(header_length: str | None, body_bytes: int) -> int:
    """How many of the body's bytes are its JSON header: all of them without
    `Inference-Header-Content-Length`, else what it says, 422 where that is no count within the body."""
    if header_length is None:
        return body_bytes
    length = ascii_count(header_length)  # ASCII digits only: int() would also take "3_62", " 362" and "+362"
    if length is None:  # (a header's bytes come as Latin-1: "٣" read "Ù£", so other bytes are shown as bytes)
        shown = header_length[:32] if header_length.isascii() else header_length[:32].encode("latin-1", "replace")
        raise ApiError(422, f"Inference-Header-Content-Length must be an integer of at most {MAX_DIGITS} ASCII digits, got {shown!r}")
    if not 0 < length <= body_bytes:
        raise ApiError(422, f"Inference-Header-Content-Length {length} does not fit a body of {body_bytes} bytes")
    return length


def header_length_of(headers: Headers) -> str | None:
    """The request's `Inference-Header-Content-Length`, 422 where it is given twice: two parsers
    on the way may each read another one, and so split JSON from tensors differently (the first
    was taken)."""
    given = headers.getlist(HEADER_LENGTH)
    if len(given) > 1:
        raise ApiError(422, "Inference-Header-Content-Length is given twice: send it once")
    return given[0] if given else None


def split_body(raw: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tail) of an inference request."""
    length = json_part_bytes(header_length, len(raw))
    return raw[:length], memoryview(raw)[length:]


SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")  # the sequence batcher's: Triton keeps a stream's state by them


def refuse_unserved_extensions(body: InferRequest) -> None:
    """422 for what a client asks of an extension this server does not serve, where the answer
    would not be what it asked for: an output's top classes (the classification extension: the
    answer would be the raw tensor), a tensor in a shared-memory region (tritonclient's
    `set_shared_memory`: the output came back in the body, nothing written to the region the
    client then reads; an input's region was never read) and a sequence's parameters (each
    request is served alone, with no state kept between them). `priority` is a scheduling hint this
    server does not act on; `timeout` is honoured (`InferRequest.timeout_s`)."""
    for requested in body.outputs or []:
        if requested.parameters and (requested.parameters.model_extra or {}).get("classification"):
            raise ApiError(422, f"output {requested.name!r} asks for its top classes (the classification extension), which this server "
                                "does not serve: ask for the output itself")
    tensors = [("input", tensor) for tensor in body.inputs] + [("output", requested) for requested in body.outputs or []]
    for role, tensor in tensors:
        if tensor.parameters and "shared_memory_region" in (tensor.parameters.model_extra or {}):
            raise ApiError(422, f"{role} {tensor.name!r} names a shared-memory region; this server does not serve the shared-memory "
                                "extension: send the tensor in the request body and read it from the answer (binary data for speed)")
    if body.parameters and (asked := [name for name in SEQUENCE_PARAMETERS if name in (body.parameters.model_extra or {})]):
        raise ApiError(422, f"parameters: {asked[0]} belongs to a sequence; this server keeps no state between requests and serves "
                            "each one alone: send it without sequence parameters")


# An inference header needs a few dozen JSON objects (the request, its parameters, 16 inputs and 16 outputs with theirs);
# this many opening braces leaves room for braces inside strings. Past it, 422 before parsing: each object costs a call
# of `unique_keys`, and 1 MiB of `{},` in an input's data took 90 ms of parsing holding the GIL where 45 ms without it.
MAX_HEADER_BRACES = 16384


def parse_request(raw: bytes, header_length: str | None) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """(runs in the encoder pool) The request and its input arrays, as sent (not yet converted)."""
    header, tail = split_body(raw, header_length)
    if header.count(b"{") > MAX_HEADER_BRACES:
        raise ApiError(422, f"the inference header holds more than {MAX_HEADER_BRACES} JSON objects; a request needs a few dozen "
                            "(tensor values are numbers)")
    try:
        body = InferRequest.model_validate(json.loads(header, object_pairs_hook=unique_keys))
    except ValidationError as error:
        first = error.errors()[0]
        raise ApiError(422, f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
    except DuplicateKey as duplicate:  # (the parser kept the last: `"timeout": 1, "timeout": 0` was served with no timeout)
        raise ApiError(422, f"the key {duplicate.key[:64]!r} appears more than once in one JSON object of the inference header: "
                            "say it once") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, int digits limit, nesting
        raise ApiError(422, f"the inference header is not valid JSON ({type(error).__name__}){parse_failure(error)}")
    refuse_unserved_extensions(body)
    arrays, offset = {}, 0
    for tensor in body.inputs:
        if tensor.datatype not in WIRE_TYPES:
            raise ApiError(422, f"input {tensor.name!r}: datatype {tensor.datatype} is not served (use {', '.join(WIRE_TYPES)})")
        dtype = np.dtype(WIRE_TYPES[tensor.datatype]).newbyteorder("<")
        count = math.prod(tensor.shape)
        size = tensor.parameters.binary_data_size if tensor.parameters else None
        if size is not None and tensor.data is not None:  # one of them would be dropped without a word
            raise ApiError(422, f"input {tensor.name!r} has both data and binary_data_size: send its values one way")
        if size is not None:
            if size != count * dtype.itemsize:
                raise ApiError(422, f"input {tensor.name!r}: binary_data_size {size} is not {count} {tensor.datatype} values of shape {tensor.shape}")
            if offset + size > len(tail):
                raise ApiError(422, f"input {tensor.name!r}: the body ends before its {size} binary bytes")
            arrays[tensor.name] = np.frombuffer(tail[offset:offset + size], dtype=dtype).reshape(tensor.shape)
            offset += size
        elif tensor.data is not None:
            arrays[tensor.name] = json_array(tensor, count)
        else:
            raise ApiError(422, f"input {tensor.name!r} has neither data nor binary_data_size")
    if offset != len(tail):
        raise ApiError(422, f"{len(tail) - offset} binary bytes follow the inputs that no input claims")
    return body, arrays


def flat_data(tensor: InferTensor) -> list:
    """The tensor's JSON values in row-major order, sent flat or nested as its shape (KServe's
    examples nest: `[[…], […]]` for shape [2, 64] was refused as 2 values of 128). Each level is
    checked against the shape before it is opened, so flattening touches only values the bounded
    header holds."""
    data = tensor.data
    if len(tensor.shape) < 2 or not data or not isinstance(data[0], list):
        return data
    level = data
    for depth, size in enumerate(tensor.shape):
        if len(level) != math.prod(tensor.shape[:depth + 1]):
            raise ApiError(422, f"input {tensor.name!r}: nested data must follow its shape {tensor.shape}: level {depth} holds "
                                f"{len(level)} items, not {math.prod(tensor.shape[:depth + 1])}")
        if depth + 1 < len(tensor.shape):
            if not all(type(item) is list and len(item) == tensor.shape[depth + 1] for item in level):
                raise ApiError(422, f"input {tensor.name!r}: nested data must follow its shape {tensor.shape}: every list at level "
                                    f"{depth + 1} holds {tensor.shape[depth + 1]} values")
            level = [value for item in level for value in item]
    return level


def json_array(tensor: InferTensor, count: int) -> np.ndarray:
    """JSON values (flat or nested as the shape) as an array of the tensor's datatype; integers
    must be integers in range."""
    data = flat_data(tensor)
    if len(data) != count:
        raise ApiError(422, f"input {tensor.name!r}: shape {tensor.shape} needs {count} values, got {len(data)}")
    dtype = WIRE_TYPES[tensor.datatype]
    if any(type(v) is bool for v in data):  # numpy would take true as 1
        raise ApiError(422, f"input {tensor.name!r}: {tensor.datatype} values must be numbers, not true or false")
    if any(type(v) not in (int, float) for v in data):  # numpy would parse "0.5" (and lists nested off the shape)
        raise ApiError(422, f"input {tensor.name!r}: the data must be {tensor.datatype} numbers, flat or nested as the shape")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if any(type(v) is not int for v in data):
            raise ApiError(422, f"input {tensor.name!r}: {tensor.datatype} values must be integers")
        if any(not info.min <= v <= info.max for v in data):
            raise ApiError(422, f"input {tensor.name!r}: {tensor.datatype} values must lie in [{info.min}, {info.max}]")
    try:
        with np.errstate(over="ignore"):  # (a value past the type's range becomes infinity, refused by `to_model_dtype`; numpy's warning went raw to stderr)
            return np.asarray(data, dtype=dtype).reshape(tensor.shape)
    except OverflowError:  # an integer past what a float holds (10^309 and up)
        raise ApiError(422, f"input {tensor.name!r} holds a value outside {tensor.datatype}'s range")
    except (TypeError, ValueError):
        raise ApiError(422, f"input {tensor.name!r}: the data must be {tensor.datatype} numbers, flat or nested as the shape")


def to_model_dtype(name: str, wire: str, array: np.ndarray, model_dtype: str) -> np.ndarray:
    """The input in the model's dtype, if the model takes that wire datatype; floats must be finite
    and within ±MAX_INPUT_MAGNITUDE (the bound v1's w vectors have): a finite 3e38 overflows the
    forward pass into NaN, which a JSON answer cannot even carry."""
    if wire not in ACCEPTED[model_dtype]:
        raise ApiError(422, f"input {name!r} takes {' or '.join(ACCEPTED[model_dtype])}, not {wire}")
    converted = array.astype(MODEL_TYPES[model_dtype])
    if converted.dtype.kind == "f":
        if not np.isfinite(converted).all():
            raise ApiError(422, f"input {name!r} holds NaN, infinity or a value outside {wire}'s range")
        if converted.size and float(np.abs(converted).max()) > MAX_INPUT_MAGNITUDE:
            raise ApiError(422, f"input {name!r} holds a value beyond ±{MAX_INPUT_MAGNITUDE:g}")
    return converted


def encode_response(name: str, version: int, body: InferRequest,
                    outputs: dict[str, np.ndarray | list[np.ndarray]]) -> tuple[bytes, dict[str, str], str]:
    """(content, headers, media type): JSON only, or a JSON header followed by the binary outputs.
    An output is an array, or its rows (each item's output, as the batcher answered them): a
    binary output is written from its rows straight into the body, one copy. Stacked first, then
    `tobytes()`, then joined, a large answer was held four times over (a hostile probe: a 1.26 GB
    answer raised the process's memory by 4.9 GB where 3.3 GB were reserved).
    The JSON is written by orjson from the arrays themselves: `json.dumps(array.tolist())` took
    0.67 s for the 786 k values of a 256-row StyleGAN answer, one C call that held the GIL and
    stopped the event loop for as long (a hostile probe: a benign request's p99 709 ms); orjson
    takes 0.03 s and writes each float32 in its shortest form (half the bytes, the same values)."""
    described, binary = [], []
    for output, value in outputs.items():
        rows = [np.ascontiguousarray(row, dtype="<f4") for row in value] if isinstance(value, list) else None
        shape = [len(rows), *rows[0].shape] if rows else list(np.shape(value))
        tensor = {"name": output, "datatype": "FP32", "shape": shape}
        if body.wants_binary(output):
            chunks = rows if rows is not None else [np.ascontiguousarray(value, dtype="<f4")]
            tensor["parameters"] = {"binary_data_size": sum(chunk.nbytes for chunk in chunks)}
            binary.extend(memoryview(chunk).cast("B") for chunk in chunks)
        else:
            array = np.ascontiguousarray(np.stack(rows) if rows else value, dtype="<f4")
            if not np.isfinite(array).all():
                raise ApiError(422, f"output {output!r} holds NaN or infinity for these inputs, which JSON cannot carry: ask for it as binary data")
            tensor["data"] = array.ravel()
        described.append(tensor)
    header = orjson.dumps({"model_name": name, "model_version": str(version), **({"id": body.id} if body.id is not None else {}),
                           "outputs": described}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return header, {}, "application/json"
    return b"".join([header, *binary]), {"Inference-Header-Content-Length": str(len(header))}, "application/octet-stream"
