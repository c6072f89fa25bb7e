"""One chat request's tool use, resolved against the model's syntax: what the template gets,
the grammar that forces a call, the control tokens the output must keep, and the parser for
the answer.
The HTTP layer builds one from the request body and asks it everything else."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localllm.errors import RequestError
from localllm.tools.formats import ToolSyntax
from localllm.tools.output import OutputParser, needs_output_parser
from localllm.tools.reasoning import history_for_template
from localllm.tools.render import template_messages
from localllm.tools.spec import Tool, ToolChoice, check_messages, parse_tool_choice, parse_tools


@dataclass(frozen=True)
class ToolUse:
    """The tools, tool_choice and parallel_tool_calls of one request, checked."""

    syntax: ToolSyntax
    tools: tuple[Tool, ...]
    choice: ToolChoice
    parallel: bool

    @classmethod
    def from_request(
        cls,
        syntax: ToolSyntax,
        tools: Sequence[Any] | None,
        tool_choice: Any,
        parallel_tool_calls: bool | None,
        *,
        constrained_output: bool = False,
    ) -> ToolUse:
        """`constrained_output`: response_format already constrains the answer, which cannot
        also be a forced call."""
        parsed = parse_tools(tools)
        choice = parse_tool_choice(tool_choice, parsed)
        if choice.forces_call and constrained_output:
            raise RequestError(
                "response_format json_object/json_schema and a forced tool call (tool_choice "
                "required or a named function) both constrain the answer; send one of them",
                param="tool_choice",
            )
        parallel = True if parallel_tool_calls is None else parallel_tool_calls
        return cls(syntax=syntax, tools=parsed, choice=choice, parallel=parallel)

    @property
    def active(self) -> bool:
        """Whether the model may call tools in this answer."""
        return bool(self.tools) and self.choice.mode != "none"

    def template_input(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(messages, tools) for the chat template, from OpenAI-style messages (text content,
        tool_calls, tool results, earlier reasoning); checks that every tool result answers an
        earlier call."""
        checked = history_for_template(check_messages(messages), self.syntax.reasoning)
        return template_messages(checked, self.syntax, self.tools, self.choice)

    def grammar(self, reasoning_open: bool = False) -> str | None:
        """`reasoning_open`: the prompt opened the model's `<think>`, closed before the call."""
        return self.syntax.grammar(self.tools, self.choice, self.parallel, reasoning_open)

    @property
    def keep_special(self) -> tuple[str, ...]:
        """Marker tokens the answer's parser must see: reasoning markers, call markers."""
        calls = self.syntax.preserved_tokens if self.active else ()
        return tuple(dict.fromkeys(self.syntax.reasoning_markers + calls))

    def parser(
        self, reasoning_open: bool = False, raw_reasoning: bool = False
    ) -> OutputParser | None:
        """A parser for the answer (reasoning, content, calls); None when the text is the
        content as it is (no tools or tool_choice none, and no reasoning to split off)."""
        if not needs_output_parser(self.syntax, self.active, raw_reasoning):
            return None
        return OutputParser(
            self.syntax,
            self.tools if self.active else (),
            reasoning_open=reasoning_open,
            raw_reasoning=raw_reasoning,
        )

    def finish_reason(self, engine_reason: str, n_calls: int) -> str:
        """OpenAI's "tool_calls" when the answer ended with calls; a cut-off stays "length"."""
        if n_calls and engine_reason == "stop":
            return "tool_calls"
        return engine_reason
