"""Exceptions to OpenAI error envelopes: `{"error": {"message", "type", "param", "code"}}`.

Mapped by exception class, never by message text. Every error the HTTP layer returns goes
through `error_response`, including FastAPI's own (404 route, 405, validation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from localllm.errors import (
    APIError,
    CancelledError,
    ContextLengthExceededError,
    DoesNotFitError,
    LocalLLMError,
    ModelCrashedError,
    ModelLoadError,
    ModelNotFoundError,
    QueueFullError,
    RequestError,
    RequestTimeoutError,
    RpcError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Mapping:
    status: int
    type: str
    code: str | None


# Most specific first: the first isinstance match wins.
_BY_CLASS: tuple[tuple[type[BaseException], _Mapping], ...] = (
    (ContextLengthExceededError, _Mapping(400, "invalid_request_error", "context_length_exceeded")),
    (QueueFullError, _Mapping(503, "server_error", "queue_full")),
    (CancelledError, _Mapping(503, "server_error", "cancelled")),
    (RequestTimeoutError, _Mapping(408, "server_error", "timeout")),
    (RequestError, _Mapping(400, "invalid_request_error", "invalid_request")),
    (ModelNotFoundError, _Mapping(404, "invalid_request_error", "model_not_found")),
    (ModelLoadError, _Mapping(503, "server_error", "model_not_loaded")),
    (RpcError, _Mapping(503, "server_error", "rpc_host_unavailable")),
    (ModelCrashedError, _Mapping(503, "server_error", "model_crashed")),
    (DoesNotFitError, _Mapping(503, "server_error", "does_not_fit")),
    (LocalLLMError, _Mapping(500, "server_error", "internal_error")),
)


def envelope(message: str, type_: str, code: str | None, param: str | None) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: BaseException) -> JSONResponse:
    """The envelope and status for any exception (unknown ones: 500, details only in the log)."""
    headers: dict[str, str] = {}
    if isinstance(exc, APIError):
        body = envelope(exc.message, exc.type, exc.code, exc.param)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)
    for cls, mapping in _BY_CLASS:
        if isinstance(exc, cls):
            param = exc.param if isinstance(exc, RequestError) else None
            if isinstance(exc, QueueFullError):
                headers["Retry-After"] = str(exc.retry_after_s)
            body = envelope(str(exc), mapping.type, mapping.code, param)
            return JSONResponse(body, status_code=mapping.status, headers=headers)
    log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
    body = envelope(
        "internal server error; see the server log", "server_error", "internal_error", None
    )
    return JSONResponse(body, status_code=500)


def validation_response(exc: ValidationError | RequestValidationError) -> JSONResponse:
    """Bad fields: 400 naming the first offending field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return JSONResponse(
        envelope(message, "invalid_request_error", "invalid_value", param), status_code=400
    )


def install_handlers(app: FastAPI) -> None:
    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        response = JSONResponse(
            envelope(str(exc.detail), type_, code, None), status_code=exc.status_code
        )
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return validation_response(exc)

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ValidationError, on_validation)
    app.add_exception_handler(APIError, on_error)
    app.add_exception_handler(LocalLLMError, on_error)
