"""The OpenAI-compatible HTTP API over the engine: `create_app(settings, engine)`.

All state lives on `app.state.localllm` (an `AppState`); nothing is module-global, so tests can
run several apps in one process. The event loop never waits on llama.cpp: the engine's scheduler
thread wakes request coroutines through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localllm.engine.grammar import json_object_grammar, json_schema_grammar
from localllm.engine.handle import RequestHandle
from localllm.engine.types import (
    EngineStats,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TextEvent,
    TokenLogprob,
)
from localllm.errors import LocalLLMError, ModelNotFoundError
from localllm.server import types as t
from localllm.server.errors import APIError, BodyTooLargeError, error_response, install_handlers
from localllm.server.metrics import CONTENT_TYPE, Metrics
from localllm.settings import Settings

log = logging.getLogger(__name__)

WARNING_HEADER = "X-LocalLLM-Warning"
_Body = TypeVar("_Body", bound=BaseModel)


class ServingEngine(Protocol):
    """What the HTTP layer uses of `localllm.engine.Engine` (tests pass a fake)."""

    @property
    def n_ctx_slot(self) -> int: ...

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]: ...
    def detokenize(self, tokens: list[int]) -> str: ...
    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str: ...
    def submit(self, request: GenerationRequest) -> RequestHandle: ...
    def stats(self) -> EngineStats: ...
    def close(self) -> None: ...


@dataclass
class AppState:
    settings: Settings
    model_id: str
    model_names: set[str]
    plan_summary: dict[str, Any]
    warnings: list[str]
    metrics: Metrics
    api_keys: list[str]
    engine: ServingEngine | None = None
    own_engine: bool = False  # close it on shutdown (it was loaded by this app)
    load_error: str | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    created: int = field(default_factory=lambda: int(time.time()))

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None


def create_app(
    settings: Settings,
    engine: ServingEngine | None = None,
    *,
    engine_factory: Callable[[], ServingEngine] | None = None,
    model_id: str = "model",
    model_names: set[str] | frozenset[str] = frozenset(),
    plan_summary: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> FastAPI:
    """An app over a loaded engine, or one that loads it in the background (engine_factory).

    While loading, /health answers 503 and the API 503 with Retry-After. An engine passed in is
    the caller's to close; one built by engine_factory is closed when the app shuts down.
    """
    if (engine is None) == (engine_factory is None):
        raise ValueError("give exactly one of engine and engine_factory")
    state_holder: list[AppState] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = state_holder[0]
        loader: asyncio.Task[None] | None = None
        if engine_factory is not None:
            loader = asyncio.create_task(_load(state, engine_factory))
        else:
            state.loaded.set()
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                # Loading runs in a thread that cannot be interrupted; let it finish, then close.
                with contextlib.suppress(Exception):
                    await loader
            if state.own_engine and state.engine is not None:
                engine_to_close, state.engine = state.engine, None
                await asyncio.to_thread(engine_to_close.close)

    app = FastAPI(title="localllm", lifespan=lifespan, docs_url=None, redoc_url=None)
    state = AppState(
        settings=settings,
        model_id=model_id,
        model_names={model_id, *model_names},
        plan_summary=dict(plan_summary or {}),
        warnings=list(warnings or []),
        metrics=Metrics(lambda: state_holder[0].stats()),
        api_keys=settings.all_api_keys(),
        engine=engine,
    )
    state_holder.append(state)
    app.state.localllm = state
    install_handlers(app)
    _add_routes(app)
    # Order: the edge middleware (body limit, metrics, warning header) runs inside CORS, so
    # CORS headers are added to its error responses too.
    app.add_middleware(_EdgeMiddleware, state=state)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


async def _load(state: AppState, factory: Callable[[], ServingEngine]) -> None:
    try:
        state.engine = await asyncio.to_thread(factory)
        state.own_engine = True
    except Exception as exc:  # reported by /health and by serve(), which exits non-zero
        log.error("model load failed: %s", exc)
        state.load_error = str(exc)
    finally:
        state.loaded.set()


# ------------------------------------------------------------------------------------ middleware


class _EdgeMiddleware:
    """Body size limit (Content-Length and counted bytes), request metrics, warning header."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.settings.max_body_bytes
        endpoint = _endpoint_label(scope["path"])
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


_ENDPOINTS = {
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
}


def _endpoint_label(path: str) -> str:
    return path if path in _ENDPOINTS else "other"  # bounded label values


def _header_text(state: AppState) -> bytes:
    # Header values must be latin-1; keep them ASCII and on one line.
    text = " | ".join(state.warnings).replace("\r", " ").replace("\n", " ")
    return text.encode("ascii", "replace")


# ------------------------------------------------------------------------------------ helpers


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.localllm
    return state


async def require_api_key(request: Request) -> None:
    """Bearer auth when keys are configured; each key compared in constant time."""
    keys = _state(request).api_keys
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


def _engine(state: AppState) -> ServingEngine:
    if state.engine is not None:
        return state.engine
    if state.load_error is not None:
        raise APIError(
            503,
            f"the model failed to load: {state.load_error}",
            type_="server_error",
            code="model_not_loaded",
        )
    raise APIError(
        503,
        "the model is still loading; retry shortly",
        type_="server_error",
        code="model_loading",
        retry_after_s=2,
    )


async def _parse(request: Request, model: type[_Body]) -> _Body:
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return model.model_validate(data)  # ValidationError -> 400 by the handler


def _check_model(state: AppState, name: str | None) -> None:
    if name and name not in state.model_names:
        raise ModelNotFoundError(
            f"model {name!r} is not served here; this server serves {state.model_id!r} "
            "(GET /v1/models)"
        )


def _sampling(
    state: AppState, body: t._Sampling, response_format: t.ResponseFormat | None
) -> SamplingParams:
    defaults = SamplingParams()
    grammar = None
    if response_format is not None and response_format.type == "json_object":
        grammar = json_object_grammar()
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise APIError(
                400,
                "response_format.json_schema is required for type json_schema",
                param="response_format",
                code="invalid_value",
            )
        grammar = json_schema_grammar(response_format.json_schema.schema_)
    return SamplingParams(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        min_p=defaults.min_p if body.min_p is None else body.min_p,
        repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        grammar=grammar,
    )


def _max_tokens(state: AppState, value: int | None, param: str) -> int | None:
    limit = state.settings.max_tokens_limit
    if value is not None and value > limit:
        raise APIError(
            400,
            f"{param} {value} is above this server's limit of {limit} (max_tokens_limit)",
            param=param,
            code="invalid_value",
        )
    return value


def _check_n(body: t._Sampling) -> None:
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")


def _usage(finish: FinishEvent) -> t.UsageBody:
    usage = finish.usage
    return t.UsageBody(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=t.PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def _extra(state: AppState) -> dict[str, Any] | None:
    return {"warnings": state.warnings} if state.warnings else None


def _chat_logprobs(items: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> t.ChatLogprobs:
    return t.ChatLogprobs(
        content=[
            t.TokenLogprobBody(
                token=item.token,
                logprob=item.logprob,
                bytes=list(item.token_bytes),
                top_logprobs=[
                    t.TopLogprobBody(
                        token=top.token, logprob=top.logprob, bytes=list(top.token_bytes)
                    )
                    for top in item.top
                ],
            )
            for item in items
        ]
    )


def _completion_logprobs(
    items: tuple[TokenLogprob, ...] | list[TokenLogprob], offset: int
) -> t.CompletionLogprobs:
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return t.CompletionLogprobs(
        tokens=[item.token for item in items],
        token_logprobs=[item.logprob for item in items],
        top_logprobs=[{top.token: top.logprob for top in item.top} for item in items],
        text_offset=offsets,
    )


async def _watch_disconnect(request: Request, handle: RequestHandle) -> None:
    """Cancel the request when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def _collect(
    request: Request, handle: RequestHandle
) -> tuple[str, list[TokenLogprob], FinishEvent]:
    watcher = asyncio.create_task(_watch_disconnect(request, handle))
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    try:
        async for event in handle:
            if isinstance(event, TextEvent):
                parts.append(event.text)
                logprobs.extend(event.logprobs)
            else:
                return "".join(parts), logprobs, event
    finally:
        watcher.cancel()
        if not handle.finished:
            handle.cancel()
    raise LocalLLMError("the request ended without finishing")


def _sse(data: BaseModel | dict[str, Any]) -> str:
    payload = (
        data.model_dump_json(exclude_none=True) if isinstance(data, BaseModel) else json.dumps(data)
    )
    return f"data: {payload}\n\n"


def _stream(
    state: AppState,
    handle: RequestHandle,
    chunks: Callable[[TextEvent | FinishEvent], list[BaseModel]],
    opening: list[BaseModel],
    usage_chunk: Callable[[FinishEvent], BaseModel] | None,
) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            for chunk in opening:
                yield _sse(chunk)
            async for event in handle:
                for chunk in chunks(event):
                    yield _sse(chunk)
                if isinstance(event, FinishEvent):
                    state.metrics.ttft.observe(event.time_to_first_token_s)
                    if usage_chunk is not None:
                        yield _sse(usage_chunk(event))
        except LocalLLMError as exc:
            # The status line is gone already; report in-band like OpenAI does.
            payload = json.loads(bytes(error_response(exc).body))
            yield _sse(payload)
        finally:
            if not handle.finished:
                handle.cancel()  # client disconnected: Starlette cancelled this generator
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ------------------------------------------------------------------------------------ routes


def _add_routes(app: FastAPI) -> None:
    auth = [Depends(require_api_key)]

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        state = _state(request)
        if state.engine is None:
            status = "error" if state.load_error else "loading"
            body: dict[str, Any] = {"status": status}
            if state.load_error:
                body["error"] = state.load_error
            return JSONResponse(body, status_code=503)
        stats = state.engine.stats()
        return JSONResponse(
            {
                "status": "ok",
                "model": state.model_id,
                "slots_idle": stats.n_slots - stats.busy_slots,
                "slots_processing": stats.busy_slots,
                "queue_length": stats.queue_length,
                "plan": state.plan_summary,
                "warnings": state.warnings,
            }
        )

    @app.get("/metrics", dependencies=auth)
    async def metrics(request: Request) -> Response:
        return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models(request: Request) -> JSONResponse:
        state = _state(request)
        extra: dict[str, Any] = {
            "loaded": state.engine is not None,
            "plan": state.plan_summary,
            "warnings": state.warnings,
        }
        if state.engine is not None:
            extra["n_ctx_slot"] = state.engine.n_ctx_slot
        card = t.ModelCard(id=state.model_id, created=state.created, localllm=extra)
        return JSONResponse(t.ModelList(data=[card]).model_dump())

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> JSONResponse:
        body = await _parse(request, t.TokenizeRequest)
        engine = _engine(_state(request))
        tokens = engine.tokenize(body.content, body.add_special, body.parse_special)
        return JSONResponse({"tokens": tokens})

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> JSONResponse:
        body = await _parse(request, t.DetokenizeRequest)
        engine = _engine(_state(request))
        return JSONResponse({"content": engine.detokenize(body.tokens)})

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat_completions(request: Request) -> Response:
        state = _state(request)
        body = await _parse(request, t.ChatCompletionRequest)
        _check_model(state, body.model)
        _check_n(body)
        engine = _engine(state)
        max_tokens = _max_tokens(
            state,
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens,
            "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
        )
        try:
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages
            ]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        prompt = engine.apply_chat_template(messages)
        top = body.top_logprobs or 0
        handle = engine.submit(
            GenerationRequest(
                prompt=prompt,
                max_tokens=max_tokens,
                stop=body.stop_list(),
                sampling=_sampling(state, body, body.response_format),
                logprobs=top if body.logprobs else None,
                add_special=False,  # the template wrote BOS where the model wants it
                parse_special=True,
            )
        )
        completion_id = f"chatcmpl-{handle.id}"
        created = int(time.time())
        model = state.model_id
        extra = _extra(state)

        if not body.stream:
            text, logprobs, finish = await _collect(request, handle)
            state.metrics.ttft.observe(finish.time_to_first_token_s)
            result = t.ChatCompletion(
                id=completion_id,
                created=created,
                model=model,
                choices=[
                    t.ChatChoice(
                        message=t.AssistantMessage(content=text),
                        finish_reason=finish.finish_reason,
                        logprobs=_chat_logprobs(logprobs) if body.logprobs else None,
                    )
                ],
                usage=_usage(finish),
                localllm=extra,
            )
            return JSONResponse(result.model_dump(exclude_none=True))

        def chunk(
            choice: t.ChatChunkChoice, usage: t.UsageBody | None = None
        ) -> t.ChatCompletionChunk:
            return t.ChatCompletionChunk(
                id=completion_id, created=created, model=model, choices=[choice], usage=usage
            )

        def chunks(event: TextEvent | FinishEvent) -> list[BaseModel]:
            if isinstance(event, TextEvent):
                return [
                    chunk(
                        t.ChatChunkChoice(
                            delta=t.Delta(content=event.text),
                            logprobs=_chat_logprobs(event.logprobs) if body.logprobs else None,
                        )
                    )
                ]
            return [
                chunk(
                    t.ChatChunkChoice(delta=t.Delta(), finish_reason=event.finish_reason),
                    usage=_usage(event),
                )
            ]

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        opening = t.ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model,
            choices=[t.ChatChunkChoice(delta=t.Delta(role="assistant", content=""))],
            localllm=extra,
        )
        return _stream(
            state,
            handle,
            chunks,
            [opening],
            (
                lambda finish: t.ChatCompletionChunk(
                    id=completion_id, created=created, model=model, choices=[], usage=_usage(finish)
                )
            )
            if include_usage
            else None,
        )

    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(request: Request) -> Response:
        state = _state(request)
        body = await _parse(request, t.CompletionRequest)
        _check_model(state, body.model)
        _check_n(body)
        engine = _engine(state)
        max_tokens = _max_tokens(state, body.max_tokens, "max_tokens")
        prompt: str | tuple[int, ...]
        if isinstance(body.prompt, str):
            prompt = body.prompt
        elif body.prompt and all(isinstance(p, int) for p in body.prompt):
            prompt = tuple(int(p) for p in body.prompt)
        elif len(body.prompt) == 1 and isinstance(body.prompt[0], str):
            prompt = body.prompt[0]
        else:
            raise APIError(
                400,
                "prompt must be a string, a list of one string, or a list of token ids",
                param="prompt",
                code="invalid_value",
            )
        handle = engine.submit(
            GenerationRequest(
                prompt=prompt,
                max_tokens=max_tokens,
                stop=body.stop_list(),
                sampling=_sampling(state, body, body.response_format),
                logprobs=body.logprobs,
            )
        )
        completion_id = f"cmpl-{handle.id}"
        created = int(time.time())
        model = state.model_id
        extra = _extra(state)
        echo = body.echo and isinstance(prompt, str)
        prefix = prompt if echo and isinstance(prompt, str) else ""

        if not body.stream:
            text, logprobs, finish = await _collect(request, handle)
            state.metrics.ttft.observe(finish.time_to_first_token_s)
            result = t.TextCompletion(
                id=completion_id,
                created=created,
                model=model,
                choices=[
                    t.CompletionChoice(
                        text=prefix + text,
                        finish_reason=finish.finish_reason,
                        logprobs=_completion_logprobs(logprobs, len(prefix))
                        if body.logprobs is not None
                        else None,
                    )
                ],
                usage=_usage(finish),
                localllm=extra,
            )
            return JSONResponse(result.model_dump(exclude_none=True))

        offset = [len(prefix)]

        def chunks(event: TextEvent | FinishEvent) -> list[BaseModel]:
            if isinstance(event, TextEvent):
                choice = t.CompletionChoice(
                    text=event.text,
                    logprobs=_completion_logprobs(event.logprobs, offset[0])
                    if body.logprobs is not None
                    else None,
                )
                offset[0] += len(event.text)
                return [
                    t.TextCompletion(
                        id=completion_id, created=created, model=model, choices=[choice]
                    )
                ]
            return [
                t.TextCompletion(
                    id=completion_id,
                    created=created,
                    model=model,
                    choices=[t.CompletionChoice(text="", finish_reason=event.finish_reason)],
                    usage=_usage(event),
                )
            ]

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        opening: list[BaseModel] = []
        if prefix or extra:
            opening.append(
                t.TextCompletion(
                    id=completion_id,
                    created=created,
                    model=model,
                    choices=[t.CompletionChoice(text=prefix)],
                    localllm=extra,
                )
            )
        return _stream(
            state,
            handle,
            chunks,
            opening,
            (
                lambda finish: t.TextCompletion(
                    id=completion_id, created=created, model=model, choices=[], usage=_usage(finish)
                )
            )
            if include_usage
            else None,
        )
