"""The chat completions handler: messages through the chat template to the engine, and the
chat response bodies (`chat.completion`, `chat.completion.chunk`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from localllm.engine.types import FinishEvent, TextEvent, TokenLogprob
from localllm.errors import APIError
from localllm.server import types as t
from localllm.server.serving import Serving
from localllm.server.streaming import ShaperBase, usage_body


class ChatServing(Serving):
    async def create_chat_completion(
        self, body: t.ChatCompletionRequest, request: Request
    ) -> Response:
        self.check_common(body)
        uses_completion_tokens = body.max_completion_tokens is not None
        max_tokens = self.max_tokens(
            body.max_completion_tokens if uses_completion_tokens else body.max_tokens,
            "max_completion_tokens" if uses_completion_tokens else "max_tokens",
        )
        messages = self.template_messages(body)
        async with self.use_engine(body.model, body.keep_alive) as (engine, model_id):
            # Rendering a template and tokenizing a long chat take time: not on the event loop.
            prompt = await asyncio.to_thread(engine.chat_prompt, messages)
            handle = await self.submit(
                engine,
                body,
                prompt=prompt,
                max_tokens=max_tokens,
                logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                add_special=False,  # the template wrote BOS where the model wants it
            )
            shaper = ChatShaper(
                **self.response_ids("chatcmpl", handle, model_id), logprobs=body.logprobs
            )
            return await self.respond(request, body, handle, shaper)

    def template_messages(self, body: t.ChatCompletionRequest) -> list[dict[str, Any]]:
        """The request's messages as the chat template reads them."""
        try:
            return [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages
            ]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None


def chat_logprobs(items: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> t.ChatLogprobs:
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


@dataclass
class ChatShaper(ShaperBase):
    """The chat bodies of one request."""

    chunk_type = t.ChatCompletionChunk

    def opening(self) -> list[BaseModel]:
        role = t.ChatChunkChoice(delta=t.Delta(role="assistant", content=""))
        return [self.chunk([role], localllm=self.extra)]

    def text_chunk(self, event: TextEvent) -> BaseModel:
        logprobs = chat_logprobs(event.logprobs) if self.logprobs else None
        return self.chunk([t.ChatChunkChoice(delta=t.Delta(content=event.text), logprobs=logprobs)])

    def finish_chunk(self, finish: FinishEvent) -> BaseModel:
        choice = t.ChatChunkChoice(delta=t.Delta(), finish_reason=finish.finish_reason)
        return self.chunk([choice], usage=usage_body(finish))

    def complete(self, text: str, logprobs: list[TokenLogprob], finish: FinishEvent) -> BaseModel:
        return t.ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                t.ChatChoice(
                    message=t.AssistantMessage(content=text),
                    finish_reason=finish.finish_reason,
                    logprobs=chat_logprobs(logprobs) if self.logprobs else None,
                )
            ],
            usage=usage_body(finish),
            localllm=self.extra,
        )
