"""Reasoning and the tool-call formats of 2026 (Qwen3.5 / Qwen3-Coder XML, GLM-4.7, gpt-oss
harmony, DeepSeek V3.1) with their real chat templates: recognised, rendered with tools,
reasoning and history, and parsed whole and streamed, cut at every character."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from localllm.engine.chat import GEMMA_TEMPLATE, ChatTemplate
from localllm.errors import RequestError
from localllm.tools import (
    ContentDelta,
    OutputParser,
    ReasoningDelta,
    ReasoningFormat,
    ReasoningSplitter,
    ToolCallDelta,
    ToolFormat,
    ToolSyntax,
    ToolUse,
    parse_tool_choice,
    parse_tools,
    split_reasoning,
)
from localllm.tools.formats import tool_syntax
from localllm.tools.parser import Delta
from localllm.tools.reasoning import check_reasoning_request, prompt_opens_reasoning

TEMPLATES = Path(__file__).parent / "data" / "templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
TOOLS = parse_tools([WEATHER, TIME])
AUTO = parse_tool_choice("auto", TOOLS)


def _template(name: str) -> ChatTemplate:
    return ChatTemplate(
        (TEMPLATES / f"{name}.jinja").read_text(), bos_token="<s>", eos_token="</s>"
    )


def _ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"call_{next(counter)}"


@pytest.mark.parametrize(
    ("name", "fmt", "reasoning"),
    [
        ("Qwen3.5-4B", ToolFormat.QWEN3_XML, ReasoningFormat.THINK),
        ("Qwen3-Coder", ToolFormat.QWEN3_XML, ReasoningFormat.NONE),
        ("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", ToolFormat.QWEN3_XML, ReasoningFormat.THINK),
        ("GLM-4.7-Flash", ToolFormat.GLM, ReasoningFormat.THINK),
        ("openai-gpt-oss-120b", ToolFormat.HARMONY, ReasoningFormat.HARMONY),
        ("deepseek-ai-DeepSeek-V3.1", ToolFormat.DEEPSEEK, ReasoningFormat.THINK),
        ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", ToolFormat.GENERIC, ReasoningFormat.THINK),
        ("Qwen-Qwen3-0.6B", ToolFormat.HERMES, ReasoningFormat.THINK),
        ("google-gemma-2-2b-it", ToolFormat.GENERIC, ReasoningFormat.NONE),
        ("google-gemma-4-31B-it", ToolFormat.GENERIC, ReasoningFormat.NONE),
    ],
)
def test_formats_and_reasoning_are_recognised_from_the_template(
    name: str, fmt: ToolFormat, reasoning: ReasoningFormat
) -> None:
    syntax = tool_syntax(_template(name))
    assert (syntax.format, syntax.reasoning) == (fmt, reasoning)
    assert syntax.takes_reasoning_effort == (name == "openai-gpt-oss-120b")


# ------------------------------------------------------------------------------ rendering

HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "The user wants weather; call the tool.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
]


def _render(name: str, messages: list[dict[str, Any]], **extra: Any) -> tuple[str, bool]:
    template = _template(name)
    use = ToolUse.from_request(tool_syntax(template), [WEATHER, TIME], "auto", None)
    rendered, tools = use.template_input(messages)
    prompt = template.render(rendered, tools=tools, extra=extra or None)
    return prompt, prompt_opens_reasoning(prompt, use.syntax.reasoning)


def test_qwen35_renders_tools_calls_results_and_pending_reasoning() -> None:
    prompt, opened = _render("Qwen3.5-4B", HISTORY)
    assert '"name": "get_weather"' in prompt  # the tools, in the system turn
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" in prompt
    assert "<parameter=days>\n2\n</parameter>" in prompt
    assert "<tool_response>\n18 degrees\n</tool_response>" in prompt
    # The reasoning of the call still being answered goes back (after the last user turn).
    assert "<think>\nThe user wants weather; call the tool.\n</think>" in prompt
    assert opened and prompt.endswith("<|im_start|>assistant\n<think>\n")
    closed, opened = _render("Qwen3.5-4B", HISTORY, enable_thinking=False)
    assert not opened and closed.endswith("<think>\n\n</think>\n\n")


def test_earlier_turns_reasoning_is_dropped_where_the_template_drops_it() -> None:
    later = [
        *HISTORY,
        {"role": "assistant", "content": "It is 18 degrees.", "reasoning_content": "Say it."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    for name in ("Qwen3.5-4B", "GLM-4.7-Flash"):
        prompt, _ = _render(name, later)
        assert "Say it." not in prompt and "It is 18 degrees." in prompt, name
    prompt, _ = _render("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", later)
    assert "It is 18 degrees." in prompt


def test_gpt_oss_gets_effort_and_keeps_the_analysis_of_a_pending_call() -> None:
    prompt, opened = _render("openai-gpt-oss-120b", HISTORY, reasoning_effort="high")
    assert "Reasoning: high" in prompt and not opened
    assert "<|start|>assistant<|channel|>analysis<|message|>The user wants weather" in prompt
    assert "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>" in (
        prompt
    )
    assert "<|start|>functions.get_weather to=assistant" in prompt
    assert prompt.endswith("<|start|>assistant")
    # Once the call is answered with a final message, its analysis is dropped.
    done = [*HISTORY, {"role": "assistant", "content": "18 degrees."}]
    done += [{"role": "user", "content": "Thanks"}]
    prompt, _ = _render("openai-gpt-oss-120b", done)
    assert "The user wants weather" not in prompt


def test_glm_and_deepseek_render_their_own_call_syntax() -> None:
    prompt, opened = _render("GLM-4.7-Flash", HISTORY)
    assert "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>" in prompt
    assert "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>" in prompt
    assert opened and prompt.endswith("<|assistant|><think>")
    assert not _render("GLM-4.7-Flash", HISTORY, enable_thinking=False)[1]
    prompt, opened = _render("deepseek-ai-DeepSeek-V3.1", HISTORY)
    # Its template shows no tools: they go in the system prompt as its model card writes them.
    assert prompt.startswith("<s>Be brief.\n\n## Tools\n") and "### get_weather" in prompt
    assert (
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", '
        '"days": 2}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    ) in prompt
    assert "<｜tool▁output▁begin｜>18 degrees<｜tool▁output▁end｜>" in prompt
    assert not opened  # thinking is off unless asked for
    question = [{"role": "user", "content": "Hi"}]
    assert _render("deepseek-ai-DeepSeek-V3.1", question, thinking=True)[1]


def test_reasoning_request_fields_are_checked() -> None:
    def check(**fields: Any) -> dict[str, Any]:
        values = {"reasoning_format": None, "reasoning_effort": None, "chat_template_kwargs": None}
        values.update(fields)
        return check_reasoning_request(
            values["reasoning_format"],
            values["reasoning_effort"],
            values["chat_template_kwargs"],
            takes_effort=bool(fields.pop("effort_ok", True)),
        )

    assert check(reasoning_effort="low") == {"reasoning_effort": "low"}
    assert check(chat_template_kwargs={"enable_thinking": False}) == {"enable_thinking": False}
    bad: list[tuple[dict[str, Any], str]] = [
        ({"reasoning_format": "loud"}, "reasoning_format"),
        ({"reasoning_effort": 3}, "reasoning_effort"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"not a name": 1}}, "chat_template_kwargs"),
    ]
    for fields, param in bad:
        with pytest.raises(RequestError) as caught:
            check(**fields)
        assert caught.value.param == param, fields
    with pytest.raises(RequestError, match="takes no reasoning_effort"):
        check_reasoning_request(None, "high", None, takes_effort=False)


# ------------------------------------------------------------------------------ parsing


def _cuts(text: str) -> Iterator[list[str]]:
    """The text whole, cut in two at every character, and one character at a time."""
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    yield list(text)


def _run(make: Callable[[], Any], pieces: list[str]) -> tuple[list[Delta], Any]:
    parser = make()
    deltas: list[Delta] = []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    return deltas, parser


def _summary(deltas: list[Delta], parser: Any) -> tuple[str, str, list[tuple[str, Any]]]:
    reasoning = "".join(d.text for d in deltas if isinstance(d, ReasoningDelta))
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls = [(c.name, json.loads(c.arguments)) for c in parser.tool_calls]
    # The streamed pieces add up to the calls: headers first, then argument text.
    streamed: dict[int, list[str]] = {}
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            if d.id is not None:
                assert d.index == len(streamed) and d.name
                streamed[d.index] = []
            streamed[d.index].append(d.arguments)
    assert ["".join(v) for v in streamed.values()] == [c.arguments for c in parser.tool_calls]
    return reasoning, content, calls


def test_think_splits_whole_and_streamed_at_every_cut() -> None:
    cases = [
        (
            "<think>\nLet me see.\n\nYes.\n</think>\n\nParis.",
            False,
            "Let me see.\n\nYes.",
            "Paris.",
        ),
        ("Let me see.\n</think>\n\nParis.", True, "Let me see.", "Paris."),
        ("  Paris, no thinking.", False, "", "  Paris, no thinking."),
        ("Paris <think>is</think> here.", False, "", "Paris <think>is</think> here."),
        ("cut off while thinking </thi", True, "cut off while thinking </thi", ""),
        ("<think></think>Paris.", False, "", "Paris."),
        ("<think>\nagain\n</think>\nParis.", True, "again", "Paris."),
        ("<thinking is fun</think>Paris.", True, "<thinking is fun", "Paris."),
    ]
    for text, opened, reasoning, content in cases:
        assert split_reasoning(text, opened=opened) == (reasoning, content), text
        for pieces in _cuts(text):
            splitter = ReasoningSplitter(opened=opened)
            parts = [splitter.feed(p) for p in pieces] + [splitter.finish()]
            got = ("".join(r for r, _ in parts), "".join(c for _, c in parts))
            assert got == (reasoning, content), pieces


HARMONY_ANSWER = (
    "<|channel|>analysis<|message|>User asks weather. Use tool.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>It is 18 degrees."
)
HARMONY_CALL = (
    "<|channel|>analysis<|message|>Need the tool.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris", "days": 2}'
)


def test_harmony_splits_channels_whole_and_streamed() -> None:
    assert split_reasoning(HARMONY_ANSWER, ReasoningFormat.HARMONY) == (
        "User asks weather. Use tool.",
        "It is 18 degrees.",
    )
    syntax = ToolSyntax(ToolFormat.HARMONY, reasoning=ReasoningFormat.HARMONY)
    cases = [
        (HARMONY_ANSWER, ("User asks weather. Use tool.", "It is 18 degrees.", [])),
        (
            HARMONY_CALL,
            ("Need the tool.", "", [("get_weather", {"city": "Paris", "days": 2})]),
        ),
        (  # the recipient in the role header, as the template renders earlier calls
            "<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.get_time"
            '<|channel|>commentary json<|message|>{"zone": "UTC"}',
            ("x", "", [("get_time", {"zone": "UTC"})]),
        ),
        (  # a preamble on the commentary channel is content
            "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant"
            "<|channel|>final<|message|>Done.",
            ("", "Checking.Done.", []),
        ),
    ]
    for text, expected in cases:
        for pieces in _cuts(text):
            result = _summary(*_run(lambda: OutputParser(syntax, TOOLS, new_id=_ids()), pieces))
            assert result == expected, pieces


def test_raw_reasoning_leaves_the_text_in_the_content() -> None:
    syntax = ToolSyntax(ToolFormat.QWEN3_XML, reasoning=ReasoningFormat.THINK)
    text = "<think>hm</think>Paris."
    deltas, parser = _run(lambda: OutputParser(syntax, raw_reasoning=True), [text])
    assert _summary(deltas, parser) == ("", text, [])
    deltas, parser = _run(
        lambda: OutputParser(
            ToolSyntax(ToolFormat.HARMONY, reasoning=ReasoningFormat.HARMONY), raw_reasoning=True
        ),
        [HARMONY_ANSWER],
    )
    assert _summary(deltas, parser)[1].startswith("<|channel|>analysis<|message|>User asks")


QWEN_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
CALLS: list[tuple[ToolFormat, ReasoningFormat, bool, str, tuple[str, str, list[Any]]]] = [
    (
        ToolFormat.QWEN3_XML,
        ReasoningFormat.THINK,
        True,
        "The user asks.\n</think>\n\n" + QWEN_CALL,
        ("The user asks.", "", [("get_weather", {"city": "New York", "days": 3})]),
    ),
    (  # Qwen3.5 forgetting </think> before its call: the call still ends the reasoning
        ToolFormat.QWEN3_XML,
        ReasoningFormat.THINK,
        True,
        "Think.\n" + QWEN_CALL,
        ("Think.", "", [("get_weather", {"city": "New York", "days": 3})]),
    ),
    (
        ToolFormat.QWEN3_XML,
        ReasoningFormat.NONE,
        False,
        "Let me check.\n\n" + QWEN_CALL + "\n<tool_call>\n<function=get_time>\n</function>\n"
        "</tool_call>",
        (
            "",
            "Let me check.",
            [("get_weather", {"city": "New York", "days": 3}), ("get_time", {})],
        ),
    ),
    (  # Qwen3-Coder leaving out <tool_call> and </tool_call>
        ToolFormat.QWEN3_XML,
        ReasoningFormat.NONE,
        False,
        "<function=get_time>\n<parameter=zone>\nUTC\n</parameter>\n</function>\nDone.",
        ("", "\nDone.", [("get_time", {"zone": "UTC"})]),
    ),
    (
        ToolFormat.GLM,
        ReasoningFormat.THINK,
        True,
        "Weather.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris"
        "</arg_value><arg_key>unit</arg_key><arg_value>celsius</arg_value></tool_call>",
        ("Weather.", "", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ),
    (  # values on several lines, a newline at the end included
        ToolFormat.GLM,
        ReasoningFormat.NONE,
        False,
        "<tool_call>get_time<arg_key>zone</arg_key><arg_value>\nUTC\n\n</arg_value></tool_call>",
        ("", "", [("get_time", {"zone": "\nUTC\n\n"})]),
    ),
    (
        ToolFormat.QWEN3_XML,
        ReasoningFormat.NONE,
        False,
        "<tool_call>\n<function=get_time>\n<parameter=zone>\nU\nTC\n\n</parameter>\n"
        "</function>\n</tool_call>",
        ("", "", [("get_time", {"zone": "U\nTC\n"})]),
    ),
    (  # GLM-4.5's newlines between the parts
        ToolFormat.GLM,
        ReasoningFormat.THINK,
        False,
        "<think>w</think>\nOK.\n<tool_call>get_time\n<arg_key>zone</arg_key>\n"
        "<arg_value>UTC</arg_value>\n</tool_call>",
        ("w", "OK.", [("get_time", {"zone": "UTC"})]),
    ),
    (
        ToolFormat.DEEPSEEK,
        ReasoningFormat.THINK,
        False,
        "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>'
        '{"zone": "CET"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        ("", "Sure.", [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    ),
    (
        ToolFormat.HERMES,
        ReasoningFormat.THINK,
        False,
        '<think>\nok\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": '
        '{"zone": "UTC"}}\n</tool_call>',
        ("ok", "", [("get_time", {"zone": "UTC"})]),
    ),
]


@pytest.mark.parametrize(("fmt", "reasoning", "opened", "text", "expected"), CALLS)
def test_calls_parse_whole_and_streamed_at_every_cut(
    fmt: ToolFormat,
    reasoning: ReasoningFormat,
    opened: bool,
    text: str,
    expected: tuple[str, str, list[Any]],
) -> None:
    syntax = ToolSyntax(fmt, reasoning=reasoning)
    for pieces in _cuts(text):
        deltas, parser = _run(
            lambda: OutputParser(syntax, TOOLS, reasoning_open=opened, new_id=_ids()), pieces
        )
        assert _summary(deltas, parser) == expected, pieces


@pytest.mark.parametrize("fmt", [ToolFormat.QWEN3_XML, ToolFormat.GLM, ToolFormat.DEEPSEEK])
def test_calls_text_parses_back(fmt: ToolFormat) -> None:
    syntax = ToolSyntax(fmt)
    calls = [("get_weather", {"city": "Lyon", "days": 1}), ("get_time", {"zone": "UTC"})]
    deltas, parser = _run(lambda: OutputParser(syntax, TOOLS), [syntax.calls_text(calls)])
    assert _summary(deltas, parser) == ("", "", calls)


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (ToolFormat.HERMES, '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'),
        (ToolFormat.GENERIC, '{"tool_calls": [{"name": "rm_rf", "arguments": {}}]}'),
        (ToolFormat.QWEN3_XML, "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>"),
        (ToolFormat.GLM, "<tool_call>rm_rf</tool_call>"),
        (
            ToolFormat.DEEPSEEK,
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>rm_rf<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
            "<｜tool▁calls▁end｜>",
        ),
        (
            ToolFormat.HARMONY,
            "<|channel|>commentary to=functions.rm_rf <|constrain|>json<|message|>{}",
        ),
    ],
)
def test_a_call_to_an_undeclared_function_is_content(fmt: ToolFormat, text: str) -> None:
    reasoning = ReasoningFormat.HARMONY if fmt is ToolFormat.HARMONY else ReasoningFormat.NONE
    syntax = ToolSyntax(fmt, reasoning=reasoning)
    for pieces in _cuts(text):
        deltas, parser = _run(lambda: OutputParser(syntax, TOOLS), pieces)
        reasoning_text, content, calls = _summary(deltas, parser)
        assert calls == [] and "rm_rf" in content, pieces


def test_a_ref_loop_in_a_tool_schema_is_reported_as_tools() -> None:
    looped = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"x": {"$ref": "#/$defs/a"}},
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}]}},
            },
        },
    }
    with pytest.raises(RequestError) as caught:
        parse_tools([looped])
    assert caught.value.param == "tools" and "loop" in str(caught.value)
    # Recursion through an object is fine: something is written before it recurs.
    tree = {
        "type": "object",
        "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}},
    }
    parse_tools([{"type": "function", "function": {"name": "t", "parameters": tree}}])


def test_forced_call_grammars_in_each_format() -> None:
    required = parse_tool_choice("required", TOOLS)
    named = parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, TOOLS)
    for fmt in (ToolFormat.QWEN3_XML, ToolFormat.GLM, ToolFormat.DEEPSEEK, ToolFormat.HARMONY):
        syntax = ToolSyntax(fmt)
        grammar = syntax.grammar(TOOLS, required, parallel=True)
        assert grammar is not None and "get_weather" in grammar and "get_time" in grammar
        only = syntax.grammar(TOOLS, named, parallel=False)
        assert only is not None and "get_weather" not in only
        opened = syntax.grammar(TOOLS, required, parallel=False, reasoning_open=True)
        assert opened is not None and '"</think>"' in opened
    qwen = ToolSyntax(ToolFormat.QWEN3_XML).grammar(TOOLS, named, parallel=False) or ""
    assert '"<tool_call>\\n<function=" "get_time" ">\\n"' in qwen
    glm = ToolSyntax(ToolFormat.GLM).grammar(TOOLS, required, parallel=False) or ""
    assert '"celsius" | "fahrenheit"' in glm  # an enum parameter's text, unquoted


def test_gemma_fallback_has_no_reasoning() -> None:
    syntax = tool_syntax(ChatTemplate(GEMMA_TEMPLATE))
    assert syntax.reasoning is ReasoningFormat.NONE
    use = ToolUse.from_request(syntax, None, None, None)
    assert use.parser() is None and use.keep_special == ()
