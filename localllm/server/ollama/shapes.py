"""Ollama's bodies from the server's own: messages in, and the OpenAI chunks and completions
the chat and completion shapers make reshaped into Ollama's objects (text in `message` or
`response`, calls whole with object arguments, logprobs, the last object's counters in ns)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from localllm.engine.types import FinishEvent, TextEvent, TokenLogprob
from localllm.errors import APIError
from localllm.server.errors import error_response
from localllm.server.ollama import types as o
from localllm.server.streaming import Shaper

NS = 1_000_000_000
NDJSON = "application/x-ndjson"


def now_iso() -> str:
    """Ollama's created_at: RFC 3339 in UTC."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def ns(seconds: float) -> int:
    return max(0, int(seconds * NS))


def with_images(text: str, images: list[str] | None) -> str | list[dict[str, Any]]:
    """A message's content with Ollama's images (base64, no data: prefix) as OpenAI image
    parts before the text, where Ollama's own prompt puts them; the chat path checks them."""
    if not images:
        return text
    parts: list[dict[str, Any]] = [
        {
            "type": "image_url",
            "image_url": {"url": f"data:application/octet-stream;base64,{image}"},
        }
        for image in images
    ]
    if text:
        parts.append({"type": "text", "text": text})
    return parts


def chat_messages(messages: list[o.Message]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's: call arguments as JSON text, every call an id, and each
    tool result tied to its call (by `tool_call_id`, else by `tool_name`, else in order)."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
    for i, message in enumerate(messages):
        item: dict[str, Any] = {
            "role": message.role,
            "content": with_images(message.content or "", message.images),
        }
        if message.thinking:
            if message.role != "assistant":
                raise APIError(
                    400,
                    f"messages[{i}].thinking: only assistant messages carry thinking; "
                    "send it on the model's answer",
                    param=f"messages[{i}].thinking",
                )
            item["reasoning_content"] = message.thinking  # the template decides whether to show it
        if message.tool_calls:
            calls: list[dict[str, Any]] = []
            for j, call in enumerate(message.tool_calls):
                call_id = call.id or f"call_{i}_{j}"
                arguments = call.function.arguments
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": arguments
                            if isinstance(arguments, str)
                            else json.dumps(arguments, ensure_ascii=False),
                        },
                    }
                )
            item["tool_calls"] = calls
            open_calls = [(c["id"], c["function"]["name"]) for c in calls]
        if message.role == "tool":
            answered = message.tool_call_id or _answered(open_calls, message.tool_name)
            if answered is not None:
                item["tool_call_id"] = answered
                open_calls = [c for c in open_calls if c[0] != answered]
            if message.tool_name:
                item["name"] = message.tool_name
        out.append(item)
    return out


def _answered(open_calls: list[tuple[str, str]], name: str | None) -> str | None:
    for call_id, call_name in open_calls:
        if name is None or call_name == name:
            return call_id
    return open_calls[0][0] if open_calls else None


def _ollama_logprobs(logprobs: Any) -> list[dict[str, Any]] | None:
    """OpenAI's chat logprobs (`content`: token, logprob, bytes, top_logprobs) in Ollama's
    list, which has the same fields."""
    if logprobs is None:
        return None
    return [item.model_dump() for item in logprobs.content]


def _completion_logprobs(logprobs: Any) -> list[dict[str, Any]] | None:
    if logprobs is None:
        return None
    return [
        {
            "token": token,
            "logprob": logprob,
            "top_logprobs": [{"token": k, "logprob": v} for k, v in top.items()],
        }
        for token, logprob, top in zip(
            logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
        )
    ]


@dataclass
class OllamaShaper:
    """Reshapes one request's OpenAI bodies (from the chat or completion shaper) into Ollama's
    objects. Tool calls stream as OpenAI pieces; Ollama sends each call whole, so they are
    gathered and sent with the last piece of text."""

    inner: Shaper
    model: str
    kind: str  # "chat" or "generate"
    started: float  # perf_counter at arrival
    load_s: float
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def _body(self, content: str, thinking: str | None, **more: Any) -> dict[str, Any]:
        """A chat body carries the text in `message`, a generate body at the top level."""
        text: dict[str, Any] = {"content" if self.kind == "chat" else "response": content}
        if thinking:
            text["thinking"] = thinking
        calls = more.pop("tool_calls", None)
        if calls:
            text["tool_calls"] = calls
        body: dict[str, Any] = {"model": self.model, "created_at": now_iso()}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", **text}
        else:
            body.update(text)
        body.update({k: v for k, v in more.items() if v is not None})
        return body

    def _parts(self, chunk: BaseModel) -> tuple[str, str | None, list[dict[str, Any]] | None]:
        """(text, thinking, logprobs) of one OpenAI chunk; call pieces are gathered."""
        choices = getattr(chunk, "choices", [])
        if not choices:
            return "", None, None
        choice = choices[0]
        delta = getattr(choice, "delta", None)
        if delta is None:  # a text completion chunk
            return choice.text, None, _completion_logprobs(choice.logprobs)
        for piece in delta.tool_calls or []:
            call = self.calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
            if piece.id is not None:
                call["id"], call["name"] = piece.id, piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""
        thinking = getattr(delta, "reasoning_content", None)
        return delta.content or "", thinking, _ollama_logprobs(choice.logprobs)

    def piece(self, event: TextEvent) -> dict[str, Any] | None:
        chunk = self.inner.text_chunk(event)
        if chunk is None:
            return None
        text, thinking, logprobs = self._parts(chunk)
        if not (text or thinking or logprobs):
            return None
        return self._body(text, thinking, done=False, logprobs=logprobs)

    def ending(self, finish: FinishEvent) -> list[dict[str, Any]]:
        text, thinking, logprobs = self._parts(self.inner.finish_chunk(finish))
        calls = _whole_calls(self.calls)
        out = []
        if text or thinking or logprobs or calls:
            out.append(self._body(text, thinking, done=False, logprobs=logprobs, tool_calls=calls))
        out.append(self._body("", None, **self.counters(finish)))
        return out

    def whole(self, text: str, logprobs: list[TokenLogprob], finish: FinishEvent) -> dict[str, Any]:
        body: Any = self.inner.complete(text, logprobs, finish)  # a chat or a text completion
        choice = body.choices[0]
        message = getattr(choice, "message", None)
        if message is None:
            completion_logprobs = _completion_logprobs(choice.logprobs)
            return self._body(choice.text, None, logprobs=completion_logprobs,
                              **self.counters(finish))
        calls = _whole_calls(
            {
                i: {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for i, c in enumerate(message.tool_calls or [])
            }
        )
        return self._body(
            message.content or "",
            getattr(message, "reasoning_content", None),
            tool_calls=calls,
            logprobs=_ollama_logprobs(choice.logprobs),
            **self.counters(finish),
        )

    def counters(self, finish: FinishEvent) -> dict[str, Any]:
        usage = finish.usage
        computed = usage.prompt_tokens - usage.cached_tokens
        return {
            "done": True,
            "done_reason": finish.finish_reason,
            "total_duration": ns(time.perf_counter() - self.started),
            "load_duration": ns(self.load_s),
            "prompt_eval_count": usage.prompt_tokens,
            "prompt_eval_duration": ns(computed / finish.prompt_tokens_per_s)
            if finish.prompt_tokens_per_s
            else 0,
            "eval_count": usage.completion_tokens,
            "eval_duration": ns((usage.completion_tokens - 1) / finish.decode_tokens_per_s)
            if finish.decode_tokens_per_s
            else 0,
        }


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text  # a model's malformed call: passed on as written


def _whole_calls(calls: dict[int, dict[str, Any]]) -> list[dict[str, Any]] | None:
    """OpenAI's calls (arguments as JSON text) as Ollama's (arguments as an object)."""
    if not calls:
        return None
    return [
        {
            "id": call["id"],
            "function": {"index": i, "name": call["name"],
                         "arguments": _arguments(call["arguments"])},
        }
        for i, call in sorted(calls.items())
    ]


def error_line(exc: BaseException) -> dict[str, Any]:
    """An error in Ollama's shape, for a stream whose status line is gone."""
    body = json.loads(bytes(error_response(exc).body))
    return {"error": body["error"]["message"]}
