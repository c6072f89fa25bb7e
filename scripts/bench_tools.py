"""Forced tool calls from the embedded Gemma 3 270M: how many parse and validate, and how fast.

For each tool-call format, N seeds at temperature 1 (the tiny model's worst behaviour) with
tool_choice required: the answer is parsed by the format's parser and the arguments validated
against the tool's schema with jsonschema. Also: the same without the grammar (the generic
format's instructions only), to show what the grammar buys.

    .venv/bin/python scripts/bench_tools.py [--seeds 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema

from localllm.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from localllm.models import embedded_model_path
from localllm.tools import ToolFormat, ToolSyntax, ToolUse, parse_output

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 40},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 14},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
]
SCHEMA = TOOLS[0]["function"]["parameters"]  # type: ignore[index]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris this week?"}]


def valid(text: str, syntax: ToolSyntax) -> bool:
    parsed = parse_output(text, syntax)
    if len(parsed.tool_calls) != 1 or parsed.tool_calls[0].name != "get_weather":
        return False
    try:
        jsonschema.validate(json.loads(parsed.tool_calls[0].arguments), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    config = EngineConfig(
        model_path=embedded_model_path(Path("models")),
        n_ctx=2048,
        n_parallel=1,
        n_threads=args.threads,
    )
    with Engine.load(config) as engine:
        generic = engine.tool_syntax()
        use = ToolUse.from_request(generic, TOOLS, "required", False)
        messages, tools = use.template_input(MESSAGES)
        prompt = engine.chat_prompt(messages, tools)
        print(f"{'format':<10} {'grammar':<8} {'valid':>7} {'tok/s':>7} {'s/call':>7}")
        for fmt in ToolFormat:
            syntax = ToolSyntax(fmt)
            grammar = ToolUse(syntax, use.tools, use.choice, False).grammar()
            runs = [(True, grammar)] + ([(False, None)] if fmt is ToolFormat.GENERIC else [])
            for constrained, g in runs:
                ok, speeds, seconds = 0, [], []
                for seed in range(args.seeds):
                    start = time.perf_counter()
                    result = engine.submit(
                        GenerationRequest(
                            prompt=prompt,
                            max_tokens=96,
                            add_special=False,
                            sampling=SamplingParams(temperature=1.0, seed=seed, grammar=g),
                        )
                    ).result()
                    seconds.append(time.perf_counter() - start)
                    speeds.append(result.decode_tokens_per_s)
                    ok += valid(result.text, syntax)
                print(
                    f"{fmt.value:<10} {'yes' if constrained else 'no':<8} "
                    f"{ok:>3}/{args.seeds:<3} {sum(speeds) / len(speeds):>7.1f} "
                    f"{sum(seconds) / len(seconds):>7.2f}"
                )


if __name__ == "__main__":
    main()
