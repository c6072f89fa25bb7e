"""The chat completions handler: messages through the chat template to the engine, and the
chat response bodies (`chat.completion`, `chat.completion.chunk`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from localllm.engine.grammar import check_grammar
from localllm.engine.handle import RequestHandle
from localllm.engine.types import FinishEvent, TextEvent, TokenLogprob
from localllm.errors import APIError
from localllm.server import types as t
from localllm.server.images import load_images
from localllm.server.serving import Serving, offload, response_format_grammar
from localllm.server.state import ServingEngine
from localllm.server.streaming import ShaperBase, usage_body
from localllm.tools import ContentDelta, OutputParser, ReasoningDelta, ToolCallDelta, ToolUse
from localllm.tools.parser import Delta
from localllm.tools.reasoning import check_reasoning_request, reasoning_first


class ChatServing(Serving):
    async def create_chat_completion(
        self, body: t.ChatCompletionRequest, request: Request
    ) -> Response:
        handle, shaper = await self.start(body)
        return await self.respond(request, body, handle, shaper)

    async def start(self, body: t.ChatCompletionRequest) -> tuple[RequestHandle, ChatShaper]:
        """Check, render and queue the chat; the shaper turns its events into chat bodies.
        Other APIs over the same path (Ollama's /api/chat) reshape what the shaper makes."""
        self.check_common(body)
        uses_completion_tokens = body.max_completion_tokens is not None
        max_tokens = self.max_tokens(
            body.max_completion_tokens if uses_completion_tokens else body.max_tokens,
            "max_completion_tokens" if uses_completion_tokens else "max_tokens",
        )
        images = await load_images(body.messages, self.state.settings)  # checked before a load
        messages = self.template_messages(body)
        async with self.use_engine(body.model, body.keep_alive) as (engine, model_id):

            def prepare() -> tuple[ToolUse, tuple[int, ...] | str, str | None, bool]:
                # Schemas to grammars, rendering and tokenizing take time: not on the event loop.
                tool_use = self.tool_use(engine, body)
                template_kwargs = check_reasoning_request(
                    body.reasoning_format,
                    body.reasoning_effort,
                    body.chat_template_kwargs,
                    takes_effort=tool_use.syntax.takes_reasoning_effort,
                )
                template_messages, template_tools = tool_use.template_input(messages)
                prompt, opened = engine.chat_render(
                    template_messages, template_tools, template_kwargs or None
                )
                grammar = tool_use.grammar(reasoning_open=opened)
                if grammar is not None:
                    check_grammar(grammar, param="tools")
                elif opened and body.response_format is not None:
                    answer = response_format_grammar(body.response_format)
                    # The model is inside its <think>: it closes it before the JSON.
                    grammar = reasoning_first(answer) if answer is not None else None
                return tool_use, prompt, grammar, opened

            tool_use, prompt, grammar, opened = await offload(engine, prepare)
            handle = await self.submit(
                engine,
                body,
                grammar=grammar,
                prompt=prompt,
                max_tokens=max_tokens,
                logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                add_special=False,  # the template wrote BOS where the model wants it
                keep_special=tool_use.keep_special,
                images=images,
            )
            raw = (body.reasoning_format or self.state.settings.reasoning_format) == "none"
            shaper = ChatShaper(
                **self.response_ids("chatcmpl", handle, model_id),
                logprobs=body.logprobs,
                tool_use=tool_use,
                parser=tool_use.parser(reasoning_open=opened, raw_reasoning=raw),
            )
            return handle, shaper

    def tool_use(self, engine: ServingEngine, body: t.ChatCompletionRequest) -> ToolUse:
        """The request's tools, tool_choice and parallel_tool_calls, checked against the
        model's tool-call syntax (a RequestError, so a 400, names what is wrong)."""
        for legacy, current in (("functions", "tools"), ("function_call", "tool_choice")):
            if (body.model_extra or {}).get(legacy) is not None:
                raise APIError(
                    400,
                    f"{legacy} is OpenAI's deprecated form; send {current} instead",
                    param=legacy,
                    code="invalid_value",
                )
        response_format = body.response_format
        return ToolUse.from_request(
            engine.tool_syntax(),
            body.tools,
            body.tool_choice,
            body.parallel_tool_calls,
            constrained_output=response_format is not None and response_format.type != "text",
        )

    def template_messages(self, body: t.ChatCompletionRequest) -> list[dict[str, Any]]:
        """The request's messages as the chat template reads them (tool fields included)."""
        for i, m in enumerate(body.messages):
            if m.reasoning_content is not None and m.role != "assistant":
                raise APIError(
                    400,
                    f"messages[{i}] (role {m.role}) has reasoning_content; only assistant "
                    "messages carry reasoning",
                    param=f"messages[{i}].reasoning_content",
                    code="invalid_value",
                )
        try:
            return [
                {
                    "role": "system" if m.role == "developer" else m.role,
                    "content": None if m.content is None and m.tool_calls else m.text(),
                    "tool_calls": m.tool_calls,
                    "tool_call_id": m.tool_call_id,
                    "reasoning_content": m.reasoning_content,
                    "name": m.name if m.role == "tool" else None,
                }
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
    """The chat bodies of one request; with tools, the text goes through the tool-call parser
    and calls come out as `tool_calls` (streamed as OpenAI does: id and name, then arguments)."""

    chunk_type = t.ChatCompletionChunk
    tool_use: ToolUse | None = None
    parser: OutputParser | None = None
    _n_calls: int = field(default=0, init=False)  # calls streamed so far

    def opening(self) -> list[BaseModel]:
        role = t.ChatChunkChoice(delta=t.Delta(role="assistant", content=""))
        return [self.chunk([role], localllm=self.extra)]

    def text_chunk(self, event: TextEvent) -> BaseModel | None:
        logprobs = chat_logprobs(event.logprobs) if self.logprobs else None
        delta: t.Delta | None
        if self.parser is None:
            delta = t.Delta(content=event.text)
        else:
            delta = self._delta(self.parser.feed(event.text))
            if delta is None and logprobs is None:
                return None  # held back: it may open a call
        return self.chunk([t.ChatChunkChoice(delta=delta or t.Delta(), logprobs=logprobs)])

    def finish_chunk(self, finish: FinishEvent) -> BaseModel:
        delta = self._delta(self.parser.finish()) if self.parser is not None else None
        choice = t.ChatChunkChoice(
            delta=delta or t.Delta(), finish_reason=self._finish_reason(finish, self._n_calls)
        )
        return self.chunk([choice], usage=usage_body(finish))

    def _delta(self, deltas: list[Delta]) -> t.Delta | None:
        """One chunk's delta from the parser's deltas: content joined, call pieces merged per
        call (OpenAI's stream helpers accumulate by index)."""
        content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
        reasoning = "".join(d.text for d in deltas if isinstance(d, ReasoningDelta))
        calls: dict[int, t.ToolCallDeltaBody] = {}
        for d in deltas:
            if not isinstance(d, ToolCallDelta) or not self._wanted(d.index):
                continue
            piece = calls.get(d.index)
            if piece is None:
                piece = calls[d.index] = t.ToolCallDeltaBody(
                    index=d.index, function=t.FunctionCallDelta()
                )
            if d.id is not None:
                piece.id, piece.type, piece.function.name = d.id, "function", d.name
                piece.function.arguments = ""
                self._n_calls += 1
            piece.function.arguments = (piece.function.arguments or "") + d.arguments
        if not content and not calls and not reasoning:
            return None
        return t.Delta(
            content=content or None,
            reasoning_content=reasoning or None,
            tool_calls=list(calls.values()) or None,
        )

    def _wanted(self, index: int) -> bool:
        """parallel_tool_calls false: one call per answer; without a grammar (auto) a model may
        write more, and those are dropped."""
        return self.tool_use is None or self.tool_use.parallel or index == 0

    def _finish_reason(self, finish: FinishEvent, n_calls: int) -> str:
        if self.tool_use is None:
            return finish.finish_reason
        return self.tool_use.finish_reason(finish.finish_reason, n_calls)

    def complete(self, text: str, logprobs: list[TokenLogprob], finish: FinishEvent) -> BaseModel:
        content: str | None = text
        reasoning = None
        tool_calls = None
        if self.parser is not None:
            deltas = self.parser.feed(text) + self.parser.finish()
            content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
            reasoning = "".join(d.text for d in deltas if isinstance(d, ReasoningDelta)) or None
            calls = [c for i, c in enumerate(self.parser.tool_calls) if self._wanted(i)]
            if calls:
                tool_calls = [
                    t.ToolCallBody(
                        id=c.id, function=t.FunctionCallBody(name=c.name, arguments=c.arguments)
                    )
                    for c in calls
                ]
                content = content if content.strip() else None
        return t.ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                t.ChatChoice(
                    message=t.AssistantMessage(
                        content=content, reasoning_content=reasoning, tool_calls=tool_calls
                    ),
                    finish_reason=self._finish_reason(finish, len(tool_calls or ())),
                    logprobs=chat_logprobs(logprobs) if self.logprobs else None,
                )
            ],
            usage=usage_body(finish),
            localllm=self.extra,
        )
