"""A chat answer's text to reasoning, content and tool-call deltas, in one pass as it streams:
the reasoning comes off first (`<think>`), the rest goes through the format's tool-call parser;
gpt-oss's harmony channels carry both at once (`localllm.tools.harmony`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from localllm.tools.formats import TAGGED_FORMATS, ToolFormat, ToolSyntax
from localllm.tools.harmony import HarmonyParser
from localllm.tools.parser import ContentDelta, Delta, ReasoningDelta, ToolCallParser
from localllm.tools.reasoning import ReasoningFormat, ThinkSplitter
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
        self._splitter: ThinkSplitter | None = None
        self._calls: ToolCallParser | TaggedCallParser | None = None
        if syntax.reasoning is ReasoningFormat.HARMONY or syntax.format is ToolFormat.HARMONY:
            self._harmony = HarmonyParser(names=names, raw=raw_reasoning, new_id=new_id)
            return
        if syntax.reasoning is ReasoningFormat.THINK and not raw_reasoning:
            ends = _REASONING_ENDS.get(syntax.format, ()) if tools else ()
            self._splitter = ThinkSplitter(opened=reasoning_open, end_tags=ends)
        if tools and syntax.format in TAGGED_FORMATS:
            # Qwen3-Coder (XML calls, no reasoning) may leave out <tool_call>: TaggedCallParser.
            bare = syntax.format is ToolFormat.QWEN3_XML
            bare = bare and syntax.reasoning is ReasoningFormat.NONE
            self._calls = TaggedCallParser(syntax.format, tools, new_id, bare=bare)
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


class ReasoningSplitter:
    """Reasoning apart from the answer for any reasoning format, fed as the text streams:
    `feed(text)` and `finish()` return (reasoning, content). No tool calls are parsed (a
    gpt-oss call's text is content). For Ollama's `think` and any caller that only needs the
    thinking apart."""

    def __init__(self, fmt: ReasoningFormat = ReasoningFormat.THINK, *, opened: bool = False):
        self._think: ThinkSplitter | None = None
        self._harmony: HarmonyParser | None = None
        if fmt is ReasoningFormat.THINK:
            self._think = ThinkSplitter(opened=opened)
        elif fmt is ReasoningFormat.HARMONY:
            self._harmony = HarmonyParser()

    def feed(self, text: str) -> tuple[str, str]:
        if self._think is not None:
            return self._think.feed(text)
        if self._harmony is not None:
            return _joined(self._harmony.feed(text))
        return "", text

    def finish(self) -> tuple[str, str]:
        if self._think is not None:
            return self._think.finish()
        if self._harmony is not None:
            return _joined(self._harmony.finish())
        return "", ""


def split_reasoning(
    text: str, fmt: ReasoningFormat = ReasoningFormat.THINK, *, opened: bool = False
) -> tuple[str, str]:
    """(reasoning, content) of a whole answer; `opened`: the prompt opened `<think>`
    (`localllm.tools.reasoning.prompt_opens_reasoning` tells from the rendered prompt)."""
    splitter = ReasoningSplitter(fmt, opened=opened)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2


def _joined(deltas: Sequence[Delta]) -> tuple[str, str]:
    reasoning = "".join(d.text for d in deltas if isinstance(d, ReasoningDelta))
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    return reasoning, content
