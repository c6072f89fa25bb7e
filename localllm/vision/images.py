"""Images in requests: checked from their bytes before anything decodes them.

    parse_data_url(url, param) -> (mime, bytes)        `data:image/png;base64,...`
    check_image(data, mime, limits, param) -> Image    magic bytes, byte and pixel bounds

The pixel count comes from the header (PNG IHDR, JPEG SOF, WebP VP8/VP8L/VP8X), read by hand: a
decompression bomb (a small file declaring 100000 x 100000 pixels) is refused before stb_image
(inside llama.cpp's mtmd) allocates for it. A file whose header cannot be read, or that ends
before its image data starts, is refused too; the decoder still checks the rest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

from localllm.errors import RequestError

# mtmd's default media marker (`mtmd_default_marker()`): where an image goes in a prompt's text.
MEDIA_MARKER = "<__media__>"

MIME_TYPES = ("image/png", "image/jpeg", "image/webp")
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}
_DATA_URL = re.compile(r"data:([\w.+/-]*)((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.ASCII)
_B64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20_000_000
    max_pixels: int = 50_000_000


@dataclass(frozen=True)
class Image:
    """A checked image: its bytes, type, size from the header, and its identity (sha256)."""

    data: bytes
    mime: str
    width: int
    height: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def decode_base64(text: str, param: str, max_bytes: int) -> bytes:
    """Strict base64 (whitespace allowed), refused before decoding when it cannot fit."""
    raw = re.sub(r"\s+", "", text).encode("ascii", "replace")
    if len(raw) // 4 * 3 > max_bytes + 2:
        raise RequestError(
            f"the image is about {len(raw) // 4 * 3} bytes, more than this server's "
            f"max_image_bytes of {max_bytes}; send a smaller image",
            param=param,
        )
    if not raw or len(raw) % 4 or not _B64.fullmatch(raw):
        raise RequestError("the image is not valid base64", param=param)
    try:
        return base64.b64decode(raw, validate=True)
    except binascii.Error:
        raise RequestError("the image is not valid base64", param=param) from None


def parse_data_url(url: str, param: str, max_bytes: int) -> tuple[str, bytes]:
    """(declared MIME type, bytes) of a base64 `data:` URL."""
    match = _DATA_URL.match(url)
    if match is None or not match.group(3):
        raise RequestError(
            "an image URL must be a base64 data URL (data:image/png;base64,...) or, where this "
            "server allows it, an http(s) URL",
            param=param,
        )
    mime = match.group(1).lower()
    return _ALIASES.get(mime, mime), decode_base64(url[match.end() :], param, max_bytes)


def sniff(data: bytes) -> str | None:
    """The image type the magic bytes say, among the ones served."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_image(data: bytes, mime: str | None, limits: ImageLimits, param: str) -> Image:
    """The image, if it is a PNG, JPEG or WebP (as declared, when `mime` is given) within the
    byte and pixel bounds; else RequestError saying which."""
    if len(data) > limits.max_bytes:
        raise RequestError(
            f"the image is {len(data)} bytes, more than this server's max_image_bytes of "
            f"{limits.max_bytes}; send a smaller image",
            param=param,
        )
    found = sniff(data)
    if found is None:
        raise RequestError(
            "the image is not a PNG, JPEG or WebP file (its first bytes are none of theirs)",
            param=param,
        )
    mime = _ALIASES.get(mime, mime) if mime is not None else None
    if mime is not None and mime not in ("", "application/octet-stream") and mime != found:
        raise RequestError(
            f"the image is declared {mime} but its bytes are {found}; send the right type",
            param=param,
        )
    try:
        width, height = _size(data, found)
    except (struct.error, IndexError, ValueError):
        raise RequestError(
            f"the {found} image is truncated or damaged: its header cannot be read",
            param=param,
        ) from None
    if width < 1 or height < 1:
        raise RequestError(f"the {found} image declares {width}x{height} pixels", param=param)
    if width * height > limits.max_pixels:
        raise RequestError(
            f"the image is {width}x{height} pixels ({width * height}), more than this server's "
            f"max_image_pixels of {limits.max_pixels}; scale it down",
            param=param,
        )
    return Image(data, found, width, height)


def _size(data: bytes, mime: str) -> tuple[int, int]:
    if mime == "image/png":
        return _png_size(data)
    if mime == "image/jpeg":
        return _jpeg_size(data)
    return _webp_size(data)


def _png_size(data: bytes) -> tuple[int, int]:
    # signature, then the IHDR chunk: length 13, "IHDR", width, height, ...
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise ValueError("no IHDR")
    width, height = struct.unpack(">II", data[16:24])
    if len(data) < 8 + 25 + 12:  # IHDR with its CRC, and at least one more chunk header
        raise ValueError("truncated")
    return int(width), int(height)


# Start-of-frame markers (baseline, extended, progressive, lossless, ...): not DHT/JPG/DAC.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    while True:
        while data[i] != 0xFF:  # tolerate fill bytes between segments
            i += 1
        while data[i] == 0xFF:
            i += 1
        marker = data[i]
        i += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue  # no length
        if marker in (0xD9, 0xDA):
            raise ValueError("no frame header before the scan")
        (length,) = struct.unpack(">H", data[i : i + 2])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            if len(data) < i + length:
                raise ValueError("truncated")
            return int(width), int(height)
        if length < 2:
            raise ValueError("bad segment length")
        i += length


def _webp_size(data: bytes) -> tuple[int, int]:
    kind = data[12:16]
    if kind == b"VP8 ":
        # frame tag (3 bytes), start code 9d 01 2a, then 14-bit width and height
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("no VP8 start code")
        width, height = struct.unpack("<HH", data[26:30])
        return int(width) & 0x3FFF, int(height) & 0x3FFF
    if kind == b"VP8L":
        if data[20] != 0x2F:
            raise ValueError("no VP8L signature")
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        w = data[24] | data[25] << 8 | data[26] << 16
        h = data[27] | data[28] << 8 | data[29] << 16
        if len(data) < 30:
            raise ValueError("truncated")
        return w + 1, h + 1
    raise ValueError("unknown WebP chunk")
