"""gpt-oss's output (OpenAI's harmony format) to reasoning, content and tool calls, fed as it
streams.

The generation prompt ends with `<|start|>assistant`, so the output opens with a message header;
each message is `HEADER<|message|>BODY` and ends with `<|end|>` (then `<|start|>assistant` and
the next header), or with `<|call|>` / `<|return|>` (end-of-generation tokens the engine does
not print: the output just stops). Headers, as llama.cpp's `common/parsers/gpt-oss.cpp` reads
them:

    <|channel|>analysis                                     reasoning
    <|channel|>final                                        the answer
    <|channel|>commentary                                   a preamble: content
    <|channel|>commentary to=functions.NAME <|constrain|>json   a tool call, JSON arguments
    to=functions.NAME<|channel|>commentary json             the same, recipient first

A call to a function the request did not declare (or a built-in such as `browser.search`) is
content, not a call. With `raw`, everything but the calls is content exactly as written.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable

from localllm.tools.parser import (
    ContentDelta,
    Delta,
    ReasoningDelta,
    ToolCallDelta,
    merge_deltas,
)
from localllm.tools.reasoning import partial_suffix
from localllm.tools.spec import ToolCall

MESSAGE = "<|message|>"
START = "<|start|>"
_BODY_ENDS = ("<|end|>", "<|call|>", "<|return|>", START)
_HEADER_LIMIT = 512  # a header longer than this is not one: the rest is content
_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z0-9_-]+)")
_WS = " \t\r\n"
_ID_RNG = random.SystemRandom()


def _new_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "call_" + "".join(_ID_RNG.choice(alphabet) for _ in range(24))


class HarmonyParser:
    """Feed gpt-oss's text as it streams; read back reasoning, content and call deltas."""

    def __init__(
        self,
        *,
        names: frozenset[str] | None = frozenset(),
        raw: bool = False,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        """`names`: the functions calls may name (empty: no calls; None: any)."""
        self._names = names
        self._raw = raw
        self._new_id = new_id or _new_id
        self._buf = ""
        self._state = "header"  # header, body, between, content
        self._header = ""
        self._kind = ""  # the current body: reasoning, content or call
        self._calls: list[ToolCall] = []
        self._args: list[str] = []
        self._args_ws = ""  # whitespace inside a call's arguments, out once more follows
        self._out: list[Delta] = []

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [
            ToolCall(c.id, c.name, a.strip() or "{}")
            for c, a in zip(self._calls, self._args, strict=True)
        ]

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        self._run(final=True)
        if self._state == "header" and self._header:
            self._content(self._header)  # the text ended inside a header
        self._header = ""
        if self._kind == "call" and self._calls and not self._args[-1].strip():
            self._args[-1] = "{}"
            self._out.append(ToolCallDelta(len(self._calls) - 1, arguments="{}"))
        return self._take()

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return merge_deltas(out)

    def _content(self, text: str) -> None:
        if text:
            self._out.append(ContentDelta(text))

    def _run(self, final: bool) -> None:
        while self._buf:
            if self._state == "content":
                self._content(self._buf)
                self._buf = ""
            elif self._state == "between":
                if not self._between(final):
                    return
            elif self._state == "header":
                if not self._header_step(final):
                    return
            elif not self._body_step(final):
                return

    def _between(self, final: bool) -> bool:
        """After <|end|>: <|start|> and a role (assistant) before the next header."""
        stripped = self._buf.lstrip(_WS)
        if not stripped:
            self._buf = ""
            return False
        if stripped.startswith(START):
            rest = stripped[len(START) :]
            role = "assistant"
            if len(rest) < len(role) and role.startswith(rest) and not final:
                self._buf = stripped
                return False
            if self._raw:
                self._content(START + (role if rest.startswith(role) else ""))
            self._buf = rest[len(role) :] if rest.startswith(role) else rest
        elif START.startswith(stripped) and not final:
            self._buf = stripped
            return False
        self._state = "header"
        return True

    def _header_step(self, final: bool) -> bool:
        self._header += self._buf
        self._buf = ""
        at = self._header.find(MESSAGE)
        if at == -1:
            if len(self._header) > _HEADER_LIMIT:
                self._content(self._header)
                self._header = ""
                self._state = "content"
                return True
            return False
        header, self._buf = self._header[:at], self._header[at + len(MESSAGE) :]
        self._header = ""
        recipient = _RECIPIENT.search(header)
        channel = _CHANNEL.search(header)
        name = recipient.group(1) if recipient else ""
        function = name.removeprefix("functions.") if name.startswith("functions.") else None
        if function is not None and (self._names is None or function in self._names):
            self._kind = "call"
            self._calls.append(ToolCall(self._new_id(), function, ""))
            self._args.append("")
            self._args_ws = ""
            self._out.append(ToolCallDelta(len(self._calls) - 1, self._calls[-1].id, function))
        elif recipient is None and channel is not None and channel.group(1) == "analysis":
            self._kind = "reasoning"
        else:
            self._kind = "content"
            if recipient is not None and not self._raw:
                # A call to an undeclared function or a built-in: content, as written.
                self._content(header + MESSAGE)
        if self._raw and self._kind != "call":
            self._kind = "content"
            self._content(header + MESSAGE)
        self._state = "body"
        return True

    def _body_step(self, final: bool) -> bool:
        at, end = -1, ""
        for tag in _BODY_ENDS:
            i = self._buf.find(tag)
            if i != -1 and (at == -1 or i < at):
                at, end = i, tag
        if at == -1:
            keep = 0 if final else partial_suffix(self._buf, _BODY_ENDS)
            self._body(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        self._body(self._buf[:at])
        if self._raw and self._kind != "call" and end != START:
            self._content(end)
        self._buf = self._buf[at + (0 if end == START else len(end)) :]
        self._state = "between"
        return True

    def _body(self, text: str) -> None:
        if not text:
            return
        if self._kind == "reasoning":
            self._out.append(ReasoningDelta(text))
        elif self._kind == "content":
            self._content(text)
        else:  # a call's arguments: surrounding whitespace dropped, inner kept
            if not self._args[-1]:
                text = text.lstrip(_WS)
            body = text.rstrip(_WS)
            if body:
                piece = self._args_ws + body
                self._args[-1] += piece
                self._args_ws = text[len(body) :]
                self._out.append(ToolCallDelta(len(self._calls) - 1, arguments=piece))
            else:
                self._args_ws += text
