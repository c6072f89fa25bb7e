"""Ollama's generating endpoints as adapters over the server's own paths.

/api/chat and /api/generate become a `ChatCompletionRequest` (or, for a raw generate, a
`CompletionRequest`) handed to the same handlers as /v1/*: the same chat template, tool-call
parser, grammars (`format` is `response_format`), queue, limits and errors. What those
handlers' shapers make is reshaped into Ollama's bodies and streamed as newline-delimited JSON,
the last object with `done: true` and Ollama's counters in nanoseconds. /api/embed and
/api/embeddings go through the embeddings handler the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from localllm.engine.handle import RequestHandle
from localllm.engine.types import TextEvent
from localllm.errors import APIError, DoesNotFitError
from localllm.server import types as t
from localllm.server.chat.serving import ChatServing
from localllm.server.completions.serving import CompletionServing
from localllm.server.embeddings.serving import EmbeddingServing
from localllm.server.errors import validation_response
from localllm.server.ollama import types as o
from localllm.server.ollama.catalog import Catalog, keep_alive_forever
from localllm.server.ollama.shapes import (
    NDJSON,
    OllamaShaper,
    chat_messages,
    error_line,
    now_iso,
    ns,
    with_images,
)
from localllm.server.serving import Serving, offload
from localllm.server.state import AppState
from localllm.server.streaming import Shaper, collect

log = logging.getLogger(__name__)


def think_fields(
    think: o.Think | None, can_think: bool, model: str, takes_effort: bool = False
) -> dict[str, Any]:
    """Ollama's `think` on the chat path's reasoning fields: `chat_template_kwargs=
    {"enable_thinking": ...}` (a level counts as true) and, for a template that reads an effort
    (gpt-oss), `reasoning_effort` ("low"/"medium"/"high"). Should `ChatCompletionRequest` not
    declare them (a chat path without reasoning control), switching a thinking model is refused
    rather than ignored. A model without thinking refuses `think: true` with Ollama's own
    message; `false` asks for nothing it would do anyway."""
    if think is None or (think is False and not can_think):
        return {}
    if not can_think:
        raise APIError(400, f'"{model}" does not support thinking', param="think")
    declared = t.ChatCompletionRequest.model_fields
    fields: dict[str, Any] = {}
    if "reasoning_effort" in declared and isinstance(think, str) and takes_effort:
        fields["reasoning_effort"] = think
    if "chat_template_kwargs" in declared:
        fields["chat_template_kwargs"] = {"enable_thinking": think is not False}
    if not fields:
        raise APIError(
            400,
            "think: this server's chat path cannot switch a model's thinking on or off yet; "
            "leave think out to get the model's default",
            param="think",
        )
    return fields


class OllamaServing(Serving):
    """The generating endpoints of Ollama's API, over the app's chat, completion and
    embedding handlers."""

    def __init__(
        self,
        state: AppState,
        chat: ChatServing,
        completion: CompletionServing,
        embeddings: EmbeddingServing,
        catalog: Catalog,
    ) -> None:
        super().__init__(state)
        self.chat_handler = chat
        self.completion_handler = completion
        self.embeddings_handler = embeddings
        self.catalog = catalog

    # ---------------------------------------------------------------- chat and generate

    async def chat(self, body: o.ChatRequest, request: Request) -> Response:
        started = time.perf_counter()
        name = self.catalog.resolve(body.model)
        if not body.messages:
            return await self._load_or_unload(name, body.keep_alive, "chat", started)
        fields = await self._common(body, name)
        fields["messages"] = chat_messages(body.messages)
        if body.tools:
            fields["tools"] = body.tools
        return await self._run_chat(request, body, name, fields, "chat", started)

    async def generate(self, body: o.GenerateRequest, request: Request) -> Response:
        started = time.perf_counter()
        name = self.catalog.resolve(body.model)
        for param, value in (("suffix", body.suffix), ("template", body.template)):
            if value:
                raise APIError(
                    400,
                    f"{param} is not supported: localllm renders the model's own chat template "
                    "(Jinja) and has no fill-in-the-middle",
                    param=param,
                )
        if body.context is not None:
            raise APIError(
                400,
                "context (token ids of an earlier answer) is deprecated by Ollama and not "
                "supported; send the conversation as messages to /api/chat",
                param="context",
            )
        if body.images and body.raw:
            raise APIError(
                400,
                "raw mode takes no images: the chat template places them; send raw=false",
                param="images",
            )
        if not body.prompt and not body.images:
            return await self._load_or_unload(name, body.keep_alive, "generate", started)
        fields = await self._common(body, name)
        if body.raw:
            if body.system:
                raise APIError(400, "raw mode does not support system", param="system")
            fields.pop("chat_template_kwargs", None)
            fields.pop("reasoning_effort", None)
            return await self._run_completion(request, body, name, fields, started)
        messages = [{"role": "system", "content": body.system}] if body.system else []
        user = {"role": "user", "content": with_images(body.prompt, body.images)}
        fields["messages"] = [*messages, user]
        return await self._run_chat(request, body, name, fields, "generate", started)

    async def _common(self, body: o._Generating, name: str) -> dict[str, Any]:
        """The OpenAI request fields every generating request shares, checked."""
        if body.truncate or body.shift:
            # false for both is what localllm does: a prompt longer than the context is a 400
            raise APIError(
                400,
                f"{'truncate' if body.truncate else 'shift'}=true is not supported: localllm "
                "never cuts or shifts a conversation; one longer than the context is refused",
                param="truncate" if body.truncate else "shift",
            )
        fields = o.sampling_fields(body.options)
        await self._check_num_ctx(name, o.num_ctx_option(body.options))
        fields.update(model=name, stream=body.stream)
        keep = self._keep_alive(body.keep_alive)
        if keep is not None:
            fields["keep_alive"] = keep
        response_format = o.response_format(body.format)
        if response_format is not None:
            fields["response_format"] = response_format
        if body.logprobs:
            fields["logprobs"] = True
            if body.top_logprobs:
                fields["top_logprobs"] = body.top_logprobs
        can_think, takes_effort = await asyncio.to_thread(self.catalog.thinking, name)
        fields.update(think_fields(body.think, can_think, body.model, takes_effort))
        return fields

    def _keep_alive(self, value: o.KeepAlive) -> o.KeepAlive:
        """keep_alive as the handlers take it; one model held for the server's life already
        honours 'never unload', so a negative value needs nothing there."""
        if value is not None and self.state.router is None and keep_alive_forever(value):
            return None
        return value

    async def _check_num_ctx(self, name: str, num_ctx: int | None) -> None:
        """num_ctx up to the loaded (or planned) context is served as is: the conversation has
        at least that many tokens. Above it, serving a models folder, the fitter plans the model
        again for num_ctx and it reloads with that plan, as Ollama reloads; one model held for
        the server's life cannot, and says so."""
        if num_ctx is None:
            return
        slot = await asyncio.to_thread(self.catalog.context_length, name)
        if slot is None or num_ctx <= slot:
            return
        router = self.state.router
        if router is None:
            raise APIError(
                400,
                f"options.num_ctx {num_ctx} is above the {slot} tokens per conversation "
                f"{name} is loaded with; this server holds one model planned at start: serve it "
                "with --ctx-size (and fewer --parallel slots) to get more, or serve the models "
                "folder, which reloads a model for a larger num_ctx",
                param="options.num_ctx",
                code="context_length_exceeded",
            )
        entry = await asyncio.to_thread(router.registry.get, name)
        try:
            _, config = await asyncio.to_thread(router.registry.replanned, entry, num_ctx)
        except DoesNotFitError as exc:
            raise APIError(
                400,
                f"options.num_ctx {num_ctx} does not fit on this machine: {exc}",
                param="options.num_ctx",
                code="does_not_fit",
            ) from None
        if config.n_ctx_slot < num_ctx:  # the fitter shortened it (it should have refused)
            raise APIError(
                400,
                f"options.num_ctx {num_ctx}: the fitter planned only {config.n_ctx_slot} tokens",
                param="options.num_ctx",
                code="does_not_fit",
            )
        log.info("%s: re-planned for num_ctx %d (was %d); reloading", name, num_ctx, slot)
        if any(model.name == entry.name for model in router.loaded()):
            await router.unload(entry.name, reason="replanned")

    async def _run_chat(
        self,
        request: Request,
        body: o._Generating,
        name: str,
        fields: dict[str, Any],
        kind: str,
        started: float,
    ) -> Response:
        openai_body = _validated(t.ChatCompletionRequest, fields)
        handle, shaper = await self.chat_handler.start(openai_body)
        return await self._respond(request, handle, shaper, kind, body.stream, started)

    async def _run_completion(
        self, request: Request, body: o.GenerateRequest, name: str, fields: dict[str, Any],
        started: float,
    ) -> Response:
        if "tools" in fields:
            raise APIError(400, "raw mode takes no tools", param="tools")
        fields["prompt"] = body.prompt
        fields["max_tokens"] = fields.get("max_tokens")  # no 16-token default as in OpenAI's
        if fields.pop("logprobs", None):
            fields["logprobs"] = fields.pop("top_logprobs", 0)
        openai_body = _validated(t.CompletionRequest, fields)
        handle, shaper = await self.completion_handler.start(openai_body)
        return await self._respond(request, handle, shaper, "generate", body.stream, started)

    async def _respond(
        self,
        request: Request,
        handle: RequestHandle,
        inner: Shaper,
        kind: str,
        stream: bool,
        started: float,
    ) -> Response:
        shaper = OllamaShaper(
            inner, inner.model, kind, started, self.catalog.load_seconds(inner.model, started)
        )
        if stream:
            return StreamingResponse(
                self._lines(handle, shaper),
                media_type=NDJSON,
                headers={"Cache-Control": "no-cache"},
            )
        text, logprobs, finish = await collect(request, handle)
        self.state.metrics.ttft.labels(shaper.model).observe(finish.time_to_first_token_s)
        return JSONResponse(shaper.whole(text, logprobs, finish))

    async def _lines(self, handle: RequestHandle, shaper: OllamaShaper) -> AsyncIterator[str]:
        try:
            async for event in handle:
                if isinstance(event, TextEvent):
                    piece = shaper.piece(event)
                    if piece is not None:
                        yield json.dumps(piece) + "\n"
                    continue
                for body in shaper.ending(event):
                    yield json.dumps(body) + "\n"
                self.state.metrics.ttft.labels(shaper.model).observe(event.time_to_first_token_s)
        except Exception as exc:  # the status line is gone: Ollama reports in-band
            yield json.dumps(error_line(exc)) + "\n"
        finally:
            if not handle.finished:
                handle.cancel()  # the client went away: Starlette cancelled this generator

    async def _load_or_unload(
        self, name: str, keep_alive: o.KeepAlive, kind: str, started: float
    ) -> Response:
        """Ollama's empty request: load the model (done_reason "load"), or with keep_alive 0
        unload it ("unload")."""
        router = self.state.router
        unload = keep_alive is not None and _is_zero(keep_alive)
        if router is None:
            self.check_model(name)
            if unload:
                raise APIError(
                    400,
                    "this server holds its one model for its whole life and cannot unload it; "
                    "serve a models folder (`localllm serve` without a model) to unload by name",
                    param="keep_alive",
                )
            self.engine()  # 503 while loading
            model = self.state.model_id
        elif unload:
            await router.unload(name)
            model = name
        else:
            keep = self.models_keep_alive(keep_alive)
            model = (await router.load(name, keep)).name
        body: dict[str, Any] = {"model": model, "created_at": now_iso(), "done": True,
                                "done_reason": "unload" if unload else "load"}
        body["message" if kind == "chat" else "response"] = (
            {"role": "assistant", "content": ""} if kind == "chat" else ""
        )
        return JSONResponse(body)

    def models_keep_alive(self, value: o.KeepAlive) -> Any:
        from localllm.errors import SettingsError
        from localllm.router import UNSET, parse_keep_alive

        try:
            return UNSET if value is None else parse_keep_alive(value)
        except SettingsError as exc:
            raise APIError(400, str(exc), param="keep_alive", code="invalid_value") from None

    # ---------------------------------------------------------------- embeddings

    async def embed(self, body: o.EmbedRequest) -> dict[str, Any]:
        started = time.perf_counter()
        name = self.catalog.resolve(body.model)
        self._embedding_options(body.options)
        await self._check_num_ctx(name, o.num_ctx_option(body.options))
        inputs: list[str] | list[list[int]] = (
            [body.input] if isinstance(body.input, str) else list(body.input)
        )
        if body.truncate:
            inputs = await self._truncated(name, [str(text) for text in inputs])
        result = await self._embeddings(name, inputs, body.keep_alive, body.dimensions)
        return {
            "model": result["model"],
            "embeddings": [item["embedding"] for item in result["data"]],
            "total_duration": ns(time.perf_counter() - started),
            "load_duration": ns(self.catalog.load_seconds(result["model"], started)),
            "prompt_eval_count": result["usage"]["prompt_tokens"],
        }

    async def embeddings(self, body: o.EmbeddingsRequest) -> dict[str, Any]:
        name = self.catalog.resolve(body.model)
        self._embedding_options(body.options)
        await self._check_num_ctx(name, o.num_ctx_option(body.options))
        result = await self._embeddings(name, [body.prompt], body.keep_alive, None)
        return {"embedding": result["data"][0]["embedding"]}

    def _embedding_options(self, options: dict[str, Any] | None) -> None:
        for key, value in (options or {}).items():
            if value is not None and key != "num_ctx":
                raise APIError(
                    400,
                    f"options.{key}: embeddings take no sampling or load options here "
                    "(only num_ctx, checked against the loaded context)",
                    param=f"options.{key}",
                    code="invalid_value",
                )

    async def _truncated(self, name: str, inputs: list[str]) -> list[list[int]]:
        """Ollama's truncate: each input cut to the model's context, in tokens."""
        async with self.use_engine(name, None, "any") as (engine, _):

            def cut() -> list[list[int]]:
                limit = engine.n_ctx_slot
                # No token averages 64 characters: the text past that never reaches the limit,
                # and tokenizing it (seconds for a large input) is skipped.
                return [engine.tokenize(text[: 64 * limit], True, False)[:limit] for text in inputs]

            return await offload(engine, cut)  # the model's own pool (a router lease)

    async def _embeddings(
        self,
        name: str,
        inputs: list[str] | list[list[int]],
        keep_alive: o.KeepAlive,
        dimensions: int | None,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": name, "input": inputs, "encoding_format": "float"}
        keep = self._keep_alive(keep_alive)
        if keep is not None:
            fields["keep_alive"] = keep
        if dimensions is not None:
            fields["dimensions"] = dimensions
        request = _validated(t.EmbeddingRequest, fields)
        return await self.embeddings_handler.create_embeddings(request)


def _is_zero(value: str | int | float) -> bool:
    from localllm.errors import SettingsError
    from localllm.router import parse_keep_alive

    try:
        return parse_keep_alive(value) == 0
    except SettingsError as exc:
        raise APIError(400, str(exc), param="keep_alive", code="invalid_value") from None


def _validated(model: type[t._Request], fields: dict[str, Any]) -> Any:
    """An OpenAI request body from Ollama's fields; a bad value is a 400 naming the field by
    Ollama's name where it came from `options`."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise APIError(400, _validation_message(exc), code="invalid_value") from None


_OPTION_OF = {v: k for k, v in o.SAMPLING_OPTIONS.items()} | {"max_tokens": "num_predict"}


def _validation_message(exc: ValidationError) -> str:
    response = validation_response(exc)
    message: str = json.loads(bytes(response.body))["error"]["message"]
    field_name = message.split(":", 1)[0].split(".", 1)[0]
    if field_name in _OPTION_OF:
        return f"options.{_OPTION_OF[field_name]}{message[len(field_name):]}"
    return message
