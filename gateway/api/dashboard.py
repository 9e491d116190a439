"""The dashboard at `/` and the static files it and the docs UI load, from the package itself.

The pages are plain HTML, CSS and ES modules under `gateway/api/static/` (no build step, nothing
fetched from elsewhere); they call the REST API like any client, with the key a person enters.
The files hold no data, so they are served without a key (see auth.PUBLIC_PATHS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from litestar import Router, get
from litestar.datastructures import CacheControlHeader
from litestar.response import File
from litestar.static_files import create_static_files_router

STATIC_DIR: Final = Path(__file__).with_name("static")
STATIC_PATH: Final = "/static"
# The dashboard runs only its own scripts and talks only to this gateway; outputs are shown
# from blob URLs (they are fetched with the key, which an <img src> cannot send).
_PAGE_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)
# Pages change with the gateway's version: a browser asks again rather than run stale scripts.
_REVALIDATE: Final = CacheControlHeader(no_cache=True)


@get("/", include_in_schema=False, cache_control=_REVALIDATE)
async def dashboard_page() -> File:
    """The dashboard's page; everything else it shows comes from the API."""
    return File(
        STATIC_DIR / "index.html",
        content_disposition_type="inline",
        media_type="text/html",
        headers={
            "Content-Security-Policy": _PAGE_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def static_files() -> Router:
    """The dashboard's scripts and styles, and the packaged Swagger UI, under /static."""
    return create_static_files_router(
        path=STATIC_PATH,
        directories=[STATIC_DIR],
        cache_control=_REVALIDATE,
        include_in_schema=False,
    )
