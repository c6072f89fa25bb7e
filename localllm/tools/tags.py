"""The tags of the tagged tool-call formats (Qwen3-Coder XML, GLM-4.x, DeepSeek V3.1; see
`localllm.tools.tagged` for how they look) and the GBNF grammars of forced calls in each
format's own syntax, gpt-oss's harmony included."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from localllm.tools.gbnf import gbnf_literal, repeat
from localllm.tools.schema import GrammarBuilder
from localllm.tools.spec import Tool

XML_OPEN, XML_CLOSE = "<tool_call>", "</tool_call>"
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
DS_SEP = "<｜tool▁sep｜>"
GLM_TOKENS = (XML_OPEN, XML_CLOSE, "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
DEEPSEEK_TOKENS = (DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END, DS_SEP)


def is_string_schema(schema: Any) -> bool:
    """Whether a parameter's schema only admits strings (its XML text is the value)."""
    if not isinstance(schema, Mapping):
        return False
    if schema.get("type") == "string":
        return True
    values = schema.get("enum")
    return isinstance(values, list) and bool(values) and all(isinstance(v, str) for v in values)


def tool_properties(tool: Tool) -> Mapping[str, Any]:
    properties = tool.parameters.get("properties")
    return properties if isinstance(properties, Mapping) else {}


_TEXT_CHAR = "[^<]"  # XML values are text without "<": the closing tag cannot be mistaken


def xml_value_rule(b: GrammarBuilder, schema: Any, hint: str, where: str) -> str:
    """A rule for one XML argument's text: plain text for strings (enum values as they are),
    JSON for everything else, under the schema."""
    if isinstance(schema, Mapping) and is_string_schema(schema):
        values = schema.get("enum")
        if isinstance(values, list):
            return b.add(hint, " | ".join(gbnf_literal(v) for v in values))
        if "const" in schema and isinstance(schema["const"], str):
            return b.add(hint, gbnf_literal(schema["const"]))
        if not set(schema) & {"pattern", "format"}:
            low = schema.get("minLength", 0)
            high = schema.get("maxLength")
            low = low if isinstance(low, int) else 0
            high = high if isinstance(high, int) else None
            return b.add(hint, repeat(_TEXT_CHAR, low, high) or '""')
    return b.schema(schema, hint, where=where)


def xml_arguments_rule(
    b: GrammarBuilder, tool: Tool, where: str, one: Callable[[str, str], str]
) -> str:
    """The arguments of a call in XML form: declared parameters in schema order, required ones
    always, optional ones maybe; `one(key_literal, value_rule)` writes a parameter."""
    properties = tool_properties(tool)
    required = tool.parameters.get("required") or []
    parts = []
    for key, schema in properties.items():
        value = xml_value_rule(b, schema, f"{tool.name}-{key}-value", f"{where}.properties.{key}")
        rule = b.add(f"{tool.name}-{key}-param", one(gbnf_literal(key), value))
        parts.append(rule if key in required else f"{rule}?")
    return " ".join(parts) or '""'


def tagged_call_body(fmt: str, b: GrammarBuilder, tool: Tool, index: int) -> str:
    """GBNF for one call to `tool` in format `fmt` (qwen3_xml, glm, deepseek_v3_1, harmony)."""
    where = f"tools[{index}].function.parameters"
    name = gbnf_literal(tool.name)
    if fmt == "qwen3_xml":
        args = xml_arguments_rule(
            b, tool, where, lambda k, v: f'"<parameter=" {k} ">\\n" {v} "\\n</parameter>\\n"'
        )
        return f'"<tool_call>\\n<function=" {name} ">\\n" {args} "</function>\\n</tool_call>"'
    if fmt == "glm":
        args = xml_arguments_rule(
            b,
            tool,
            where,
            lambda k, v: f'"<arg_key>" {k} "</arg_key><arg_value>" {v} "</arg_value>"',
        )
        return f'"<tool_call>" {name} {args} "</tool_call>"'
    args = b.schema(tool.parameters, f"{tool.name}-args", where=where)
    if fmt == "deepseek_v3_1":
        return f"{gbnf_literal(DS_CALL_BEGIN)} {name} {gbnf_literal(DS_SEP)} {args} " + (
            gbnf_literal(DS_CALL_END)
        )
    # harmony: the call on the commentary channel, as gpt-oss writes it
    return f'"<|channel|>commentary to=functions." {name} " <|constrain|>json<|message|>" {args}'


def tagged_root(fmt: str, call: str, multiple: bool) -> str:
    """The root of a forced-call grammar from the rule for one call."""
    if fmt == "deepseek_v3_1":
        calls = f"{call}+" if multiple else call
        return f"{gbnf_literal(DS_CALLS_BEGIN)} {calls} {gbnf_literal(DS_CALLS_END)}"
    if fmt == "harmony":
        # gpt-oss may reason first: an analysis message (without "<|"), then the call.
        return (
            '("<|channel|>analysis<|message|>" ([^<] | "<" [^|])* "<|end|><|start|>assistant")? '
            + call
        )
    sep = '"\\n"' if fmt == "qwen3_xml" else '"\\n"?'
    return f"{call} ({sep} {call})*" if multiple else call
