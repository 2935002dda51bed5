"""GET /: the playground, a static page (service/pages/, its files in service/static/) that shows every model the server holds
with its sample grid and, for the one chosen, the tools its kind offers. It talks to the API only."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

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


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html", headers=PAGE_HEADERS)


@router.get("/favicon.ico")
async def favicon() -> Response:
    """No icon (204): browsers ask for one on every page, the API docs' too, and logged a 404."""
    return Response(status_code=204)
