"""Tool calling without a server: real chat templates (tests/data/templates, sources in its
README) render tools, calls and results; each format's output parses, whole and streamed; tool
and response schemas become grammars that llama.cpp accepts and that only produce valid JSON."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from localllm.engine.chat import ChatTemplate
from localllm.engine.types import GenerationRequest, SamplingParams
from localllm.errors import ChatTemplateError, RequestError, UnsupportedSchemaError
from localllm.tools.formats import (
    TAGGED_FORMATS,
    ToolFormat,
    ToolSyntax,
    detect_format,
    tool_syntax,
)
from localllm.tools.gbnf import repeat
from localllm.tools.parser import ContentDelta, ToolCallDelta, ToolCallParser, parse_output
from localllm.tools.render import mistral_call_id, render_prompt
from localllm.tools.schema import integer_range, json_schema_grammar
from localllm.tools.spec import check_messages, parse_tool_choice, parse_tools

TEMPLATES = Path(__file__).parent / "data" / "templates"
QWEN = "Qwen-Qwen2.5-7B-Instruct"
HERMES = "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use"
LLAMA = "meta-llama-Llama-3.1-8B-Instruct"
MISTRAL = "mistralai-Mistral-7B-Instruct-v0.3"
NEMO = "mistralai-Mistral-Nemo-Instruct-2407"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
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
        "description": "Local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_paris",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_rome",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_paris", "content": "18 C and sunny"},
    {"role": "tool", "tool_call_id": "call_rome", "content": "24 C and clear"},
]


def _template(name: str) -> ChatTemplate:
    source = (TEMPLATES / f"{name}.jinja").read_text()
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>", name=name)


def _gemma() -> ChatTemplate:
    return ChatTemplate.for_model(None, "gemma3", bos_token="<bos>", eos_token="<eos>")


def _ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"id{next(counter)}"


def _render(template: ChatTemplate, messages: list[dict[str, Any]] = HISTORY) -> str:
    tools = parse_tools([WEATHER, TIME])
    syntax = tool_syntax(template)
    return render_prompt(
        template, syntax, check_messages(messages), tools, parse_tool_choice(None, tools)
    )


# ----------------------------------------------------------------------------- recognition


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (QWEN, ToolFormat.HERMES),
        (HERMES, ToolFormat.HERMES),
        (LLAMA, ToolFormat.LLAMA3),
        (MISTRAL, ToolFormat.MISTRAL),
        (NEMO, ToolFormat.MISTRAL),
    ],
)
def test_each_template_is_recognised_with_what_it_renders(name: str, expected: ToolFormat) -> None:
    syntax = tool_syntax(_template(name))
    assert syntax.format is expected
    caps = syntax.caps
    assert caps.tools and caps.tool_calls and caps.tool_responses
    # Llama 3.1's template raises on two calls in one message; the others take them.
    assert caps.parallel_calls is (name != LLAMA)


def test_templates_without_tool_support_use_the_generic_format() -> None:
    assert tool_syntax(_gemma()).format is ToolFormat.GENERIC
    chatml = ChatTemplate.for_model(None, "unknown-arch", bos_token="", eos_token="")
    assert tool_syntax(chatml).format is ToolFormat.GENERIC
    # Qwen3-Coder's XML parameters are not Hermes JSON, even with <tool_call> in the source.
    assert detect_format("<tool_call><function=x><parameter=y>")[0] is ToolFormat.QWEN3_XML
    assert detect_format("[TOOL_CALLS]{{name}}[ARGS]") == (ToolFormat.MISTRAL, True)


# ----------------------------------------------------------------------------- rendering


def test_qwen_renders_tools_calls_and_results_in_its_own_format() -> None:
    prompt = _render(_template(QWEN))
    assert "# Tools" in prompt and '"name": "get_weather"' in prompt
    assert "You are terse." in prompt  # the system prompt stays, tools appended to it
    # Arguments are objects (the template writes them with tojson), both calls in one turn.
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    ) in prompt
    assert (
        "<|im_start|>user\n<tool_response>\n18 C and sunny\n</tool_response>\n"
        "<tool_response>\n24 C and clear\n</tool_response><|im_end|>"
    ) in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_hermes_renders_tools_calls_and_results() -> None:
    prompt = _render(_template(HERMES))
    assert "<tools>" in prompt and "get_weather(city: str, unit: str)" in prompt
    assert '{"name": "get_weather", "arguments": {"city": "Rome"}}' in prompt
    assert "<|im_start|>tool\n<tool_response>\n18 C and sunny\n</tool_response>" in prompt


def test_llama31_renders_one_call_per_message_and_ipython_results() -> None:
    prompt = _render(_template(LLAMA))
    assert "Environment: ipython" in prompt
    assert '"name": "get_time"' in prompt  # tools go into the first user message
    # Its template takes one call per message: the two calls become two assistant turns.
    assert prompt.count('{"name": "get_weather", "parameters": {"city": ') == 2
    assert prompt.count("<|start_header_id|>ipython<|end_header_id|>") == 2
    assert '"18 C and sunny"' in prompt


@pytest.mark.parametrize("name", [MISTRAL, NEMO])
def test_mistral_gets_nine_character_ids_that_match_their_results(name: str) -> None:
    prompt = _render(_template(name))
    assert "[AVAILABLE_TOOLS]" in prompt and "[TOOL_CALLS]" in prompt
    paris, rome = mistral_call_id("call_paris"), mistral_call_id("call_rome")
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", paris) and paris != rome
    assert f'"id": "{paris}"' in prompt and f'"call_id": "{paris}"' in prompt
    assert f'"id": "{rome}"' in prompt and f'"call_id": "{rome}"' in prompt
    assert "[TOOL_RESULTS]" in prompt and "24 C and clear" in prompt
    assert mistral_call_id("abcDEF123") == "abcDEF123"  # already valid: kept


def test_generic_format_for_a_model_without_a_template() -> None:
    prompt = _render(_gemma())
    assert "You can call these tools" in prompt and '"name": "get_time"' in prompt
    assert (
        '<start_of_turn>model\n{"tool_calls": [{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]}'
        "<end_of_turn>"
    ) in prompt
    # Both results in one user turn: Gemma's template insists on alternating roles.
    assert (
        '<start_of_turn>user\n{"tool_results": [{"name": "get_weather", "content": '
        '"18 C and sunny"}, {"name": "get_weather", "content": "24 C and clear"}]}'
    ) in prompt
    assert prompt.endswith("<start_of_turn>model\n")


def test_tool_choice_none_leaves_the_tools_out() -> None:
    tools = parse_tools([WEATHER])
    template = _template(QWEN)
    prompt = render_prompt(
        template,
        tool_syntax(template),
        check_messages([{"role": "user", "content": "Hi"}]),
        tools,
        parse_tool_choice("none", tools),
    )
    assert "get_weather" not in prompt and "# Tools" not in prompt


# ----------------------------------------------------------------------------- bad input


def test_bad_tools_and_tool_choice_are_request_errors_naming_the_field() -> None:
    cases: list[tuple[Any, str]] = [
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "tools[0].function.parameters",
        ),
    ]
    for tools, param in cases:
        with pytest.raises(RequestError) as info:
            parse_tools(tools)
        assert info.value.param == param
    tools = parse_tools([WEATHER])
    with pytest.raises(RequestError, match="not among the tools") as info:
        parse_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)
    assert info.value.param == "tool_choice"
    with pytest.raises(RequestError, match="needs tools"):
        parse_tool_choice("required", ())
    assert parse_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)


def test_a_tool_schema_the_grammar_cannot_enforce_is_refused() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"s": {"type": "string", "pattern": "^(?!admin)"}},
            },
        },
    }
    with pytest.raises(UnsupportedSchemaError, match="lookaround") as info:
        parse_tools([tool])
    assert info.value.param == "tools"


def test_tool_messages_must_answer_an_earlier_call() -> None:
    with pytest.raises(RequestError, match="answers no tool call") as info:
        check_messages(
            [
                {"role": "user", "content": "hi"},
                {"role": "tool", "tool_call_id": "call_x", "content": "42"},
            ]
        )
    assert info.value.param == "messages[1].tool_call_id"
    bad_arguments = [
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{"}}
            ],
        }
    ]
    with pytest.raises(RequestError, match="not valid JSON"):
        check_messages(bad_arguments)


def test_a_template_that_refuses_the_conversation_is_a_request_error() -> None:
    # Mistral's alternation check: two user turns in a row.
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="alternate"):
        _render(_template(MISTRAL), messages)


# ----------------------------------------------------------------------------- parsing

PARSE_CASES: list[tuple[ToolSyntax, str, str | None, list[tuple[str, dict[str, Any]]]]] = [
    (
        ToolSyntax(ToolFormat.HERMES),
        'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
        "</tool_call>",
        "Checking both.",
        [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})],
    ),
    (
        ToolSyntax(ToolFormat.HERMES),
        # Qwen sometimes puts arguments first: the name still goes out first.
        '<tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call>',
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    (
        ToolSyntax(ToolFormat.LLAMA3),
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
        [("get_weather", {"city": "Paris", "unit": "celsius"})],
    ),
    (
        ToolSyntax(ToolFormat.LLAMA3),
        '{"type": "function", "name": "get_time", "parameters": {"zone": "UTC"}}; '
        '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        None,
        [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome"})],
    ),
    (
        ToolSyntax(ToolFormat.LLAMA3),
        '<|python_tag|>brave_search.call(query="weather in Paris")',
        None,
        [("brave_search", {"query": "weather in Paris"})],
    ),
    (
        ToolSyntax(ToolFormat.MISTRAL),
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"},'
        ' {"name": "get_weather", "arguments": {"city": "Rome"}, "id": "f5g6h7i8j"}]',
        None,
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
    ),
    (
        ToolSyntax(ToolFormat.MISTRAL, mistral_args=True),
        'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        '[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
        "Sure.",
        [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})],
    ),
    (
        ToolSyntax(ToolFormat.GENERIC),
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"zone": "CET"}}]}',
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})],
    ),
    (
        ToolSyntax(ToolFormat.GENERIC),
        '```json\n{"tool_calls": [{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}]}'
        "\n```",
        None,
        [("get_time", {"zone": "UTC"})],  # arguments sent as a JSON string: decoded
    ),
    # Not calls: the text stays content.
    (ToolSyntax(ToolFormat.HERMES), "Use <tool_call> tags? No.", "Use <tool_call> tags? No.", []),
    (ToolSyntax(ToolFormat.LLAMA3), '{"answer": 42}', '{"answer": 42}', []),
    (ToolSyntax(ToolFormat.GENERIC), "It is sunny in Paris.", "It is sunny in Paris.", []),
    (ToolSyntax(ToolFormat.GENERIC), '{"tool_calls": 3}', '{"tool_calls": 3}', []),
]


def _stream(syntax: ToolSyntax, text: str, step: int) -> tuple[str, list[ToolCallDelta]]:
    parser = ToolCallParser(syntax, _ids())
    deltas = []
    for i in range(0, len(text), step):
        deltas += parser.feed(text[i : i + step])
    deltas += parser.finish()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    return content, [d for d in deltas if isinstance(d, ToolCallDelta)]


@pytest.mark.parametrize(("syntax", "text", "content", "calls"), PARSE_CASES)
def test_outputs_parse_into_content_and_calls(
    syntax: ToolSyntax, text: str, content: str | None, calls: list[tuple[str, Any]]
) -> None:
    parsed = parse_output(text, syntax, _ids())
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    assert [c.id for c in parsed.tool_calls] == [f"id{i}" for i in range(len(calls))]
    # Streamed in any piece size, the same answer comes out, as OpenAI streams it: each call
    # opens with index, id and name, then only argument pieces for that index.
    for step in (1, 3, 7, len(text)):
        streamed, deltas = _stream(syntax, text, step)
        assert streamed == (content or "")
        assembled: dict[int, dict[str, Any]] = {}
        for delta in deltas:
            if delta.index not in assembled:
                assert delta.id and delta.name and delta.arguments == ""
                assembled[delta.index] = {"name": delta.name, "arguments": ""}
            else:
                assert delta.id is None and delta.name is None
                assembled[delta.index]["arguments"] += delta.arguments
        assert sorted(assembled) == list(range(len(calls)))
        got = [(c["name"], json.loads(c["arguments"])) for c in assembled.values()]
        assert got == calls


def test_arguments_stream_in_pieces_before_the_call_ends() -> None:
    parser = ToolCallParser(ToolSyntax(ToolFormat.HERMES), _ids())
    assert parser.feed("<tool_c") == []  # could be an opener: held back
    deltas = parser.feed('all>\n{"name": "get_weather", "arguments": {"ci')
    assert deltas == [
        ToolCallDelta(0, "id0", "get_weather", ""),
        ToolCallDelta(0, arguments='{"ci'),
    ]
    assert parser.feed('ty": "Paris"}}\n</tool_call>') == [
        ToolCallDelta(0, arguments='ty": "Paris"}')
    ]
    assert parser.finish() == []


def test_a_call_cut_off_by_max_tokens_keeps_what_was_written() -> None:
    parsed = parse_output(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        ToolSyntax(ToolFormat.HERMES),
    )
    assert parsed.tool_calls[0].name == "get_weather"
    assert parsed.tool_calls[0].arguments == '{"city": "Par'


def test_call_ids() -> None:
    assert re.fullmatch(r"call_[a-zA-Z0-9]{24}", ToolSyntax(ToolFormat.HERMES).new_call_id())
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", ToolSyntax(ToolFormat.MISTRAL).new_call_id())


# ----------------------------------------------------------------------------- grammars


def test_unenforceable_schema_keywords_are_named() -> None:
    cases = {
        "lookaround": {"type": "string", "pattern": "^(?=a)[a-z]+$"},
        "back-references": {"type": "string", "pattern": "^(a)\\1$"},
        "multipleOf": {"type": "integer", "multipleOf": 3},
        "not": {"not": {"type": "string"}},
        "uniqueItems": {"type": "array", "uniqueItems": True},
        "minProperties": {"type": "object", "minProperties": 1},
        "'email'": {"type": "string", "format": "email"},
        "minimum on a number": {"type": "number", "minimum": 0.5},
        "only local references": {"$ref": "https://example.com/schema.json"},
    }
    for needle, schema in cases.items():
        with pytest.raises(UnsupportedSchemaError, match=re.escape(needle)) as info:
            json_schema_grammar({"type": "object", "properties": {"x": schema}})
        assert info.value.param == "response_format"
        assert "/properties/x" in str(info.value)


@pytest.mark.parametrize(
    ("low", "high"),
    [(5, 120), (0, 0), (1, 100000), (37, 4821), (-50, 50), (-1000, -7), (0, None), (123, None),
     (None, 10), (None, -5), (-3, None), (999, 1000)],
)  # fmt: skip
def test_integer_ranges_match_exactly_their_integers(low: int | None, high: int | None) -> None:
    # The GBNF here uses only literals, [x-y] classes, | and {m,n}: read as a regex it must
    # accept exactly the integers in the range, written the JSON way.
    pattern = re.compile("^(" + integer_range(low, high).replace('"', "").replace(" ", "") + ")$")
    for value in [*range(-2500, 2500), 99999, 100000, 100001, 10**9, -(10**9)]:
        inside = (low is None or value >= low) and (high is None or value <= high)
        assert bool(pattern.match(str(value))) == inside, value
    assert not pattern.match("007")


def test_repetition_bounds_stay_within_llamas_limit() -> None:
    assert repeat("c", 0, 30) == "(c){0,30}"
    assert repeat("c", 2, None) == "(c){2,}"
    # llama.cpp drops a bound above 2000 silently: long bounds are built from chunks.
    big = repeat("c", 0, 20000)
    assert all(int(n) <= 2000 for n in re.findall(r"\d+", big))


def _llama_accepts(engine: Any, grammar: str) -> bool:
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(engine.backend.vocab, grammar.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


SCHEMAS: dict[str, dict[str, Any]] = {
    "refs_enum_bounds": {
        "$defs": {
            "colour": {"enum": ["red", "green", "blue"]},
            "pet": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 10},
                    "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                    "colour": {"$ref": "#/$defs/colour"},
                },
                "required": ["name", "legs"],
                "additionalProperties": False,
            },
        },
        "type": "object",
        "properties": {
            "pets": {
                "type": "array",
                "items": {"$ref": "#/$defs/pet"},
                "minItems": 1,
                "maxItems": 2,
            },
            "owner": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]},
        },
        "required": ["pets", "owner"],
        "additionalProperties": False,
    },
    "recursive": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "boolean"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["v", "kids"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "long_string": {
        "type": "object",
        "properties": {"text": {"type": "string", "maxLength": 20000}},
        "required": ["text"],
    },
    "patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{2}$"},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
            "quote": {"type": "string", "pattern": '^say "[a-z\\\\]{1,5}"$'},
            "other": {"type": "string", "pattern": '^[^a-z"]{2}\\D\\S(?:x|yz)?$'},
        },
        "required": ["code", "email", "quote", "other"],
        "additionalProperties": False,
    },
    "formats_and_tuple": {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "pair": {
                "type": "array",
                "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 8}],
            },
            "score": {"type": "number"},
        },
        "required": ["when", "id", "pair"],
    },
}


@pytest.mark.model
def test_llama_cpp_accepts_every_schema_grammar(engine: Any) -> None:
    # The 20000-character bound is the case that crashed llama-cpp-python's own converter.
    for name, schema in SCHEMAS.items():
        assert _llama_accepts(engine, json_schema_grammar(schema)), name


@pytest.mark.model
@pytest.mark.parametrize("name", ["refs_enum_bounds", "formats_and_tuple", "patterns"])
def test_schema_grammars_only_generate_valid_documents(engine: Any, name: str) -> None:
    """What the model writes under the grammar validates (temperature 1: the tiny model tries
    the odd corners). One bounded document per schema: unbounded strings let it ramble."""
    schema = SCHEMAS[name]
    prompt = engine.apply_chat_template([{"role": "user", "content": "Answer in JSON."}])
    result = engine.submit(
        GenerationRequest(
            prompt=prompt,
            max_tokens=160,
            add_special=False,
            sampling=SamplingParams(temperature=1.0, seed=1, grammar=json_schema_grammar(schema)),
        )
    ).result()
    assert result.finish_reason == "stop", result.text
    jsonschema.validate(json.loads(result.text), schema)


@pytest.mark.model
@pytest.mark.parametrize(
    "fmt",
    # The tagged formats write strings as free text, which the tiny model does not end without
    # a maxLength: tests/test_reasoning_e2e.py runs them with bounded strings.
    [f for f in ToolFormat if f not in TAGGED_FORMATS and f is not ToolFormat.HARMONY],
)
def test_forced_tool_call_grammars_parse_and_validate(engine: Any, fmt: ToolFormat) -> None:
    """tool_choice required: under each format's grammar the tiny model writes calls that the
    same format's parser reads back, with arguments valid under the tool's schema. (With
    parallel calls allowed the 270M model keeps calling until max_tokens, so generation runs
    with one call; the parallel grammar is only checked to load.)"""
    syntax = ToolSyntax(fmt)
    tools = parse_tools([WEATHER, TIME])
    parallel = syntax.grammar(tools, parse_tool_choice("required", tools), parallel=True)
    assert parallel is not None and _llama_accepts(engine, parallel)
    grammar = syntax.grammar(tools, parse_tool_choice("required", tools), parallel=False)
    assert grammar is not None and _llama_accepts(engine, grammar)
    prompt = render_prompt(
        _gemma(),
        ToolSyntax(ToolFormat.GENERIC),
        check_messages([{"role": "user", "content": "What's the weather in Paris?"}]),
        tools,
        parse_tool_choice("required", tools),
    )
    result = engine.submit(
        GenerationRequest(
            prompt=prompt,
            max_tokens=96,
            add_special=False,
            sampling=SamplingParams(temperature=0.8, seed=7, grammar=grammar),
        )
    ).result()
    assert result.finish_reason == "stop", result.text
    parsed = parse_output(result.text, syntax)
    assert parsed.tool_calls and parsed.content is None, result.text
    schemas = {t.name: t.parameters for t in tools}
    for call in parsed.tool_calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    named = syntax.grammar(
        tools,
        parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools),
        parallel=True,
    )
    assert named is not None and "get_weather" not in named


@pytest.mark.model
def test_control_tokens_named_in_keep_special_stay_in_the_text(engine: Any) -> None:
    """Mistral's [TOOL_CALLS] and Llama's <|python_tag|> are control tokens, which print as
    nothing; the parser needs to see them. Gemma's <start_of_turn> stands in for them."""
    marker = "<start_of_turn>"
    (token,) = engine.tokenize(marker, add_special=False, parse_special=True)
    grammar = f'root ::= <[{token}]> "ok"'  # forces the control token itself

    def run(keep: tuple[str, ...]) -> str:
        request = GenerationRequest(
            prompt="Say ok",
            max_tokens=8,
            keep_special=keep,
            sampling=SamplingParams(temperature=0, grammar=grammar),
        )
        return str(engine.submit(request).result().text)

    assert run(()) == "ok"
    assert run((marker, "not one token")) == marker + "ok"


def test_role_specific_tool_fields_are_checked() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(RequestError, match="only assistant messages") as info:
        check_messages([{"role": "user", "content": "hi", "tool_calls": [call]}])
    assert info.value.param == "messages[0].tool_calls"
    with pytest.raises(RequestError, match="only tool messages") as info:
        check_messages([{"role": "user", "content": "hi", "tool_call_id": "c1"}])
    assert info.value.param == "messages[0].tool_call_id"


def _shaper(parallel: bool) -> Any:
    from localllm.server.chat.serving import ChatShaper
    from localllm.tools import ToolUse

    use = ToolUse.from_request(ToolSyntax(ToolFormat.HERMES), [WEATHER], "auto", parallel)
    return ChatShaper(
        id="chatcmpl-1", created=0, model="m", extra=None, logprobs=False,
        tool_use=use, parser=use.parser(),
    )  # fmt: skip


TWO_CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
)


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_false_keeps_one_call(parallel: bool) -> None:
    """Without a grammar (tool_choice auto) a model may write two calls; with
    parallel_tool_calls false only the first is answered, streamed or not."""
    from localllm.engine.types import FinishEvent, TextEvent, Usage

    finish = FinishEvent("stop", Usage(10, 20), 0.1, 100.0, 50.0)
    body = _shaper(parallel).complete(TWO_CALLS, [], finish).model_dump(exclude_none=True)
    message = body["choices"][0]["message"]
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == (
        ['{"city": "Paris"}', '{"city": "Rome"}'] if parallel else ['{"city": "Paris"}']
    )
    assert message["content"] is None and body["choices"][0]["finish_reason"] == "tool_calls"
    shaper = _shaper(parallel)
    chunks = [shaper.text_chunk(TextEvent(TWO_CALLS[i : i + 9])) for i in range(0, 200, 9)]
    chunks.append(shaper.finish_chunk(finish))
    indices = {
        piece["index"]
        for chunk in chunks
        if chunk is not None
        for piece in chunk.model_dump(exclude_none=True)["choices"][0]["delta"].get(
            "tool_calls", []
        )
    }
    assert indices == ({0, 1} if parallel else {0})


_KEYWORDS = [
    "type", "properties", "required", "items", "prefixItems", "enum", "const", "anyOf",
    "oneOf", "allOf", "$ref", "$defs", "minItems", "maxItems", "minLength", "maxLength",
    "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "additionalProperties",
    "uniqueItems", "not", "title",
]  # fmt: skip


def _schemas() -> Any:
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(["string", "object", "array", "integer", "number", "#", "#/$defs/a"]),
        st.text(max_size=8),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.sampled_from([*_KEYWORDS, "a", "b"]), inner, max_size=4),
        ),
        max_leaves=20,
    )


def test_any_schema_is_a_grammar_or_a_request_error() -> None:
    """Whatever a client sends as a schema: a grammar, or a RequestError (a 400), never a
    crash of another kind (a 500)."""
    from hypothesis import given, settings

    @settings(max_examples=400, deadline=None, database=None)
    @given(_schemas())
    def check(schema: Any) -> None:
        try:
            grammar = json_schema_grammar(schema)
        except RequestError:
            return
        assert grammar.startswith("root ::= ")

    check()


def test_any_pattern_is_a_grammar_or_a_request_error() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    alphabet = st.sampled_from(list("ab^$|()[]{}?*+.\\-dDwWsSx0123456789,:!=<>P\"'u"))

    @settings(max_examples=600, deadline=None, database=None)
    @given(st.text(alphabet, max_size=14))
    def check(pattern: str) -> None:
        try:
            json_schema_grammar({"type": "string", "pattern": pattern})
        except RequestError:
            return

    check()
