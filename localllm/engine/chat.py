"""Chat messages to a prompt string, with the model's own template or a known fallback.

A GGUF's `tokenizer.chat_template` is code from the model file (CVE-2024-34359 was remote code
execution through an unsandboxed render), so it runs in jinja2's ImmutableSandboxedEnvironment:
no attribute of Python internals, no mutation of passed-in objects. Any failure to compile or
render becomes `ChatTemplateError`.

A hostile template must not hold the server either: a render stops after RENDER_TIMEOUT_S (a
trace hook on the template's own code, so loops and macros are interrupted), a string, list or
number the template builds by `*`, `+` or `**` beyond `max_chars` is refused before it is built,
and the output stops at `max_chars`. Renders run on worker threads, never on the event loop.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import FrameType
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localllm.errors import ChatTemplateError

Message = Mapping[str, Any]

RENDER_TIMEOUT_S = 2.0  # renders of real templates take milliseconds
DEFAULT_MAX_CHARS = 16 * 1024 * 1024
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")  # private-use marks around a message number

# ChatML: the most common convention, the fallback for architectures we know nothing about.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format (as in Google's template for Gemma 2/3): roles user and model, the system
# prompt folded into the first user turn, BOS once at the start.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

FALLBACK_BY_ARCHITECTURE = {
    "gemma": GEMMA_TEMPLATE,
    "gemma2": GEMMA_TEMPLATE,
    "gemma3": GEMMA_TEMPLATE,
}


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, **_ignored: Any) -> str:
    # HF's tojson keeps non-ASCII as is; jinja2's default escapes HTML characters.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, refusing to build values larger than `max_chars` with operators."""

    intercepted_binops = frozenset({"*", "+", "**"})
    max_chars = DEFAULT_MAX_CHARS

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        size = _result_size(operator, left, right)
        if size > self.max_chars:
            raise SecurityError(
                f"the template builds a value of about {size} characters, over the limit of "
                f"{self.max_chars}"
            )
        return super().call_binop(context, operator, left, right)


def _result_size(operator: str, left: Any, right: Any) -> int:
    sized = (str, list, tuple)
    if operator == "*":
        if isinstance(left, sized) and isinstance(right, int):
            return len(left) * right
        if isinstance(right, sized) and isinstance(left, int):
            return len(right) * left
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        return len(left) + len(right)
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        return abs(left).bit_length() * right // 3  # decimal digits, roughly
    return 0


class ChatTemplate:
    """A compiled chat template plus the special token strings it needs."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        name: str = "model",
        max_chars: int = DEFAULT_MAX_CHARS,
        timeout_s: float = RENDER_TIMEOUT_S,
    ) -> None:
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.max_chars = max_chars
        self.timeout_s = timeout_s
        env = _LimitedSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.max_chars = max_chars
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template ({name}) does not compile: {exc}") from None

    @classmethod
    def for_model(
        cls,
        template: str | None,
        architecture: str,
        *,
        bos_token: str,
        eos_token: str,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> ChatTemplate:
        """The model's template, else its architecture's known format, else ChatML."""
        source, name = template, "model"
        if not source:
            source = FALLBACK_BY_ARCHITECTURE.get(architecture)
            name = architecture
        if not source:
            source, name = CHATML_TEMPLATE, "chatml"
        return cls(source, bos_token=bos_token, eos_token=eos_token, name=name, max_chars=max_chars)

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """`extra`: more template variables (a request's chat_template_kwargs, reasoning_effort);
        they cannot replace the ones below."""
        context = {
            **(extra or {}),
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "tools": list(tools) if tools else None,
        }
        try:
            return self._render_limited(context)
        except ChatTemplateError:
            raise
        except (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            AttributeError,
            KeyError,
            IndexError,
            ArithmeticError,
            RecursionError,
            MemoryError,
        ) as exc:
            # SecurityError (a hostile template) is a TemplateError: nothing ran.
            raise ChatTemplateError(
                f"chat template ({self.name}) failed: {type(exc).__name__}: {exc}"
            ) from None

    def render_parts(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> list[tuple[str, bool]] | None:
        """The rendered prompt cut into (text, is_message_content) pieces, or None when the
        template transforms contents beyond recognition (other than trimming them).

        Renders twice: with each string content replaced by a numbered placeholder, which shows
        the template's own text around each content, then for real, which is matched against it.
        """
        marked = [
            {**m, "content": f"\ue000{i}\ue001"} if isinstance(m.get("content"), str) else m
            for i, m in enumerate(messages)
        ]
        full = self.render(messages, tools=tools, extra=extra)
        try:
            skeleton = self.render(marked, tools=tools, extra=extra)
        except ChatTemplateError:
            return None
        pieces = _PLACEHOLDER.split(skeleton)  # template, index, template, index, ..., template
        parts: list[tuple[str, bool]] = []
        at = 0
        for n in range(0, len(pieces) - 1, 2):
            template_text, index, following = pieces[n], int(pieces[n + 1]), pieces[n + 2]
            if index >= len(messages) or not full.startswith(template_text, at):
                return None
            parts.append((template_text, False))
            at += len(template_text)
            content = str(messages[index]["content"])
            for candidate in dict.fromkeys(
                (content, content.strip(), content.lstrip(), content.rstrip())
            ):
                end = at + len(candidate)
                if full.startswith(candidate, at) and full.startswith(following, end):
                    parts.append((candidate, True))
                    at = end
                    break
            else:
                return None
        if full[at:] != pieces[-1]:
            return None
        parts.append((pieces[-1], False))
        return [(text, is_content) for text, is_content in parts if text]

    def _render_limited(self, context: dict[str, Any]) -> str:
        deadline = time.monotonic() + self.timeout_s
        chunks: list[str] = []
        size = 0
        previous = sys.gettrace()
        sys.settrace(_deadline_tracer(deadline, self.timeout_s, self.name))
        try:
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > self.max_chars:
                    raise ChatTemplateError(
                        f"chat template ({self.name}) wrote more than {self.max_chars} "
                        "characters; no context holds such a prompt"
                    )
                chunks.append(chunk)
        finally:
            sys.settrace(previous)
        return "".join(chunks)


def _deadline_tracer(deadline: float, timeout_s: float, name: str) -> Callable[..., Any]:
    """A trace function that stops the template's own code (compiled from "<template>") once
    the deadline passes; other code runs untraced."""

    def line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise ChatTemplateError(
                f"chat template ({name}) ran longer than {timeout_s:g} s and was stopped"
            )
        return line

    def call(frame: FrameType, event: str, arg: Any) -> Any:
        return line if frame.f_code.co_filename == "<template>" else None

    return call
