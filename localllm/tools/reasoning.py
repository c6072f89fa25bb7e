"""Reasoning ("thinking") in a model's output, told apart from the answer.

Two families, recognised from the chat template as llama.cpp's `common/chat.cpp` does:

- THINK: `<think>reasoning</think>answer` (Qwen3.x, DeepSeek-R1 distills and V3.1, GLM-4.x,
  Nemotron). Templates that open `<think>` in the generation prompt (Qwen3.5, GLM-4.7, an
  R1 distill) make the output start inside the reasoning: `prompt_opens_reasoning` says so.
- HARMONY: gpt-oss's channels, `<|channel|>analysis<|message|>...<|end|>` for reasoning,
  `final` for the answer, `commentary` for preambles and tool calls (`localllm.tools.harmony`).

`ThinkSplitter` splits `<think>` output as it streams; `localllm.tools.output` has the entry
points for any format (`split_reasoning`, `ReasoningSplitter`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from localllm.errors import RequestError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
HARMONY_MARKER = "<|channel|>"
_WS = " \t\r\n"

# What a request's `reasoning_format` may say (llama-server's names): split the reasoning out
# ("auto", "deepseek": the same here) or leave the model's raw text in `content` ("none").
REASONING_FORMATS = ("auto", "deepseek", "none")
REASONING_EFFORTS = ("low", "medium", "high")  # gpt-oss's levels
# Template variables a request's chat_template_kwargs must not replace.
_RESERVED_KWARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
)


class ReasoningFormat(StrEnum):
    NONE = "none"  # the template shows no reasoning markers: the output is all answer
    THINK = "think"
    HARMONY = "harmony"


def detect_reasoning(source: str) -> ReasoningFormat:
    """The reasoning syntax of a template's model, from the template's source."""
    if HARMONY_MARKER in source:
        return ReasoningFormat.HARMONY
    if THINK_OPEN in source or THINK_CLOSE in source:
        return ReasoningFormat.THINK
    return ReasoningFormat.NONE


def prompt_opens_reasoning(prompt: str, fmt: ReasoningFormat) -> bool:
    """Whether a rendered prompt ends inside an open `<think>` (the output starts reasoning)."""
    return fmt is ReasoningFormat.THINK and prompt.rstrip(_WS).endswith(THINK_OPEN)


# GBNF for the rest of an opened <think> (text without "</") and its end, before the answer.
THINK_GRAMMAR = '([^<] | "<" [^/])* "</think>" [ \\t\\n]*'


def reasoning_first(grammar: str) -> str:
    """A grammar for an answer that starts inside an opened `<think>`: the reasoning, its end,
    then what `grammar` (its root rule `root`) allows."""
    # No rule refers back to root (ours never do, nor llama.cpp's JSON grammar).
    renamed = re.sub(r"^root(\s*)::=", r"answer-root\1::=", grammar, count=1, flags=re.M)
    return f"root ::= {THINK_GRAMMAR} answer-root\n{renamed}"


def reasoning_markers(fmt: ReasoningFormat) -> tuple[str, ...]:
    """Marker tokens the engine must keep in the output text (some vocabularies make them
    control tokens, which print as nothing)."""
    if fmt is ReasoningFormat.THINK:
        return (THINK_OPEN, THINK_CLOSE)
    if fmt is ReasoningFormat.HARMONY:
        return ("<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|constrain|>")
    return ()


def check_reasoning_request(
    reasoning_format: Any, reasoning_effort: Any, chat_template_kwargs: Any, *, takes_effort: bool
) -> dict[str, Any]:
    """A request's reasoning fields, checked (RequestError naming the field); returns the
    variables to hand the chat template. `takes_effort`: the template reads reasoning_effort."""
    if reasoning_format is not None and reasoning_format not in REASONING_FORMATS:
        raise RequestError(
            f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, "
            f"got {reasoning_format!r}",
            param="reasoning_format",
        )
    extra: dict[str, Any] = {}
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, Mapping):
            raise RequestError(
                "chat_template_kwargs must be an object of template variables, e.g. "
                '{"enable_thinking": false}',
                param="chat_template_kwargs",
            )
        for key, value in chat_template_kwargs.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise RequestError(
                    f"chat_template_kwargs key {key!r} is not a template variable name",
                    param="chat_template_kwargs",
                )
            if key in _RESERVED_KWARGS:
                raise RequestError(
                    f"chat_template_kwargs may not set {key!r}; send it as the request's own field",
                    param="chat_template_kwargs",
                )
            extra[key] = value
    if reasoning_effort is not None:
        if not isinstance(reasoning_effort, str) or reasoning_effort not in REASONING_EFFORTS:
            raise RequestError(
                f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                f"got {reasoning_effort!r}",
                param="reasoning_effort",
            )
        if not takes_effort:
            raise RequestError(
                "this model's chat template takes no reasoning_effort (gpt-oss's does); "
                "for Qwen3-style models send chat_template_kwargs "
                '{"enable_thinking": false} to turn thinking off',
                param="reasoning_effort",
            )
        extra["reasoning_effort"] = reasoning_effort
    return extra


def history_for_template(
    messages: Sequence[Mapping[str, Any]], fmt: ReasoningFormat
) -> list[dict[str, Any]]:
    """Earlier turns' reasoning as the template expects it. Most templates read an assistant
    message's `reasoning_content` (and drop it for turns before the last user message);
    gpt-oss's reads `thinking`, and keeps it only for a tool call still being answered (its
    template decides which), so llama.cpp's rule applies: the analysis replaces the content of
    a message with tool calls."""
    if fmt is not ReasoningFormat.HARMONY:
        return [dict(m) for m in messages]
    out = []
    for raw in messages:
        message = dict(raw)
        reasoning = message.pop("reasoning_content", None)
        if message.get("role") == "assistant" and isinstance(reasoning, str) and reasoning:
            message["thinking"] = reasoning
            if message.get("tool_calls"):
                message["content"] = ""
        out.append(message)
    return out


class ThinkSplitter:
    """`<think>` reasoning apart from the answer, fed as the text streams.

    `opened`: the prompt opened `<think>` (the output starts inside it); otherwise a `<think>`
    counts only at the very start of the output (after whitespace). `end_tags`: more texts that
    end the reasoning without being part of it (a tool call opener: a model that forgets
    `</think>` before calling). Whitespace around the reasoning is dropped.
    """

    def __init__(self, *, opened: bool = False, end_tags: Sequence[str] = ()) -> None:
        self._buf = ""
        # Even when the prompt opened it, some models write <think> again: it is dropped.
        self._opened = opened
        self._state = "start"
        self._ends = (THINK_CLOSE, *end_tags)
        self._lead = True  # at the start of the reasoning or of the content: drop whitespace
        self._held_ws = ""  # whitespace inside the reasoning, out once more reasoning follows

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) decided by this piece of text."""
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        """The rest, once the text has ended (a cut-off reasoning is still reasoning)."""
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning, content = "", ""
        if self._state == "start":
            stripped = self._buf.lstrip(_WS)
            if not final and len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
                return "", ""  # may still open a <think>
            if stripped.startswith(THINK_OPEN):
                self._buf = stripped[len(THINK_OPEN) :]
                self._state = "reasoning"
            elif self._opened:
                self._state = "reasoning"
            else:
                self._state = "content"
                self._lead = False
        if self._state == "reasoning":
            at, tag = _first(self._buf, self._ends)
            if at == -1:
                keep = 0 if final else partial_suffix(self._buf, self._ends)
                reasoning = self._reasoning_piece(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return reasoning, ""
            reasoning = self._reasoning_piece(self._buf[:at])
            self._held_ws = ""
            # </think> is consumed; another end tag (a tool call) belongs to the content.
            self._buf = self._buf[at + len(tag) :] if tag == THINK_CLOSE else self._buf[at:]
            self._state = "content"
            self._lead = True
        if self._lead:
            self._buf = self._buf.lstrip(_WS)
            if not self._buf:
                return reasoning, ""
            self._lead = False
        content, self._buf = self._buf, ""
        return reasoning, content

    def _reasoning_piece(self, text: str) -> str:
        if self._lead:
            text = text.lstrip(_WS)
            if not text:
                return ""
            self._lead = False
        body = text.rstrip(_WS)
        if not body:
            self._held_ws += text
            return ""
        out = self._held_ws + body
        self._held_ws = text[len(body) :]
        return out


def _first(text: str, tags: Sequence[str]) -> tuple[int, str]:
    best, which = -1, ""
    for tag in tags:
        at = text.find(tag)
        if at != -1 and (best == -1 or at < best):
            best, which = at, tag
    return best, which


def partial_suffix(text: str, tags: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of one of `tags`."""
    best = 0
    for tag in tags:
        for length in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:length]):
                best = length
                break
    return best
