"""The text completions handler: a prompt (text or token ids) to the engine, and the
`text_completion` bodies, with `echo` and the legacy logprobs shape."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from localllm.engine.handle import RequestHandle
from localllm.engine.types import FinishEvent, TextEvent, TokenLogprob
from localllm.errors import APIError
from localllm.server import types as t
from localllm.server.serving import Serving
from localllm.server.streaming import ShaperBase, usage_body


class CompletionServing(Serving):
    async def create_completion(self, body: t.CompletionRequest, request: Request) -> Response:
        handle, shaper = await self.start(body)
        return await self.respond(request, body, handle, shaper)

    async def start(self, body: t.CompletionRequest) -> tuple[RequestHandle, CompletionShaper]:
        """Check and queue the completion; the shaper turns its events into completion bodies.
        Other APIs over the same path (Ollama's raw /api/generate) reshape what it makes."""
        self.check_common(body)
        _check_unsupported(body)
        max_tokens = self.max_tokens(body.max_tokens, "max_tokens")
        prompt = _prompt(body)
        async with self.use_engine(body.model, body.keep_alive) as (engine, model_id):
            handle = await self.submit(
                engine,
                body,
                prompt=prompt,
                max_tokens=max_tokens,
                logprobs=body.logprobs,
            )
            echo = body.echo and isinstance(prompt, str)
            shaper = CompletionShaper(
                **self.response_ids("cmpl", handle, model_id),
                logprobs=body.logprobs is not None,
                prefix=prompt if echo and isinstance(prompt, str) else "",
            )
            return handle, shaper


def _check_unsupported(body: t.CompletionRequest) -> None:
    """OpenAI fields this server cannot honour: refused, never silently ignored."""
    extra = body.model_extra or {}
    if extra.get("suffix") is not None:
        raise APIError(
            400,
            "suffix (fill-in-the-middle) is not supported; send the text before the gap as "
            "the prompt",
            param="suffix",
            code="invalid_value",
        )
    best_of = extra.get("best_of")
    if best_of is not None and (isinstance(best_of, bool) or best_of not in (1, body.n)):
        raise APIError(
            400,
            "best_of is not supported (one completion is generated per request); leave it out "
            "or set it to 1",
            param="best_of",
            code="invalid_value",
        )


def _prompt(body: t.CompletionRequest) -> str | tuple[int, ...]:
    if isinstance(body.prompt, str):
        return body.prompt
    if body.prompt and all(isinstance(p, int) for p in body.prompt):
        return tuple(int(p) for p in body.prompt)
    if len(body.prompt) == 1 and isinstance(body.prompt[0], str):
        return body.prompt[0]
    raise APIError(
        400,
        "prompt must be a string, a list of one string, or a list of token ids",
        param="prompt",
        code="invalid_value",
    )


def completion_logprobs(
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


@dataclass
class CompletionShaper(ShaperBase):
    """The completion bodies of one request; `prefix` is the echoed prompt."""

    chunk_type = t.TextCompletion
    prefix: str = ""
    offset: int = field(init=False)  # text offset of the next streamed token

    def __post_init__(self) -> None:
        self.offset = len(self.prefix)

    def opening(self) -> list[BaseModel]:
        if not (self.prefix or self.extra):
            return []
        return [self.chunk([t.CompletionChoice(text=self.prefix)], localllm=self.extra)]

    def text_chunk(self, event: TextEvent) -> BaseModel:
        logprobs = completion_logprobs(event.logprobs, self.offset) if self.logprobs else None
        self.offset += len(event.text)
        return self.chunk([t.CompletionChoice(text=event.text, logprobs=logprobs)])

    def finish_chunk(self, finish: FinishEvent) -> BaseModel:
        choice = t.CompletionChoice(text="", finish_reason=finish.finish_reason)
        return self.chunk([choice], usage=usage_body(finish))

    def complete(self, text: str, logprobs: list[TokenLogprob], finish: FinishEvent) -> BaseModel:
        choice = t.CompletionChoice(
            text=self.prefix + text,
            finish_reason=finish.finish_reason,
            logprobs=completion_logprobs(logprobs, len(self.prefix)) if self.logprobs else None,
        )
        return self.chunk([choice], usage=usage_body(finish), localllm=self.extra)
