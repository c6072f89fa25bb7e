"""Images in chat requests: OpenAI `image_url` content parts (and Ollama's `images`, turned into
such parts) read, fetched where allowed, and checked before the engine decodes anything.

- `data:` URLs (base64 PNG, JPEG or WebP) are always taken;
- `http(s)` URLs are refused unless their host is in the `image_url_hosts` setting: a server that
  fetches any URL a client names can be made to reach what only it can reach (SSRF: the cloud
  metadata address, services on loopback). Allowed fetches take no redirects, stop at
  `max_image_bytes` and time out;
- every image is then checked by `localllm.vision.images.check_image` (magic bytes against the
  declared type, bytes, pixels read from the header).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from localllm.errors import RequestError
from localllm.server import types as t
from localllm.vision.images import (
    MEDIA_MARKER,
    ImageLimits,
    check_image,
    parse_data_url,
)

FETCH_TIMEOUT_S = 10.0
_DETAILS = ("auto",)


def limits_of(settings: Any) -> ImageLimits:
    return ImageLimits(settings.max_image_bytes, settings.max_image_pixels)


def image_parts(messages: list[t.ChatMessage]) -> list[tuple[str, dict[str, Any]]]:
    """(param, image_url object) of every image part, in prompt order; shapes checked."""
    found: list[tuple[str, dict[str, Any]]] = []
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if isinstance(text, str) and MEDIA_MARKER in text:
                    raise RequestError(
                        f"the text holds {MEDIA_MARKER}, which marks where an image goes; "
                        "remove it",
                        param=param,
                    )
                continue
            if kind != "image_url":
                raise RequestError(
                    f"content part type {kind!r} is not supported: send 'text' or 'image_url' "
                    "parts",
                    param=param,
                )
            if message.role != "user":
                raise RequestError(
                    f"an image in a {message.role} message: only user messages carry images",
                    param=param,
                )
            image_url = part.get("image_url")
            if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
                raise RequestError(
                    'an image part is {"type": "image_url", "image_url": {"url": "data:..."}}',
                    param=param,
                )
            detail = image_url.get("detail")
            if detail is not None and detail not in _DETAILS:
                raise RequestError(
                    f"detail {detail!r} is not supported: this model's projector sees every "
                    "image at its own fixed resolution; send detail 'auto' or leave it out",
                    param=param + ".image_url.detail",
                )
            unknown = set(image_url) - {"url", "detail"}
            if unknown:
                raise RequestError(
                    f"image_url has unknown fields {sorted(unknown)}",
                    param=param + ".image_url",
                )
            found.append((param + ".image_url.url", image_url))
    return found


async def load_images(messages: list[t.ChatMessage], settings: Any) -> tuple[bytes, ...]:
    """The request's images, in prompt order, each checked; RequestError (a 400) names which
    one and why."""
    limits = limits_of(settings)
    images: list[bytes] = []
    for param, image_url in image_parts(messages):
        url: str = image_url["url"]
        mime: str | None
        if url.startswith("data:"):
            mime, data = parse_data_url(url, param, limits.max_bytes)
        elif url.startswith(("http://", "https://")):
            mime, data = await fetch_image(url, param, settings)
        else:
            raise RequestError(
                "an image URL must be a base64 data URL (data:image/png;base64,...) or, where "
                "this server allows it, an http(s) URL",
                param=param,
            )
        images.append(check_image(data, mime, limits, param).data)
    return tuple(images)


async def fetch_image(url: str, param: str, settings: Any) -> tuple[str | None, bytes]:
    """(Content-Type, bytes) of an image URL whose host is allowed."""
    host = (urlsplit(url).hostname or "").lower()
    allowed = {h.lower() for h in settings.image_url_hosts}
    if host not in allowed:
        hint = (
            "this server fetches no image URLs (image_url_hosts is empty)"
            if not allowed
            else f"{host or 'that host'} is not in this server's image_url_hosts"
        )
        raise RequestError(
            f"{hint}: a server that fetches URLs for its clients can be led to internal "
            "addresses (SSRF); send the image inline as a base64 data URL instead",
            param=param,
        )
    max_bytes = int(settings.max_image_bytes)
    try:
        async with (
            httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise RequestError(
                    f"fetching the image answered HTTP {response.status_code} (redirects are "
                    "not followed); send the image inline as a data URL",
                    param=param,
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise _too_big(int(declared), max_bytes, param)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_big(size, max_bytes, param)
                chunks.append(chunk)
            mime = response.headers.get("content-type", "").split(";")[0].strip().lower()
    except httpx.HTTPError as exc:
        raise RequestError(
            f"the image could not be fetched ({type(exc).__name__}: {exc}); send it inline as "
            "a data URL",
            param=param,
        ) from None
    return mime or None, b"".join(chunks)


def _too_big(size: int, max_bytes: int, param: str) -> RequestError:
    return RequestError(
        f"the image is over {size} bytes, more than this server's max_image_bytes of "
        f"{max_bytes}; send a smaller image",
        param=param,
    )
