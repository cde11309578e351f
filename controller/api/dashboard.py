"""The dashboard: static files from the package (no CDN), at ``/``.

The page holds no data; it signs in with an API token and reads ``/api/v1`` like
any client, so the API's roles apply unchanged. A strict Content-Security-Policy
keeps the page to its own scripts and the controller's origin.
"""

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from controller.api.errors import ApiError

router = APIRouter(include_in_schema=False)

_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Response:
    if name not in _FILES:
        raise ApiError(404, "not_found", f"no dashboard file {name!r}")
    body = resources.files("controller.dashboard").joinpath(name).read_bytes()
    return Response(body, media_type=_FILES[name], headers=_HEADERS)


@router.get("/")
def index() -> Response:
    return _file("index.html")


@router.get("/dashboard/{name}")
def asset(name: str) -> Response:
    return _file(name)
