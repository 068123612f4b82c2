"""The built-in chat page: ``GET /`` and its assets under ``/static/``.

Everything the page needs ships in the package (static/, vendored libraries included; see
static/vendor/README.md), so it works with no network. The page talks to the same /v1 API as
any client; the page itself and its assets are outside the API key's reach (the Guard protects
/v1/ and /tokenize*), so a browser can load it and then ask the user for the key.

Model output is untrusted: the page renders answers through a Markdown renderer that shows raw
HTML as text and a sanitizer, and the Content-Security-Policy below forbids inline and foreign
scripts and connections to other hosts, so even a sanitizer bug would not run injected code or
send a conversation elsewhere."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

_CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
_PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # an upgraded server's page is picked up on the next load
}


def add_web_ui(app: FastAPI) -> None:
    """Serve the chat page at ``/`` on ``app`` (any FastAPI app serving qwenrun's /v1 API)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)
