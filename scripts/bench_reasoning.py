"""What parsing reasoning and tool calls costs per streamed piece, for each 2026 format.

An answer of REASONING_CHARS of reasoning and one call whose string argument holds ARG_CHARS, fed
in pieces of 4 characters (about a token each), through the same parser the server uses; prints
the microseconds per piece and per character. A call region is re-read on every piece (see
localllm.tools.tagged), so a long argument costs more per piece than reasoning does.

    .venv/bin/python scripts/bench_reasoning.py [--reasoning-chars 20000] [--arg-chars 4000]
"""

from __future__ import annotations

import argparse
import json
import time

from localllm.tools import OutputParser, ReasoningFormat, ToolFormat, ToolSyntax, parse_tools

TOOLS = parse_tools(
    [
        {
            "type": "function",
            "function": {
                "name": "write_file",
                "parameters": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "text": {"type": "string"}},
                    "required": ["path", "text"],
                },
            },
        }
    ]
)


def answer(fmt: ToolFormat, reasoning: str, text: str) -> tuple[ToolSyntax, str, bool]:
    args = {"path": "notes.txt", "text": text}
    if fmt is ToolFormat.HARMONY:
        syntax = ToolSyntax(fmt, reasoning=ReasoningFormat.HARMONY)
        out = f"<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant"
        return syntax, out + syntax.calls_text([("write_file", args)]), False
    syntax = ToolSyntax(fmt, reasoning=ReasoningFormat.THINK)
    return syntax, f"{reasoning}\n</think>\n\n" + syntax.calls_text([("write_file", args)]), True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reasoning-chars", type=int, default=20000)
    parser.add_argument("--arg-chars", type=int, default=4000)
    args = parser.parse_args()
    sentence, code = "Let me think about this step by step. ", "def f(x):\n    return x * 2\n"
    reasoning = (sentence * (args.reasoning_chars // len(sentence) + 1))[: args.reasoning_chars]
    text = (code * (args.arg_chars // len(code) + 1))[: args.arg_chars]
    print(f"{'format':<14} {'pieces':>7} {'us/piece':>9} {'us/char':>8}  ok")
    for fmt in (
        ToolFormat.QWEN3_XML,
        ToolFormat.GLM,
        ToolFormat.DEEPSEEK,
        ToolFormat.HARMONY,
        ToolFormat.HERMES,
    ):
        syntax, out, opened = answer(fmt, reasoning, text)
        pieces = [out[i : i + 4] for i in range(0, len(out), 4)]
        start = time.perf_counter()
        output = OutputParser(syntax, TOOLS, reasoning_open=opened)
        for piece in pieces:
            output.feed(piece)
        output.finish()
        seconds = time.perf_counter() - start
        (call,) = output.tool_calls
        ok = json.loads(call.arguments)["text"] == text
        print(
            f"{fmt.value:<14} {len(pieces):>7} {seconds / len(pieces) * 1e6:>9.1f} "
            f"{seconds / len(out) * 1e6:>8.2f}  {ok}"
        )


if __name__ == "__main__":
    main()
