"""GET / and the page's files: the chat page for browsers, Ollama's answer for everyone else.

`GET /` (and HEAD) answers the page when the request accepts `text/html` (every browser's
navigation does) and otherwise `200 text/plain "Ollama is running"`, the text Ollama's own server
sends, which Ollama clients fetch to see that a server is up. The page and its files need no API
key (they hold no data); everything the page does goes through the same API and auth as any
client. Every answer here carries a strict Content-Security-Policy: only this origin's scripts,
styles and connections, nothing inline, no frames.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import PlainTextResponse, Response

router = APIRouter()

OLLAMA_RUNNING = "Ollama is running"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate on each load, so a new version of localllm never runs an old script.
    "Cache-Control": "no-cache",
}

# The only files served: name -> media type (no path from the request reaches the filesystem).
FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}


def wants_html(request: Request) -> bool:
    """A browser navigating here: its Accept names text/html (Ollama clients send */* or none)."""
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip() == "text/html" for part in accept.split(","))


def _file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def index(request: Request) -> Response:
    if wants_html(request):
        return Response(
            _file("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS
        )
    return PlainTextResponse(OLLAMA_RUNNING, headers=SECURITY_HEADERS)


@router.api_route("/page/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def page_file(name: str) -> Response:
    media_type = FILES.get(name)
    if media_type is None:
        raise HTTPException(404, f"no page file {name[:100]!r}")
    return Response(_file(name), media_type=media_type, headers=SECURITY_HEADERS)
