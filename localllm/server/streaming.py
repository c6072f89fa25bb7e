"""A running request to an HTTP response, once for every endpoint: collected into one JSON body,
or streamed as server-sent events ending with `data: [DONE]`.

Each endpoint family says how its bodies look through a `Shaper`; this module owns waiting,
cancellation on disconnect, the time-to-first-token metric and in-band stream errors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from localllm.engine.handle import RequestHandle
from localllm.engine.types import FinishEvent, TextEvent, TokenLogprob
from localllm.errors import LocalLLMError
from localllm.server import types as t
from localllm.server.errors import error_response
from localllm.server.state import AppState


class Shaper(Protocol):
    """The response bodies of one endpoint family for one request."""

    model: str  # the model answering (the `model` label of its metrics)

    def opening(self) -> list[BaseModel]:
        """Stream events sent before the first token (a role delta, an echoed prompt)."""
        ...

    def text_chunk(self, event: TextEvent) -> BaseModel | None:
        """The event's chunk; None when the text is held back (a tool call may be opening)."""
        ...

    def finish_chunk(self, finish: FinishEvent) -> BaseModel: ...
    def usage_chunk(self, finish: FinishEvent) -> BaseModel: ...

    def complete(self, text: str, logprobs: list[TokenLogprob], finish: FinishEvent) -> BaseModel:
        """The whole non-streamed response."""
        ...


def usage_body(finish: FinishEvent) -> t.UsageBody:
    usage = finish.usage
    return t.UsageBody(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=t.PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


@dataclass
class ShaperBase:
    """What every family's shaper knows of its request; `chunk_type` is its stream event."""

    chunk_type: ClassVar[type[BaseModel]]
    id: str
    created: int
    model: str
    extra: dict[str, Any] | None  # the `localllm` field
    logprobs: bool

    def chunk(self, choices: list[Any], usage: t.UsageBody | None = None, **more: Any) -> BaseModel:
        return self.chunk_type(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage, **more
        )

    def usage_chunk(self, finish: FinishEvent) -> BaseModel:
        return self.chunk([], usage=usage_body(finish))


async def respond(
    request: Request,
    state: AppState,
    handle: RequestHandle,
    shaper: Shaper,
    *,
    stream: bool,
    include_usage: bool = False,
) -> Response:
    if stream:
        return StreamingResponse(
            _events(state, handle, shaper, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text, logprobs, finish = await collect(request, handle)
    state.metrics.ttft.labels(shaper.model).observe(finish.time_to_first_token_s)
    return JSONResponse(shaper.complete(text, logprobs, finish).model_dump(exclude_none=True))


def sse(data: BaseModel | dict[str, Any]) -> str:
    payload = (
        data.model_dump_json(exclude_none=True) if isinstance(data, BaseModel) else json.dumps(data)
    )
    return f"data: {payload}\n\n"


async def _events(
    state: AppState, handle: RequestHandle, shaper: Shaper, include_usage: bool
) -> AsyncIterator[str]:
    try:
        for chunk in shaper.opening():
            yield sse(chunk)
        async for event in handle:
            if isinstance(event, TextEvent):
                piece = shaper.text_chunk(event)
                if piece is not None:
                    yield sse(piece)
                continue
            yield sse(shaper.finish_chunk(event))
            state.metrics.ttft.labels(shaper.model).observe(event.time_to_first_token_s)
            if include_usage:
                yield sse(shaper.usage_chunk(event))
    except Exception as exc:  # a timeout, shutdown, engine failure, or a bug (logged as such)
        # The status line is gone already; report in-band like OpenAI does.
        yield sse(json.loads(bytes(error_response(exc).body)))
    finally:
        if not handle.finished:
            handle.cancel()  # client disconnected: Starlette cancelled this generator
    yield "data: [DONE]\n\n"


async def _watch_disconnect(request: Request, handle: RequestHandle) -> None:
    """Cancel the request when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def collect(
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
