"""GET /: the playground, a static page (service/pages/, its files in service/static/) that shows every model the server holds
with its sample grid and, for the one chosen, the tools its kind offers. It talks to the API only."""
from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.staticfiles import NotModifiedResponse

STATIC = Path(__file__).with_name("static")  # the page's .css and .js; mounted at /static by the app
# the page itself, kept out of /static: served there too, its relative links (static/…) broke
PAGE = Path(__file__).with_name("pages") / "playground.html"
router = APIRouter(include_in_schema=False)
# the pages (the playground, the API docs) and their files: no other site may frame them (a probe's
# page framed /docs, and a click and a typed name in it unloaded a model: the request was the docs
# page's own, so no Origin or Host check could tell), and no browser may read a file as another type
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff"}


class PageFiles(StaticFiles):
    """Static files (the playground's, the API docs' scripts) answered with PAGE_HEADERS."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


# Starlette's rule for its static files (If-None-Match, else If-Modified-Since), for the file routes
VALIDATORS = StaticFiles(directory=None, check_dir=False)


def file_or_not_modified(path: Path, request: Request, media_type: str, headers: dict[str, str]) -> Response:
    """A file route's answer as /static's is: 304 where the request's `If-None-Match` or
    `If-Modified-Since` says the client holds this file (a `Range` beside them too, RFC 9110
    §13.2.2); `FileResponse` alone sent it whole every time, 200, or 206 for a range."""
    response = FileResponse(path, media_type=media_type, headers=headers, stat_result=os.stat(path))
    if VALIDATORS.is_not_modified(response.headers, request.headers):
        return NotModifiedResponse(response.headers)
    return response


@router.get("/")
async def playground(request: Request) -> Response:
    return file_or_not_modified(PAGE, request, "text/html", PAGE_HEADERS)


@router.get("/favicon.ico")
async def favicon() -> Response:
    """No icon (204): browsers ask for one on every page, the API docs' too, and logged a 404."""
    return Response(status_code=204)
