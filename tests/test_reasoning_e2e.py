"""Reasoning and the 2026 tool formats through a live server: the official `openai` client and
the OpenAI Agents SDK against (1) an engine that writes scripted Qwen3.5 / gpt-oss output behind
the real chat templates, and (2) the real embedded model with those templates swapped in, where
the forcing grammars make it write each format's own call syntax."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from localllm.engine.chat import ChatTemplate
from localllm.engine.handle import RequestHandle
from localllm.engine.types import FinishEvent, GenerationRequest, TextEvent, Usage
from localllm.server import create_app
from localllm.settings import Settings
from localllm.tools import ToolFormat, ToolSyntax, split_reasoning
from localllm.tools.formats import tool_syntax
from localllm.tools.reasoning import prompt_opens_reasoning
from tests.conftest import API_KEY, FakeEngine, UvicornThread

TEMPLATES = Path(__file__).parent / "data" / "templates"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    }
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def _template(name: str) -> ChatTemplate:
    source = (TEMPLATES / f"{name}.jinja").read_text()
    return ChatTemplate(source, bos_token="<bos>", eos_token="<eos>")


@dataclass
class ScriptedEngine(FakeEngine):
    """A real chat template; the answer is `script(prompt)`, one character per event."""

    template: ChatTemplate = field(default_factory=lambda: _template("Qwen3.5-4B"))
    script: Callable[[str], str] = lambda prompt: ""
    prompts: list[str] = field(default_factory=list)
    _syntax: ToolSyntax | None = None

    def tool_syntax(self) -> ToolSyntax:
        if self._syntax is None:
            self._syntax = tool_syntax(self.template)
        return self._syntax

    def chat_render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str, bool]:
        text = self.template.render(messages, tools=tools, extra=template_kwargs)
        return text, prompt_opens_reasoning(text, self.tool_syntax().reasoning)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        prompt = str(request.prompt)
        self.prompts.append(prompt)
        self.requests.append(request)
        text = self.script(prompt)
        handle = RequestHandle(f"scripted{len(self.requests)}", len(prompt), lambda: None)

        def run() -> None:
            for ch in text:
                handle._push(TextEvent(ch, ()))
            handle._push(FinishEvent("stop", Usage(len(prompt), len(text), 0), 0.01, 1.0, 1.0))

        threading.Thread(target=run, daemon=True).start()
        return handle


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedEngine, UvicornThread]]:
    engine = ScriptedEngine()
    app = create_app(Settings(api_keys=[API_KEY]), engine, model_id="qwen3.5")
    server = UvicornThread(app).start()
    yield engine, server
    server.stop()


QWEN_ANSWER = (
    "The user asks about Paris; I should call get_weather.\n</think>\n\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>"
)


def _qwen_script(prompt: str) -> str:
    if "<tool_response>" in prompt.rsplit("<|im_start|>user", 1)[-1]:
        return "The tool says it is sunny.\n</think>\n\nIt is 18 degrees and sunny in Paris."
    return QWEN_ANSWER


def test_openai_client_reads_reasoning_and_calls(
    scripted: tuple[ScriptedEngine, UvicornThread],
) -> None:
    engine, server = scripted
    engine.script = _qwen_script
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    response = client.chat.completions.create(
        model="qwen3.5",
        messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,
    )
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    assert (message.model_extra or {})["reasoning_content"] == (
        "The user asks about Paris; I should call get_weather."
    )
    assert message.content is None
    (call,) = message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert engine.prompts[-1].endswith("<|im_start|>assistant\n<think>\n")
    # Streamed: reasoning deltas, then the call, pieces adding up to the same.
    with client.chat.completions.stream(
        model="qwen3.5",
        messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,
    ) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    reasoning = "".join(
        (c.delta.model_extra or {}).get("reasoning_content") or ""
        for ch in chunks
        for c in ch.choices
    )
    assert reasoning == "The user asks about Paris; I should call get_weather."
    assert all(not c.delta.content for ch in chunks for c in ch.choices)
    (streamed,) = final.choices[0].message.tool_calls or []
    assert json.loads(streamed.function.arguments) == {"city": "Paris", "unit": "celsius"}
    # The answer's reasoning goes back with the call; the template keeps it for this turn.
    answer = client.chat.completions.create(
        model="qwen3.5",
        messages=[
            *QUESTION,
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "I should call get_weather.",
                "tool_calls": [call.model_dump()],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
        ],  # type: ignore[list-item]
        tools=TOOLS,
    )
    assert answer.choices[0].message.content == "It is 18 degrees and sunny in Paris."
    assert "<think>\nI should call get_weather.\n</think>" in engine.prompts[-1]
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in engine.prompts[-1]


def test_raw_reasoning_and_template_kwargs(scripted: tuple[ScriptedEngine, UvicornThread]) -> None:
    engine, server = scripted
    engine.script = lambda prompt: "Hmm.\n</think>\n\nParis."
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    raw = client.chat.completions.create(
        model="qwen3.5",
        messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"reasoning_format": "none"},
    )
    assert raw.choices[0].message.content == "Hmm.\n</think>\n\nParis."
    assert "reasoning_content" not in (raw.choices[0].message.model_extra or {})
    client.chat.completions.create(
        model="qwen3.5",
        messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert engine.prompts[-1].endswith("<think>\n\n</think>\n\n")
    # The prompt did not open a <think>: text without one is all answer.
    engine.script = lambda prompt: "Paris."
    off = client.chat.completions.create(
        model="qwen3.5",
        messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert off.choices[0].message.content == "Paris."


def test_json_answers_after_the_thinking(scripted: tuple[ScriptedEngine, UvicornThread]) -> None:
    """response_format with a prompt that opened <think>: the grammar lets the model close its
    thinking first, and the JSON is the content."""
    engine, server = scripted
    engine.script = lambda prompt: 'Plan the object.\n</think>\n\n{"city": "Paris"}'
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="qwen3.5",
        messages=QUESTION,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
    )
    message = reply.choices[0].message
    assert json.loads(message.content or "") == {"city": "Paris"}
    assert (message.model_extra or {})["reasoning_content"] == "Plan the object."
    grammar = engine.requests[-1].sampling.grammar or ""
    assert grammar.startswith('root ::= ([^<] | "<" [^/])* "</think>"')
    assert "\nanswer-root " in grammar


def test_bad_reasoning_fields_are_400_naming_them(
    scripted: tuple[ScriptedEngine, UvicornThread],
) -> None:
    _, server = scripted
    url = server.url + "/v1/chat/completions"
    cases = [
        ({"reasoning_effort": "high"}, "reasoning_effort"),  # Qwen3.5's template takes none
        ({"reasoning_effort": 2}, "reasoning_effort"),
        ({"reasoning_format": "verbose"}, "reasoning_format"),
        ({"chat_template_kwargs": "enable_thinking=false"}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
        ({"messages": [{"role": "assistant", "content": "x", "reasoning_content": 3}]}, None),
        (
            {"messages": [{"role": "user", "content": "x", "reasoning_content": "y"}]},
            "messages[0].reasoning_content",
        ),
    ]
    for fields, param in cases:
        body = {"model": "qwen3.5", "messages": QUESTION, **fields}
        response = httpx.post(url, headers=AUTH, json=body)
        assert response.status_code == 400, (fields, response.text)
        error = response.json()["error"]
        if param is not None:
            assert error["param"] == param, (fields, error)


def test_gpt_oss_channels_through_the_server(
    scripted: tuple[ScriptedEngine, UvicornThread],
) -> None:
    engine, server = scripted
    engine.template = _template("openai-gpt-oss-120b")
    engine.script = lambda prompt: (
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant"
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Paris", "unit": "celsius"}'
    )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    response = client.chat.completions.create(
        model="qwen3.5",
        messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,
        reasoning_effort="low",
    )
    assert "Reasoning: low" in engine.prompts[-1]
    message = response.choices[0].message
    assert (message.model_extra or {})["reasoning_content"] == "Need weather."
    (call,) = message.tool_calls or []
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert set(engine.requests[-1].keep_special) >= {"<|channel|>", "<|message|>", "<|end|>"}


def test_openai_agents_sdk_round_trip_with_a_qwen35_template(
    scripted: tuple[ScriptedEngine, UvicornThread],
) -> None:
    """The Agents SDK calls the tool the model asked for in Qwen3.5's XML syntax, sends the
    result back through the Qwen3.5 template, and reads the final answer."""
    import agents
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool

    engine, server = scripted
    engine.script = _qwen_script
    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def get_weather(city: str, unit: str) -> str:
        """The current weather in a city.

        Args:
            city: The city's name.
            unit: celsius or fahrenheit.
        """
        seen.append(f"{city}/{unit}")
        return f"18 degrees, sunny in {city}"

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer questions about the weather with the get_weather tool.",
        model=OpenAIChatCompletionsModel(model="qwen3.5", openai_client=client),
        tools=[get_weather],
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    assert seen == ["Paris/celsius"]
    assert result.final_output == "It is 18 degrees and sunny in Paris."
    assert "<tool_response>\n18 degrees, sunny in Paris\n</tool_response>" in engine.prompts[-1]


# ------------------------------------------------------------------ the real embedded model


@pytest.fixture
def swap_template(engine: Any) -> Iterator[Callable[[str], None]]:
    saved = engine.chat_template, engine._tool_syntax

    def use(name: str) -> None:
        engine.chat_template = _template(name)
        engine._tool_syntax = None

    yield use
    engine.chat_template, engine._tool_syntax = saved


@pytest.mark.model
@pytest.mark.parametrize(
    ("template", "fmt", "kwargs"),
    [
        ("Qwen3.5-4B", "qwen3_xml", {"enable_thinking": False}),
        ("GLM-4.7-Flash", "glm", {"enable_thinking": False}),
        ("deepseek-ai-DeepSeek-V3.1", "deepseek_v3_1", None),
        ("openai-gpt-oss-120b", "harmony", None),
    ],
)
def test_forced_calls_in_each_format_with_the_real_model(
    openai_client: openai.OpenAI,
    engine: Any,
    swap_template: Callable[[str], None],
    template: str,
    fmt: str,
    kwargs: dict[str, Any] | None,
) -> None:
    """Under the forcing grammar the embedded model writes each format's own call syntax; the
    server parses it back, and the call and its result go back through the same template."""
    swap_template(template)
    assert engine.tool_syntax().format == fmt
    extra = {"chat_template_kwargs": kwargs} if kwargs else None
    with openai_client.chat.completions.stream(
        model="gemma-3-270m",
        messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,  # the tiny model would go on calling until max_tokens
        temperature=0,
        max_tokens=140,  # DeepSeek's markers are many tokens in Gemma's vocabulary
        extra_body=extra,
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    answer = openai_client.chat.completions.create(
        model="gemma-3-270m",
        messages=[
            *QUESTION,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
        ],  # type: ignore[list-item]
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=8,
        extra_body=extra,
    )
    assert answer.choices[0].message.tool_calls is None


@pytest.mark.model
def test_llama_cpp_accepts_the_grammars_that_think_first(engine: Any) -> None:
    import llama_cpp

    from localllm.engine.grammar import json_object_grammar
    from localllm.tools import parse_tool_choice, parse_tools
    from localllm.tools.reasoning import reasoning_first

    tools = parse_tools(TOOLS)
    grammars = [reasoning_first(json_object_grammar())] + [
        ToolSyntax(fmt).grammar(tools, parse_tool_choice("required", tools), True, True) or ""
        for fmt in (ToolFormat.QWEN3_XML, ToolFormat.GLM, ToolFormat.DEEPSEEK, ToolFormat.HERMES)
    ]
    for grammar in grammars:
        sampler = llama_cpp.llama_sampler_init_grammar(
            engine.backend.vocab, grammar.encode(), b"root"
        )
        assert sampler, grammar
        llama_cpp.llama_sampler_free(sampler)


@pytest.mark.model
def test_real_model_reasoning_is_split_from_the_raw_text(
    openai_client: openai.OpenAI, swap_template: Callable[[str], None]
) -> None:
    """With Qwen3.5's template the prompt opens <think>: what the model writes is reasoning
    until it closes it. The split answer and the raw one (reasoning_format none) agree."""
    swap_template("Qwen3.5-4B")

    def ask(**extra: Any) -> Any:
        return (
            openai_client.chat.completions.create(
                model="gemma-3-270m",
                messages=QUESTION,  # type: ignore[arg-type]
                temperature=0,
                max_tokens=12,
                extra_body=extra or None,
            )
            .choices[0]
            .message
        )

    split, raw = ask(), ask(reasoning_format="none")
    reasoning = (split.model_extra or {}).get("reasoning_content") or ""
    assert reasoning or split.content
    assert split_reasoning(raw.content or "", opened=True) == (reasoning, split.content or "")
