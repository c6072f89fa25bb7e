"""Chat messages to a prompt string, with the model's own template or a known fallback.

A GGUF's `tokenizer.chat_template` is code from the model file (CVE-2024-34359 was remote code
execution through an unsandboxed render), so it runs in jinja2's ImmutableSandboxedEnvironment:
no attribute of Python internals, no mutation of passed-in objects. Any failure to compile or
render becomes `ChatTemplateError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localllm.errors import ChatTemplateError

Message = Mapping[str, Any]

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


class ChatTemplate:
    """A compiled chat template plus the special token strings it needs."""

    def __init__(
        self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "model"
    ) -> None:
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template ({name}) does not compile: {exc}") from None

    @classmethod
    def for_model(
        cls, template: str | None, architecture: str, *, bos_token: str, eos_token: str
    ) -> ChatTemplate:
        """The model's template, else its architecture's known format, else ChatML."""
        if template:
            return cls(template, bos_token=bos_token, eos_token=eos_token, name="model")
        fallback = FALLBACK_BY_ARCHITECTURE.get(architecture)
        if fallback is not None:
            return cls(fallback, bos_token=bos_token, eos_token=eos_token, name=architecture)
        return cls(CHATML_TEMPLATE, bos_token=bos_token, eos_token=eos_token, name="chatml")

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=list(tools) if tools else None,
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError) as exc:
            # SecurityError (a hostile template) is a TemplateError: nothing ran.
            raise ChatTemplateError(
                f"chat template ({self.name}) failed: {type(exc).__name__}: {exc}"
            ) from None
