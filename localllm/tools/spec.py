"""The request side of tool calling: tools, tool_choice and the messages that carry calls and
results, checked once into immutable records. Every problem is a `RequestError` naming the field
(the server answers 400 with it)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from localllm.errors import RequestError
from localllm.tools.schema import GrammarBuilder

# OpenAI's rule for function names; the grammar and the parsers rely on it too.
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    """One function tool: its name, description and JSON Schema for the arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(EMPTY_PARAMETERS))

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI tool object, as chat templates expect to find it in `tools`."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = dict(self.parameters)
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """auto: the model decides; none: no calls; required: at least one call; named: exactly one
    call to `name`."""

    mode: Literal["auto", "none", "required", "named"]
    name: str | None = None

    @property
    def forces_call(self) -> bool:
        return self.mode in ("required", "named")


@dataclass(frozen=True)
class ToolCall:
    """A call the model made (or made earlier, in the history): arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parse_tools(tools: Sequence[Any] | None) -> tuple[Tool, ...]:
    """The request's `tools`, checked: function tools with unique, valid names and parameter
    schemas a grammar can enforce (so `tool_choice` required can always be honoured)."""
    if tools is None:
        return ()
    if not isinstance(tools, list | tuple):
        raise RequestError("tools must be a list of tool objects", param="tools")
    parsed: list[Tool] = []
    seen: set[str] = set()
    for i, raw in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(raw, Mapping):
            raise RequestError(f"{where} must be an object", param=where)
        if raw.get("type", "function") != "function":
            raise RequestError(
                f"{where}.type {raw.get('type')!r} is not supported; only 'function' tools",
                param=f"{where}.type",
            )
        function = raw.get("function")
        if not isinstance(function, Mapping):
            raise RequestError(f"{where}.function must be an object", param=f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise RequestError(
                f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                param=f"{where}.function.name",
            )
        if name in seen:
            raise RequestError(
                f"{where}.function.name {name!r} is used by two tools; names must be unique",
                param=f"{where}.function.name",
            )
        seen.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise RequestError(
                f"{where}.function.description must be a string",
                param=f"{where}.function.description",
            )
        parameters = function.get("parameters")
        if parameters is None:
            parameters = dict(EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise RequestError(
                f"{where}.function.parameters must be a JSON Schema object",
                param=f"{where}.function.parameters",
            )
        if parameters.get("type", "object") != "object":
            raise RequestError(
                f"{where}.function.parameters must describe an object (type 'object'), "
                f"not {parameters.get('type')!r}",
                param=f"{where}.function.parameters",
            )
        # Compile now: an unenforceable schema is refused before anything is generated.
        GrammarBuilder().schema(parameters, "args", where=f"{where}.function.parameters")
        parsed.append(Tool(name=name, description=description, parameters=parameters))
    return tuple(parsed)


def parse_tool_choice(value: Any, tools: Sequence[Tool]) -> ToolChoice:
    """`tool_choice` as OpenAI defines it; the default is auto with tools and none without."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise RequestError(
                f"tool_choice {value!r} is not one of 'auto', 'none', 'required' or "
                '{"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        if value == "required" and not tools:
            raise RequestError("tool_choice 'required' needs tools", param="tool_choice")
        if value == "auto" and not tools:
            return ToolChoice("none")
        return ToolChoice(value)  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        function = value.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if value.get("type") != "function" or not isinstance(name, str):
            raise RequestError(
                'tool_choice must be {"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        names = [t.name for t in tools]
        if name not in names:
            raise RequestError(
                f"tool_choice names the function {name!r}, which is not among the tools "
                f"({', '.join(names) or 'none given'})",
                param="tool_choice",
            )
        return ToolChoice("named", name)
    raise RequestError("tool_choice must be a string or an object", param="tool_choice")


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the OpenAI API carries them, checked for tool use: an assistant message's
    `tool_calls` are function calls with JSON-object arguments; each `tool` message answers a
    call made earlier. Returns plain dicts (None values dropped: templates test `is defined`)."""
    checked: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # id -> function name, for calls made so far
    for i, raw in enumerate(messages):
        message = {k: v for k, v in raw.items() if v is not None}
        role = message.get("role")
        if "tool_calls" in message and role != "assistant":
            raise RequestError(
                f"messages[{i}] (role {role}) has tool_calls; only assistant messages make calls",
                param=f"messages[{i}].tool_calls",
            )
        if "tool_call_id" in message and role != "tool":
            raise RequestError(
                f"messages[{i}] (role {role}) has a tool_call_id; only tool messages answer calls",
                param=f"messages[{i}].tool_call_id",
            )
        if role == "assistant" and "tool_calls" in message:
            tool_calls = message["tool_calls"]
            if not isinstance(tool_calls, list):
                raise RequestError(
                    f"messages[{i}].tool_calls must be a list", param=f"messages[{i}].tool_calls"
                )
            normalized = []
            for j, call in enumerate(tool_calls):
                normalized.append(_check_call(call, f"messages[{i}].tool_calls[{j}]"))
                calls[normalized[-1]["id"]] = normalized[-1]["function"]["name"]
            if normalized:
                message["tool_calls"] = normalized
            else:
                del message["tool_calls"]
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(
                    f"messages[{i}] (role tool) needs the tool_call_id of the call it answers",
                    param=f"messages[{i}].tool_call_id",
                )
            if call_id not in calls:
                raise RequestError(
                    f"messages[{i}].tool_call_id {call_id!r} answers no tool call made in an "
                    "earlier assistant message",
                    param=f"messages[{i}].tool_call_id",
                )
            message.setdefault("name", calls[call_id])
        checked.append(message)
    return checked


def _check_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise RequestError(f"{where} must be an object", param=where)
    if call.get("type", "function") != "function":
        raise RequestError(f"{where}.type must be 'function'", param=f"{where}.type")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise RequestError(f"{where}.id must be a non-empty string", param=f"{where}.id")
    function = call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise RequestError(f"{where}.function needs a name", param=f"{where}.function")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise RequestError(
                f"{where}.function.arguments is not valid JSON: {exc}",
                param=f"{where}.function.arguments",
            ) from None
    if not isinstance(arguments, dict):
        raise RequestError(
            f"{where}.function.arguments must be a JSON object",
            param=f"{where}.function.arguments",
        )
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }
