"""Real image files made by hand for the vision tests (no Pillow needed)."""

from __future__ import annotations

import random
import struct
import zlib


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A real RGB PNG of random pixels (zlib and CRCs by hand)."""
    rng = random.Random(seed)
    rows = b"".join(
        b"\x00" + bytes(rng.randrange(256) for _ in range(width * 3)) for _ in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
