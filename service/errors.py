"""Every error leaves as JSON with the right status: `{"error": {"code", "message"}}` on the
REST API, `{"error": "message"}` on the tensor protocol's `/v2` routes (the shape its clients read)."""
from __future__ import annotations

import logging
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("ganserve.errors")
STATUS_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout", 412: "precondition_failed",
                413: "payload_too_large", 415: "unsupported_media_type", 417: "expectation_failed", 421: "misdirected_request", 422: "invalid_request", 426: "upgrade_required", 429: "queue_full",
                499: "client_closed_request", 500: "internal", 501: "not_implemented", 503: "unavailable", 504: "deadline_exceeded"}
STATUS_MEANINGS = {
    403: "the operation is switched off on this server", 404: "unknown model, version or job", 406: "the Accept header names no format this operation produces",
    413: "body, image or request cost over a limit (permanent: send less)", 415: "wrong content type",
    422: "invalid body or parameters", 429: "the model's queue is full (Retry-After)",
    503: "model not ready, server draining or overloaded (Retry-After)", 504: "the deadline passed before the result was computed",
}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ProtocolErrorBody(BaseModel):
    """The Open Inference Protocol's error shape (`/v2` routes)."""

    error: str


def error_responses(*statuses: int, protocol: bool = False) -> dict[int, dict]:
    """OpenAPI `responses` for the error statuses an operation can answer (`protocol`: a /v2 route)."""
    model = ProtocolErrorBody if protocol else ErrorBody
    return {status: {"model": model, "description": STATUS_MEANINGS.get(status, STATUS_CODES.get(status, "error"))} for status in statuses}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code or STATUS_CODES.get(status, "error")
        self.headers = headers or {}


def error_payload(path: str, status: int, message: str, code: str | None = None) -> dict:
    if path == "/v2" or path.startswith("/v2/"):
        return {"error": message}
    return {"error": {"code": code or STATUS_CODES.get(status, "error"), "message": message}}


def error_response(request: Request, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(request.url.path, status, message, code), status_code=status, headers=headers)


def is_union_branch(part: object) -> bool:
    """A location step pydantic adds for a branch of a union (`literal['coarse','middle']`,
    `list[constrained-int]`): the client named the field, not the branch."""
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def describe_validation(error: RequestValidationError) -> str:
    """Each problem as `field: what is wrong`, in the client's terms: no union branches, no
    pydantic prefixes, and a missing or unparsable body said as such."""
    parts: list[str] = []
    for problem in error.errors()[:10]:
        location = problem.get("loc", [])
        message = str(problem.get("msg")).removeprefix("Value error, ")
        if problem.get("type") == "json_invalid":
            reason = (problem.get("ctx") or {}).get("error", message)
            parts.append(f"the body is not valid JSON ({reason} at character {location[-1] if location else 0})")
            continue
        steps = location[1:] if location and location[0] in ("body", "query", "path") else location  # the field, where it came from aside
        where = ".".join(str(p) for p in steps if not is_union_branch(p))
        if not where and problem.get("type") == "missing":
            message = "the request needs a JSON body"
        line = f"{where}: {message}" if where else message
        if line not in parts:
            parts.append(line)
    return "; ".join(parts) or "invalid request"


def parse_failure(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a body, where the client can act on it. Python's JSON parser
    refuses an integer past sys.get_int_max_str_digits() (4,300) digits with a ValueError that
    FastAPI answered as a bare "There was an error parsing the body"."""
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f" (a number in it has more than {sys.get_int_max_str_digits()} digits)"
    return ""


ROUTED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> str:
    """A 405's `Allow`: every method some route serves at the request's path, and HEAD wherever GET
    is (the intake answers HEAD as GET). The router names only the first route it found for the
    path: `PUT /v1/jobs/{id}` said `Allow: GET`, where DELETE is served too (a probe)."""
    routes = request.app.router.routes
    methods = {method for method in ROUTED_METHODS
               if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request, error.status, error.message, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, describe_validation(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI's "error parsing the body": an invalid body, like malformed JSON
            return error_response(request, 422, f"the body could not be parsed: {error.detail}{parse_failure(error.__cause__)}")
        headers = getattr(error, "headers", None)
        if error.status_code == 405:
            headers = (headers or {}) | {"Allow": allowed_methods(request)}
        return error_response(request, error.status_code, str(error.detail), headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
        return error_response(request, 500, f"internal error ({type(error).__name__}); the server's log has the details")


def first_repeated(keys: list[str]) -> str | None:
    """The first key that appears a second time, or None."""
    seen: set[str] = set()
    return next((key for key in keys if key in seen or seen.add(key)), None)


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's dict, refusing a key given twice: the standard parser keeps the last
    silently (`{"seed": 1, "seed": 2}` made seed 2), where a proxy or filter in front of the server
    may have read the first."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DuplicateKey(first_repeated([key for key, _ in pairs]))
    return obj
