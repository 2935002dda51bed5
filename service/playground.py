"""GET /: the playground, a static page (service/static/) that shows every model the server holds
with its sample grid and, for the one chosen, the tools its kind offers. It talks to the API only."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

STATIC = Path(__file__).with_name("static")  # playground.html, .css, .js; mounted at /static by the app
router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html")


@router.get("/favicon.ico")
async def favicon() -> Response:
    """No icon (204): browsers ask for one on every page, the API docs' too, and logged a 404."""
    return Response(status_code=204)
