"""Which tool-call syntax a model speaks, recognised from its chat template, and what the
template can render.

Recognition follows llama.cpp's `common/chat.cpp` (its checks on the template source before
the differential auto-parser took over): `<tool_call>` means Hermes 2 Pro / Qwen 2.5 JSON in
tags, unless the template uses Qwen3-Coder's XML parameters (`<function=`, `<parameter=`);
an `ipython` header means Llama 3.x (JSON calls, `<|python_tag|>` for built-in tools);
`[TOOL_CALLS]` means Mistral (a JSON list; `[ARGS]` in the template means the newer
`name[ARGS]{...}` form).
The formats of 2026 come first, by the same markers llama.cpp checks: `<|channel|>` is gpt-oss's
harmony (`to=functions.NAME` on the commentary channel), `<｜tool▁calls▁begin｜>` DeepSeek V3.1,
`<arg_key>` GLM-4.5/4.7, and `<function=` with `<parameter=` Qwen3-Coder's XML (also Qwen3.5
and Nemotron 3); see `localllm.tools.tagged` and `localllm.tools.harmony`. The template's
reasoning syntax (`<think>` or harmony's analysis channel) is recognised with them
(`localllm.tools.reasoning`).
Anything else, and any template that does not show the tools it is given (the embedded Gemma 3
270M has no template at all), uses localllm's generic format:

    system prompt: the tools' names, descriptions and parameter schemas, and how to call them
    a call:        {"tool_calls": [{"name": "<tool>", "arguments": {<arguments>}}, ...]}
    a result:      a user message {"tool_results": [{"name": "<tool>", "content": "<result>"}]}

What a template renders is found by probing it, as llama.cpp's (minja's) capability checks do:
render a conversation with a made-up tool, call and result, and look for them in the text.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from localllm.errors import ChatTemplateError
from localllm.tools.gbnf import gbnf_literal
from localllm.tools.reasoning import (
    THINK_GRAMMAR,
    ReasoningFormat,
    detect_reasoning,
    reasoning_markers,
)
from localllm.tools.schema import GrammarBuilder
from localllm.tools.spec import Tool, ToolChoice
from localllm.tools.tags import (
    DEEPSEEK_TOKENS,
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_SEP,
    GLM_TOKENS,
    XML_CLOSE,
    XML_OPEN,
    tagged_call_body,
    tagged_root,
)

if TYPE_CHECKING:  # the engine imports this package: no import back at run time
    from localllm.engine.chat import ChatTemplate

GENERIC_INSTRUCTIONS = (
    "You can call these tools (each with a JSON Schema for its arguments):\n{tools}\n\n"
    "To call one or more tools, answer with only this JSON object and nothing else:\n"
    '{{"tool_calls": [{{"name": "<tool name>", "arguments": {{<arguments>}}}}]}}\n'
    "Tool results come back in a message like "
    '{{"tool_results": [{{"name": "<tool name>", "content": "<result>"}}]}}. '
    "When no tool is needed, answer normally."
)


# DeepSeek V3.1's tool prompt, from its model card (its template renders no tools).
DEEPSEEK_INSTRUCTIONS = (
    "## Tools\nYou have access to the following tools:\n\n{tools}\n"
    "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments"
    "<｜tool▁call▁end｜>{{additional_tool_calls}}<｜tool▁calls▁end｜>\n\n"
    "Where:\n\n- `tool_call_name` must be an exact match to one of the available tools\n"
    "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters "
    "Schema\n- For multiple tool calls, chain them directly without separators or spaces"
)


class ToolFormat(StrEnum):
    HERMES = "hermes"  # <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, repeated
    LLAMA3 = "llama3"  # {"name": ..., "parameters": {...}}; <|python_tag|> for built-ins
    MISTRAL = "mistral"  # [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
    GENERIC = "generic"  # {"tool_calls": [{"name": ..., "arguments": {...}}]}: localllm's own
    QWEN3_XML = "qwen3_xml"  # <tool_call>\n<function=NAME>\n<parameter=K>\nV\n</parameter>...
    GLM = "glm"  # <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>
    HARMONY = "harmony"  # gpt-oss: <|channel|>commentary to=functions.NAME ...<|message|>{...}
    DEEPSEEK = "deepseek_v3_1"  # <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}


# Formats whose calls are tags around the name and arguments (localllm.tools.tagged).
TAGGED_FORMATS = frozenset({ToolFormat.QWEN3_XML, ToolFormat.GLM, ToolFormat.DEEPSEEK})


@dataclass(frozen=True)
class TemplateCaps:
    """What a chat template shows of the tool conversation it is given."""

    tools: bool = False  # the tool definitions
    tool_calls: bool = False  # assistant messages' tool_calls
    tool_responses: bool = False  # `tool` messages
    parallel_calls: bool = False  # several calls in one assistant message


@dataclass(frozen=True)
class ToolSyntax:
    """A model's tool-call syntax plus what its template renders."""

    format: ToolFormat
    caps: TemplateCaps = TemplateCaps()
    mistral_args: bool = False  # [TOOL_CALLS]name[ARGS]{...} (Mistral Small 3.2, Devstral)
    reasoning: ReasoningFormat = ReasoningFormat.NONE  # how the model's output shows thinking
    takes_reasoning_effort: bool = False  # the template reads `reasoning_effort` (gpt-oss)

    @property
    def reasoning_markers(self) -> tuple[str, ...]:
        """Reasoning markers the engine must keep in the output text, tools or not."""
        return reasoning_markers(self.reasoning)

    @property
    def preserved_tokens(self) -> tuple[str, ...]:
        """Control tokens that mark calls: the engine must keep them in the output text."""
        if self.format is ToolFormat.QWEN3_XML:
            return (XML_OPEN, XML_CLOSE)
        if self.format is ToolFormat.GLM:
            return GLM_TOKENS
        if self.format is ToolFormat.DEEPSEEK:
            return DEEPSEEK_TOKENS
        if self.format is ToolFormat.HARMONY:
            return reasoning_markers(ReasoningFormat.HARMONY)
        if self.format is ToolFormat.MISTRAL:
            return ("[TOOL_CALLS]", "[ARGS]") if self.mistral_args else ("[TOOL_CALLS]",)
        if self.format is ToolFormat.LLAMA3:
            return ("<|python_tag|>",)
        return ()

    def new_call_id(self, rng: random.Random | None = None) -> str:
        """A fresh call id; Mistral's templates insist on 9 letters and digits."""
        rng = rng or _ID_RNG
        alphabet = string.ascii_letters + string.digits
        if self.format is ToolFormat.MISTRAL:
            return "".join(rng.choice(alphabet) for _ in range(9))
        return "call_" + "".join(rng.choice(alphabet) for _ in range(24))

    def calls_text(self, calls: Sequence[tuple[str, Any]]) -> str:
        """How (name, arguments) calls look in this model's output."""
        if self.format is ToolFormat.HERMES:
            return "\n".join(
                f"<tool_call>\n{_dumps({'name': n, 'arguments': a})}\n</tool_call>"
                for n, a in calls
            )
        if self.format is ToolFormat.LLAMA3:
            return "; ".join(_dumps({"name": n, "parameters": a}) for n, a in calls)
        if self.format is ToolFormat.QWEN3_XML:
            return "\n".join(
                f"{XML_OPEN}\n<function={n}>\n"
                + "".join(f"<parameter={k}>\n{_text(v)}\n</parameter>\n" for k, v in a.items())
                + f"</function>\n{XML_CLOSE}"
                for n, a in calls
            )
        if self.format is ToolFormat.GLM:
            return "".join(
                f"{XML_OPEN}{n}"
                + "".join(
                    f"<arg_key>{k}</arg_key><arg_value>{_text(v)}</arg_value>" for k, v in a.items()
                )
                + XML_CLOSE
                for n, a in calls
            )
        if self.format is ToolFormat.DEEPSEEK:
            body = "".join(f"{DS_CALL_BEGIN}{n}{DS_SEP}{_dumps(a)}{DS_CALL_END}" for n, a in calls)
            return f"{DS_CALLS_BEGIN}{body}{DS_CALLS_END}"
        if self.format is ToolFormat.HARMONY:
            return "".join(
                f"<|channel|>commentary to=functions.{n} <|constrain|>json<|message|>{_dumps(a)}"
                for n, a in calls
            )
        if self.format is ToolFormat.MISTRAL:
            if self.mistral_args:
                return "".join(f"[TOOL_CALLS]{n}[ARGS]{_dumps(a)}" for n, a in calls)
            return "[TOOL_CALLS]" + _dumps([{"name": n, "arguments": a} for n, a in calls])
        return _dumps({"tool_calls": [{"name": n, "arguments": a} for n, a in calls]})

    def grammar(
        self,
        tools: Sequence[Tool],
        choice: ToolChoice,
        parallel: bool,
        reasoning_open: bool = False,
    ) -> str | None:
        """GBNF for a forced call (tool_choice required or named): only this syntax, only known
        tools, arguments that follow each tool's schema. None when nothing is forced.
        `reasoning_open`: the prompt opened a `<think>`, which the model closes first."""
        if not choice.forces_call:
            return None
        chosen = [t for t in tools if choice.mode != "named" or t.name == choice.name]
        multiple = (
            parallel
            and choice.mode == "required"
            and self.format not in (ToolFormat.LLAMA3, ToolFormat.HARMONY)
        )
        b = GrammarBuilder()
        if self.format in TAGGED_FORMATS or self.format is ToolFormat.HARMONY:
            bodies = [
                b.add(f"call-{t.name}", tagged_call_body(self.format, b, t, tools.index(t)))
                for t in chosen
            ]
            root = tagged_root(self.format, b.add("call", " | ".join(bodies)), multiple)
            if reasoning_open:
                root = f"{THINK_GRAMMAR} {root}"
            return b.render(root)
        calls = []
        for tool in chosen:
            index = tools.index(tool)
            args = b.schema(
                tool.parameters, f"{tool.name}-args", where=f"tools[{index}].function.parameters"
            )
            name = gbnf_literal(tool.name)
            fmt = self.format
            if fmt is ToolFormat.HERMES:
                body = (
                    f'"<tool_call>\\n{{\\"name\\": \\"" {name} "\\", \\"arguments\\": " {args} '
                    '"}\\n</tool_call>"'
                )
            elif fmt is ToolFormat.LLAMA3:
                body = f'"{{\\"name\\": \\"" {name} "\\", \\"parameters\\": " {args} "}}"'
            elif fmt is ToolFormat.MISTRAL and self.mistral_args:
                body = f'"[TOOL_CALLS]" {name} "[ARGS]" {args}'
            else:
                body = f'"{{\\"name\\": \\"" {name} "\\", \\"arguments\\": " {args} "}}"'
            calls.append(b.add(f"call-{tool.name}", body))
        call = b.add("call", " | ".join(calls))
        if self.format is ToolFormat.HERMES or (
            self.format is ToolFormat.MISTRAL and self.mistral_args
        ):
            sep = '"\\n"' if self.format is ToolFormat.HERMES else ""
            root = f"{call} ({sep} {call})*" if multiple else call
        else:
            listed = f'{call} (", " {call})*' if multiple else call
            if self.format is ToolFormat.MISTRAL:
                root = f'"[TOOL_CALLS][" {listed} "]"'
            elif self.format is ToolFormat.GENERIC:
                root = f'"{{\\"tool_calls\\": [" {listed} "]}}"'
            else:
                root = listed
        if reasoning_open:
            root = f"{THINK_GRAMMAR} {root}"
        return b.render(root)


_ID_RNG = random.SystemRandom()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _text(value: Any) -> str:
    """An XML argument's text: strings as they are, other values as JSON."""
    return value if isinstance(value, str) else _dumps(value)


def detect_format(source: str) -> tuple[ToolFormat, bool]:
    """(format, mistral_args) from a template's source, by llama.cpp's markers."""
    if "<|channel|>" in source:
        return ToolFormat.HARMONY, False
    # V3.1 writes NAME<｜tool▁sep｜>{json}; R1 and V3 wrote the type first (not handled here).
    if f"['name'] + '{DS_SEP}'" in source and "dsml_token" not in source:
        return ToolFormat.DEEPSEEK, False
    if "<tool_call>" in source and "<arg_key>" in source:
        return ToolFormat.GLM, False
    qwen3_coder_xml = "<function=" in source and "<parameter=" in source
    if "<tool_call>" in source and qwen3_coder_xml:
        return ToolFormat.QWEN3_XML, False
    if "<tool_call>" in source:
        return ToolFormat.HERMES, False
    if "<|start_header_id|>ipython<|end_header_id|>" in source:
        return ToolFormat.LLAMA3, False
    if "[TOOL_CALLS]" in source:
        return ToolFormat.MISTRAL, "[ARGS]" in source
    return ToolFormat.GENERIC, False


_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_tool_name",
        "description": "probe tool description",
        "parameters": {
            "type": "object",
            "properties": {"arg": {"type": "string", "description": "probe argument"}},
            "required": ["arg"],
        },
    },
}


def _probe_call(call_id: str, name: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": {"arg": "probe_value"}},
    }


def probe_caps(template: ChatTemplate) -> TemplateCaps:
    """Render made-up tools, calls and results and see which of them show in the prompt."""

    def shows(needle: str, *conversations: list[dict[str, Any]]) -> bool:
        # Several shapes: some templates insist on a final user turn, others on strict
        # alternation that a trailing user message after a call would break.
        for messages in conversations:
            try:
                text = template.render(messages, add_generation_prompt=False, tools=[_PROBE_TOOL])
            except ChatTemplateError:
                continue
            if needle in text:
                return True
        return False

    user = {"role": "user", "content": "probe question"}
    one_call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [_probe_call("call00001", "probe_call_name")],
    }
    two_calls = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            _probe_call("call00001", "probe_call_name"),
            _probe_call("call00002", "probe_call_other"),
        ],
    }
    result = {
        "role": "tool",
        "tool_call_id": "call00001",
        "name": "probe_call_name",
        "content": "probe_response_text",
    }
    after = {"role": "user", "content": "probe follow-up"}
    return TemplateCaps(
        tools=shows("probe_tool_name", [user]),
        tool_calls=shows("probe_call_name", [user, one_call], [user, one_call, after]),
        tool_responses=shows(
            "probe_response_text", [user, one_call, result], [user, one_call, result, after]
        ),
        parallel_calls=shows("probe_call_other", [user, two_calls], [user, two_calls, after]),
    )


def tool_syntax(template: ChatTemplate) -> ToolSyntax:
    """The syntax to use with this template: its own when it shows tools, else generic."""
    caps = probe_caps(template)
    fmt, mistral_args = detect_format(template.source)
    # DeepSeek V3.1's template shows no tools: its model card puts them in the system prompt
    # (render.py does), and the model still calls in its own syntax.
    if not caps.tools and fmt is not ToolFormat.DEEPSEEK:
        fmt, mistral_args = ToolFormat.GENERIC, False
    return ToolSyntax(
        format=fmt,
        caps=caps,
        mistral_args=mistral_args,
        reasoning=detect_reasoning(template.source),
        takes_reasoning_effort="reasoning_effort" in template.source,
    )
