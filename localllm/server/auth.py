"""Who may use the API: the API key dependency, and the Host names a loopback bind answers to.

A server on loopback without keys is reachable from any web page the user opens: a page can
POST without a CORS preflight (hence JSON-only bodies, checked where bodies are parsed) and a
DNS-rebinding page reads the answers under its own name. Checking `Host` against the names this
machine calls itself stops the second (Ollama's CVE-2024-28224 was this bug).
"""

from __future__ import annotations

import ipaddress
import secrets
import socket

from fastapi import Request

from localllm.errors import APIError
from localllm.server.state import AppState
from localllm.settings import Settings


def is_loopback(host: str) -> bool:
    """localhost, or an address on the loopback network (127.1 and ::1 included)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # the shorthand IPv4 forms getaddrinfo accepts too: 127.1, 2130706433
        return ipaddress.ip_address(socket.inet_aton(host)).is_loopback
    except OSError:
        return False  # a host name: it may resolve to anything


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The Host names a loopback bind answers to; None: any (a public bind needs API keys)."""
    if not is_loopback(settings.host):
        return None
    names = {"localhost", settings.host.strip("[]").lower()}
    names.update(name.strip("[]").lower() for name in settings.allowed_hosts)
    return frozenset(names)


def host_allowed(header: str, allowed: frozenset[str]) -> bool:
    if header.startswith("["):
        name = header[1 : header.find("]")] if "]" in header else header
    else:
        name = header.rsplit(":", 1)[0]
    name = name.lower().rstrip(".")
    if name in allowed:
        return True
    try:  # a literal loopback address is this machine under any spelling
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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
            headers={"WWW-Authenticate": 'Bearer realm="localllm"'},
        )
