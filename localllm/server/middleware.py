"""The ASGI edge every request passes: Host check, body size limit, request metrics, warning
header, and the envelope for anything that escaped the handlers (a bug: 500, counted)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localllm.errors import APIError, BodyTooLargeError
from localllm.server.auth import host_allowed
from localllm.server.errors import error_response
from localllm.server.state import AppState

WARNING_HEADER = "X-LocalLLM-Warning"

_ENDPOINTS = {
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/v1/models",
    "/v1/models/{model}",
    "/v1/chat/completions",
    "/v1/completions",
    # Ollama's API
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/tags",
    "/api/show",
    "/api/ps",
    "/api/pull",
}


def endpoint_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return path if path in _ENDPOINTS else "other"  # bounded label values


class EdgeMiddleware:
    """Host check, body size limit (Content-Length and counted bytes), request metrics, warning
    header, 500 envelope."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.settings.max_body_bytes
        endpoint = endpoint_label(scope["path"])
        status_holder = [0]
        started = [False]

        refusal = self._refusal(scope["headers"], limit)
        if refusal is not None:
            await self._reply(scope, receive, send, refusal, endpoint)
            return

        received = [0]

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise BodyTooLargeError(limit)
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
                status_holder[0] = message["status"]
                if self.state.warnings and scope["path"].startswith("/v1/"):
                    headers = list(message.get("headers", []))
                    headers.append((WARNING_HEADER.lower().encode(), _header_text(self.state)))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, limited_receive, counting_send)
        except Exception as exc:
            if started[0]:
                self.state.metrics.requests.labels(endpoint, str(status_holder[0])).inc()
                raise
            await self._reply(scope, receive, send, exc, endpoint)
            return
        self.state.metrics.requests.labels(endpoint, str(status_holder[0])).inc()

    def _refusal(self, headers: list[tuple[bytes, bytes]], limit: int) -> APIError | None:
        """What to refuse before reading anything: a foreign Host, a declared oversized body."""
        host: str | None = None
        for name, value in headers:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"content-length":
                try:
                    if int(value) > limit:
                        return BodyTooLargeError(limit)
                except ValueError:
                    pass
        allowed = self.state.allowed_hosts
        if allowed is not None and host is not None and not host_allowed(host, allowed):
            return APIError(
                403,
                f"this server listens on loopback and does not answer to Host {host[:100]!r} "
                "(a DNS-rebinding page would send that); add the name to allowed_hosts if it "
                "is yours",
                code="host_not_allowed",
            )
        return None

    async def _reply(
        self, scope: Scope, receive: Receive, send: Send, exc: Exception, endpoint: str
    ) -> None:
        response = error_response(exc)
        response.headers["Connection"] = "close"  # the rest of the body may be unread
        await response(scope, receive, send)
        self.state.metrics.requests.labels(endpoint, str(response.status_code)).inc()


def _header_text(state: AppState) -> bytes:
    # Header values must be latin-1; keep them ASCII and on one line.
    text = " | ".join(state.warnings).replace("\r", " ").replace("\n", " ")
    return text.encode("ascii", "replace")
