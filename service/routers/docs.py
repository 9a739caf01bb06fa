"""``/docs`` (Swagger UI) and ``/redoc`` from assets in the installed package
(``fastapi-offline`` ships Swagger UI 5 and ReDoc), so they work without network; FastAPI's own
pages load them from a CDN and are blank offline."""
from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).parent / "static"
PREFIX = "/docs-assets"
NO_FAVICON = "data:,"  # no request to the internet for an icon

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui():
    return get_swagger_ui_html(openapi_url="/openapi.json", title="reconserve API",
                               swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js",
                               swagger_css_url=f"{PREFIX}/swagger-ui.css", swagger_favicon_url=NO_FAVICON)


@router.get("/redoc")
async def redoc():
    return get_redoc_html(openapi_url="/openapi.json", title="reconserve API",
                          redoc_js_url=f"{PREFIX}/redoc.standalone.js", redoc_favicon_url=NO_FAVICON,
                          with_google_fonts=False)


def assets() -> StaticFiles:
    return StaticFiles(directory=ASSETS)
