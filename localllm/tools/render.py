"""Tools, calls and results into the model's own chat template, or into the generic format
where the template does not show them (see `localllm.tools.formats`)."""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from localllm.tools.formats import (
    DEEPSEEK_INSTRUCTIONS,
    GENERIC_INSTRUCTIONS,
    ToolFormat,
    ToolSyntax,
)
from localllm.tools.spec import Tool, ToolChoice

if TYPE_CHECKING:  # the engine imports this package: no import back at run time
    from localllm.engine.chat import ChatTemplate

_MISTRAL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_BASE62 = string.digits + string.ascii_letters


def mistral_call_id(call_id: str) -> str:
    """Mistral's templates refuse any id but 9 letters and digits; OpenAI clients send their
    own ids (call_...). Map each one to a stable 9-character id, so a call and its result still
    match after the mapping."""
    if _MISTRAL_ID.match(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        number, digit = divmod(number, 62)
        chars.append(_BASE62[digit])
    return "".join(chars)


def generic_tools_prompt(tools: Sequence[Tool]) -> str:
    listed = "\n".join(
        json.dumps(
            {"name": t.name, "description": t.description, "parameters": t.parameters},
            ensure_ascii=False,
        )
        for t in tools
    )
    return GENERIC_INSTRUCTIONS.format(tools=listed)


def deepseek_tools_prompt(tools: Sequence[Tool]) -> str:
    listed = "".join(
        f"### {t.name}\nDescription: {t.description}\n\n"
        f"Parameters: {json.dumps(t.parameters, ensure_ascii=False)}\n\n"
        for t in tools
    )
    return DEEPSEEK_INSTRUCTIONS.format(tools=listed)


def template_messages(
    messages: Sequence[Mapping[str, Any]],
    syntax: ToolSyntax,
    tools: Sequence[Tool],
    choice: ToolChoice,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to hand the template. `messages` were checked by
    `spec.check_messages` and carry text content."""
    generic = syntax.format is ToolFormat.GENERIC
    out: list[dict[str, Any]] = []
    show_tools = bool(tools) and choice.mode != "none"
    in_system = syntax.format is ToolFormat.DEEPSEEK and not syntax.caps.tools
    if show_tools and (generic or in_system):
        instructions = generic_tools_prompt(tools) if generic else deepseek_tools_prompt(tools)
        if messages and messages[0].get("role") == "system":
            first = dict(messages[0])
            first["content"] = f"{first.get('content') or ''}\n\n{instructions}".lstrip()
            messages = [first, *messages[1:]]
        else:
            messages = [{"role": "system", "content": instructions}, *messages]
    pending_results: list[dict[str, Any]] = []

    def flush_results() -> None:
        if pending_results:
            content = json.dumps({"tool_results": pending_results}, ensure_ascii=False)
            out.append({"role": "user", "content": content})
            pending_results.clear()

    for raw in messages:
        message = dict(raw)
        role = message.get("role")
        if role == "tool" and (generic or not syntax.caps.tool_responses):
            pending_results.append(
                {"name": message.get("name", ""), "content": message.get("content") or ""}
            )
            continue
        flush_results()
        if message.get("content") is None:
            message["content"] = ""  # templates concatenate content without checking it
        if role == "assistant" and "tool_calls" in message:
            calls = message["tool_calls"]
            if generic or not syntax.caps.tool_calls:
                text = syntax.calls_text(
                    [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
                )
                content = message["content"]
                message["content"] = f"{content}\n{text}" if content else text
                del message["tool_calls"]
                out.append(message)
                continue
            if syntax.format is ToolFormat.MISTRAL:
                message["tool_calls"] = [{**c, "id": mistral_call_id(c["id"])} for c in calls]
            if syntax.format is ToolFormat.QWEN3_XML:
                # Its templates write scalars with `| string`: Python's True/None are not JSON.
                message["tool_calls"] = [_json_scalars(c) for c in calls]
            if len(calls) > 1 and not syntax.caps.parallel_calls:
                # Llama 3.1's template takes one call per message: one message per call.
                for call in message["tool_calls"]:
                    out.append({**message, "tool_calls": [call]})
                continue
        elif role == "tool" and syntax.format is ToolFormat.MISTRAL:
            message["tool_call_id"] = mistral_call_id(message["tool_call_id"])
        out.append(message)
    flush_results()
    shown = show_tools and not generic and not in_system
    template_tools = [t.as_openai() for t in tools] if shown else None
    if template_tools and syntax.format is ToolFormat.HARMONY:
        # gpt-oss's template adds the description to a string: undefined would fail.
        for tool in template_tools:
            tool["function"].setdefault("description", "")
    return out, template_tools


def _json_scalars(call: Mapping[str, Any]) -> dict[str, Any]:
    arguments = call["function"]["arguments"]
    fixed = {
        k: json.dumps(v) if v is None or isinstance(v, bool) else v for k, v in arguments.items()
    }
    return {**call, "function": {**call["function"], "arguments": fixed}}


def render_prompt(
    template: ChatTemplate,
    syntax: ToolSyntax,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Tool] = (),
    choice: ToolChoice | None = None,
) -> str:
    """The prompt for a chat with tools (ChatTemplateError when the template refuses it)."""
    choice = choice or ToolChoice("auto" if tools else "none")
    rendered, template_tools = template_messages(messages, syntax, tools, choice)
    return template.render(rendered, add_generation_prompt=True, tools=template_tools)
