"""The API docs pages (/docs: Swagger UI, /redoc: ReDoc) served with their scripts from this
server. FastAPI's defaults load them from a CDN, so on a host without the internet (a cluster
behind a firewall, this project's CI) the pages were blank; `fastapi-offline` ships the same
bundles (Swagger UI 5, which renders OpenAPI 3.1, and ReDoc standalone), mounted at /docs-assets."""
from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

from service.playground import PAGE_HEADERS, PageFiles

ASSETS_PATH = "/docs-assets"
ASSETS = PageFiles(directory=str(files("fastapi_offline") / "static"))
OPENAPI_URL, TITLE = "/openapi.json", "ganserve"

router = APIRouter(include_in_schema=False)


# images from this server, data: and blob: URLs only: ReDoc's bundle fetched its logo from
# cdn.redoc.ly, telling a third party (by its Referer) the docs page's address on every visit
# (Swagger UI shows an image answer, such as a generated PNG, through a blob: URL)
DOCS_IMAGES = "img-src 'self' data: blob:"


def page(response: HTMLResponse) -> HTMLResponse:
    response.headers.update(PAGE_HEADERS)
    response.headers["Content-Security-Policy"] = f"{PAGE_HEADERS['Content-Security-Policy']}; {DOCS_IMAGES}"
    return response


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return page(get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{TITLE} – API", oauth2_redirect_url="/docs/oauth2-redirect",
                               swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
                               swagger_favicon_url=f"{ASSETS_PATH}/favicon.png"))


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return page(get_swagger_ui_oauth2_redirect_html())


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return page(get_redoc_html(openapi_url=OPENAPI_URL, title=f"{TITLE} – API", redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
                               redoc_favicon_url=f"{ASSETS_PATH}/favicon.png", with_google_fonts=False))
