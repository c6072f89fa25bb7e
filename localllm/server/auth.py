"""The API key check, a FastAPI dependency on every route but /health."""

from __future__ import annotations

import secrets

from fastapi import Request

from localllm.errors import APIError
from localllm.server.state import AppState


async def require_api_key(request: Request) -> None:
    """Bearer auth when keys are configured; each key compared in constant time."""
    state: AppState = request.app.state.localllm
    keys = state.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    supplied = token.strip().encode() if scheme.lower() == "bearer" else b""
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(supplied, key.encode())
    if not matched:
        raise APIError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
