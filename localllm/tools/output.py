"""A chat answer's text to reasoning, content and tool-call deltas, in one pass as it streams:
the reasoning comes off first (`<think>`), the rest goes through the format's tool-call parser;
gpt-oss's harmony channels carry both at once (`localllm.tools.harmony`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from localllm.tools.formats import TAGGED_FORMATS, ToolFormat, ToolSyntax
from localllm.tools.harmony import HarmonyParser
from localllm.tools.parser import ContentDelta, Delta, ReasoningDelta, ToolCallParser
from localllm.tools.reasoning import ReasoningFormat, ReasoningSplitter
from localllm.tools.spec import Tool, ToolCall
from localllm.tools.tagged import TaggedCallParser
from localllm.tools.tags import XML_OPEN

# Call openers that also end a reasoning the model forgot to close (llama.cpp's Qwen3 rule).
_REASONING_ENDS = {
    ToolFormat.QWEN3_XML: (XML_OPEN,),
    ToolFormat.GLM: (XML_OPEN,),
    ToolFormat.HERMES: (XML_OPEN,),
}


class OutputParser:
    """Feed the answer as it streams; read back reasoning, content and tool-call deltas.

    `tools`: the request's tools when it may call them (else no call is parsed);
    `reasoning_open`: the prompt opened a `<think>`; `raw_reasoning`: leave the reasoning in
    the content as the model wrote it (a request's `reasoning_format: "none"`).
    """

    def __init__(
        self,
        syntax: ToolSyntax,
        tools: Sequence[Tool] = (),
        *,
        reasoning_open: bool = False,
        raw_reasoning: bool = False,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        names = frozenset(t.name for t in tools)
        self._harmony: HarmonyParser | None = None
        self._splitter: ReasoningSplitter | None = None
        self._calls: ToolCallParser | TaggedCallParser | None = None
        if syntax.reasoning is ReasoningFormat.HARMONY or syntax.format is ToolFormat.HARMONY:
            self._harmony = HarmonyParser(names=names, raw=raw_reasoning, new_id=new_id)
            return
        if syntax.reasoning is ReasoningFormat.THINK and not raw_reasoning:
            ends = _REASONING_ENDS.get(syntax.format, ()) if tools else ()
            self._splitter = ReasoningSplitter(opened=reasoning_open, end_tags=ends)
        if tools and syntax.format in TAGGED_FORMATS:
            self._calls = TaggedCallParser(syntax.format, tools, new_id)
        elif tools:
            self._calls = ToolCallParser(syntax, new_id, names)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls parsed so far, arguments complete only after `finish()`."""
        if self._harmony is not None:
            return self._harmony.tool_calls
        return self._calls.tool_calls if self._calls is not None else []

    def feed(self, text: str) -> list[Delta]:
        if self._harmony is not None:
            return self._harmony.feed(text)
        if self._splitter is None:
            return self._content(text)
        reasoning, content = self._splitter.feed(text)
        return self._reasoning(reasoning) + self._content(content)

    def finish(self) -> list[Delta]:
        if self._harmony is not None:
            return self._harmony.finish()
        out: list[Delta] = []
        if self._splitter is not None:
            reasoning, content = self._splitter.finish()
            out = self._reasoning(reasoning) + self._content(content)
        if self._calls is not None:
            out += self._calls.finish()
        return out

    def _reasoning(self, text: str) -> list[Delta]:
        return [ReasoningDelta(text)] if text else []

    def _content(self, text: str) -> list[Delta]:
        if self._calls is not None:
            return self._calls.feed(text)
        return [ContentDelta(text)] if text else []


def needs_output_parser(syntax: ToolSyntax, calls: bool, raw_reasoning: bool) -> bool:
    """Whether an answer needs parsing at all (else its text is the content as it is)."""
    if calls:
        return True
    return syntax.reasoning is not ReasoningFormat.NONE and not raw_reasoning
