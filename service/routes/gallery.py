"""A model's sample grid: the `samples.png` its exporter wrote beside the weights, for the
playground's gallery (and anyone else who wants a look before calling the model)."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.errors import ApiError, error_responses
from service.pipeline import KnownQueryRoute, registry_of
from service.playground import file_or_not_modified
from service.schemas import VersionText

router = APIRouter(prefix="/v1", tags=["v1"], route_class=KnownQueryRoute)  # (422 for a query parameter it does not take, as every v1 route)


@router.get("/models/{name}/samples.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the entry's sample grid"},
                       206: {"content": {"image/png": {}}, "description": "the part a `Range` asked for"},
                       304: {"description": "the client holds this file (`If-None-Match`, `If-Modified-Since`)"},
                       **error_responses(404, 412, 416, 422)})
async def samples(name: str, request: Request, version: Annotated[VersionText | None, Query()] = None) -> Response:
    """The sample grid exported with the model (latest ready version, else the latest, or
    `version`): a file on disk, so it is served while the model still loads, or if it failed."""
    entry = registry_of(request).resolve(name, version).entry
    path = entry.path / "samples.png"
    if not path.is_file():
        raise ApiError(404, f"{entry.label} has no samples.png")
    return file_or_not_modified(path, request, "image/png", {"X-Model-Version": str(entry.version)})
