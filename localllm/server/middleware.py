"""The ASGI edge every request passes: body size limit, request metrics, warning header."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localllm.errors import APIError, BodyTooLargeError
from localllm.server.errors import error_response
from localllm.server.state import AppState

WARNING_HEADER = "X-LocalLLM-Warning"

_ENDPOINTS = {
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
}


def endpoint_label(path: str) -> str:
    return path if path in _ENDPOINTS else "other"  # bounded label values


class EdgeMiddleware:
    """Body size limit (Content-Length and counted bytes), request metrics, warning header."""

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

        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reply(scope, receive, send, BodyTooLargeError(limit), endpoint)
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
        except BodyTooLargeError as exc:
            if started[0]:
                raise
            await self._reply(scope, receive, send, exc, endpoint)
            return
        self.state.metrics.requests.labels(endpoint, str(status_holder[0])).inc()

    async def _reply(
        self, scope: Scope, receive: Receive, send: Send, exc: APIError, endpoint: str
    ) -> None:
        response = error_response(exc)
        response.headers["Connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)
        self.state.metrics.requests.labels(endpoint, str(exc.status)).inc()


def _header_text(state: AppState) -> bytes:
    # Header values must be latin-1; keep them ASCII and on one line.
    text = " | ".join(state.warnings).replace("\r", " ").replace("\n", " ")
    return text.encode("ascii", "replace")
