"""Tool calls written in tags rather than one JSON object: Qwen3-Coder / Qwen3.5 / Nemotron 3
XML, GLM-4.5/4.7 and DeepSeek V3.1, parsed while they stream, and their forced-call grammars.

    Qwen3-Coder XML  <tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n
                     </function>\\n</tool_call>
    GLM-4.5/4.7      <tool_call>NAME<arg_key>ARG</arg_key><arg_value>VALUE</arg_value></tool_call>
                     (4.5 puts newlines between the parts)
    DeepSeek V3.1    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{JSON}
                     <｜tool▁call▁end｜>...<｜tool▁calls▁end｜> (no line breaks)

XML values are text: a value becomes the JSON the tool's schema asks for (a string stays the text;
anything else is read as JSON, and stays a string when it is not JSON), as llama.cpp's parsers
do. A call's header (id, name) goes out once its name is complete, each argument once its value
is, then the closing brace; DeepSeek's JSON arguments stream as they come.

The call region after an opener is re-read from its start on every piece of text (regions are a
few hundred characters), which keeps the parser exact wherever the text is cut.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from localllm.tools.formats import ToolFormat, ToolSyntax
from localllm.tools.parser import ContentDelta, Delta, ToolCallDelta, merge_deltas
from localllm.tools.reasoning import partial_suffix
from localllm.tools.spec import Tool, ToolCall
from localllm.tools.tags import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_SEP,
    XML_CLOSE,
    XML_OPEN,
    is_string_schema,
    tool_properties,
)

_WS = " \t\r\n"


class _Need(Exception):
    """The region is a call so far; more text decides the rest."""


class _NotACall(Exception):
    """The region is not (or no longer) a call."""


@dataclass
class _Scanned:
    name: str
    args: str = ""  # the arguments' JSON text so far; it only grows
    closed: bool = False


@dataclass
class _Scan:
    calls: list[_Scanned] = field(default_factory=list)
    end: int | None = None  # where the region ended (the whole region read)


class _Cursor:
    def __init__(self, text: str, final: bool) -> None:
        self.text, self.pos, self.final = text, 0, final

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1

    def lit(self, literal: str, optional: bool = False) -> bool:
        rest = self.text[self.pos : self.pos + len(literal)]
        if rest == literal:
            self.pos += len(literal)
            return True
        if literal.startswith(rest) and not self.final:
            raise _Need
        if optional:
            return False
        raise _NotACall

    def until(self, literal: str, limit: int | None = None) -> str:
        at = self.text.find(literal, self.pos)
        if at == -1:
            if self.final or (limit is not None and len(self.text) - self.pos > limit):
                raise _NotACall
            raise _Need
        value = self.text[self.pos : at]
        self.pos = at + len(literal)
        return value

    def pending(self, stops: Sequence[str]) -> str:
        """The text from here, less a tail that could start one of `stops`."""
        rest = self.text[self.pos :]
        return rest[: len(rest) - partial_suffix(rest, stops)]


def typed_value(raw: str, schema: Any) -> Any:
    """An XML argument's text as the JSON value the tool's schema wants."""
    if is_string_schema(schema):
        if raw.startswith('"'):
            try:
                decoded = json.loads(raw)
            except json.JSONDecodeError:
                return raw
            return decoded if isinstance(decoded, str) else raw
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _strip_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


class _ArgsJson:
    """XML arguments as a growing JSON object text."""

    def __init__(self, call: _Scanned, properties: Mapping[str, Any], newlines: bool) -> None:
        """`newlines`: the value sits on lines of its own (Qwen's), one newline each side."""
        self.call, self.properties, self.n, self.newlines = call, properties, 0, newlines

    def add(self, key: str, raw: str) -> None:
        text = _strip_newline(raw) if self.newlines else raw
        value = typed_value(text, self.properties.get(key))
        pair = f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"
        self.call.args += ("{" if self.n == 0 else ", ") + pair
        self.n += 1

    def close(self) -> None:
        self.call.args += "{}" if self.n == 0 else "}"
        self.call.closed = True


def _scan_qwen3_xml(c: _Cursor, scan: _Scan, tools: Mapping[str, Tool]) -> None:
    # Qwen3-Coder now and then leaves out <tool_call> (then </tool_call> too): see `bare`.
    wrapped = c.lit(XML_OPEN, optional=True)
    c.ws()
    c.lit("<function=")
    name = c.until(">", limit=80).strip()
    call = _named(scan, name, tools)
    args = _ArgsJson(call, tool_properties(tools[name]), newlines=True)
    while True:
        c.ws()
        if not c.lit("<parameter=", optional=True):
            break
        key = c.until(">", limit=80).strip()
        args.add(key, c.until("</parameter>"))
    c.lit("</function>")
    args.close()
    end = c.pos
    c.ws()
    if c.lit(XML_CLOSE, optional=not wrapped):
        end = c.pos
    scan.end = end


def _scan_glm(c: _Cursor, scan: _Scan, tools: Mapping[str, Tool]) -> None:
    c.lit(XML_OPEN)
    rest = c.text[c.pos :]
    ends = [at for at in (rest.find("<arg_key>"), rest.find(XML_CLOSE)) if at != -1]
    if not ends:
        if c.final or len(rest) > 80:
            raise _NotACall
        raise _Need
    name = rest[: min(ends)].strip()
    c.pos += min(ends)
    call = _named(scan, name, tools)
    args = _ArgsJson(call, tool_properties(tools[name]), newlines=False)
    while True:
        c.ws()
        if not c.lit("<arg_key>", optional=True):
            break
        key = c.until("</arg_key>", limit=80).strip()
        c.ws()
        c.lit("<arg_value>")
        args.add(key, c.until("</arg_value>"))
    c.lit(XML_CLOSE)
    args.close()
    scan.end = c.pos


def _scan_deepseek(c: _Cursor, scan: _Scan, tools: Mapping[str, Tool]) -> None:
    c.lit(DS_CALLS_BEGIN)
    while True:
        c.ws()
        if not c.lit(DS_CALL_BEGIN, optional=True):
            break
        name = c.until(DS_SEP, limit=80).strip()
        call = _named(scan, name, tools)
        c.ws()
        at = c.text.find(DS_CALL_END, c.pos)
        if at == -1:
            if c.final:
                raise _NotACall
            call.args = c.pending((DS_CALL_END,)).rstrip(_WS)
            raise _Need
        call.args = c.text[c.pos : at].strip(_WS) or "{}"
        call.closed = True
        c.pos = at + len(DS_CALL_END)
    c.lit(DS_CALLS_END)
    scan.end = c.pos


def _named(scan: _Scan, name: str, tools: Mapping[str, Tool]) -> _Scanned:
    if name not in tools:
        raise _NotACall  # not a tool of this request (or not a name at all): content
    call = _Scanned(name)
    scan.calls.append(call)
    return call


_SCANNERS: dict[str, tuple[str, Callable[[_Cursor, _Scan, Mapping[str, Tool]], None]]] = {
    "qwen3_xml": (XML_OPEN, _scan_qwen3_xml),
    "glm": (XML_OPEN, _scan_glm),
    "deepseek_v3_1": (DS_CALLS_BEGIN, _scan_deepseek),
}


class TaggedCallParser:
    """Feed the model's text as it streams; read back content and tool-call deltas (the
    interface of `localllm.tools.parser.ToolCallParser`)."""

    def __init__(
        self,
        fmt: str,
        tools: Sequence[Tool],
        new_id: Callable[[], str] | None = None,
        *,
        bare: bool = False,
    ) -> None:
        """`bare`: `<function=NAME>` of a declared tool opens a call without `<tool_call>`
        (llama.cpp's rule for Qwen3-Coder, which is not a reasoning model)."""
        opener, self._scanner = _SCANNERS[fmt]
        self._openers: tuple[str, ...] = (opener,)
        if bare:
            self._openers += tuple(f"<function={t.name}>" for t in tools)
        self._opened_with = opener
        self._tools = {t.name: t for t in tools}
        self._new_id = new_id or _default_id
        self._buf = ""
        self._region: str | None = None  # the text of the open call region
        self._sent: list[tuple[str, int]] = []  # per call of the region: (id, args chars sent)
        self._calls: list[ToolCall] = []
        self._args: list[str] = []
        self._held_ws = ""
        self._out: list[Delta] = []

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [
            ToolCall(c.id, c.name, a or "{}") for c, a in zip(self._calls, self._args, strict=True)
        ]

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        self._run(final=True)
        if self._buf:
            self._content(self._buf)
            self._buf = ""
        if self._held_ws and not self._calls:
            self._out.append(ContentDelta(self._held_ws))
        self._held_ws = ""
        return self._take()

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return merge_deltas(out)

    def _content(self, text: str) -> None:
        """Content out, but trailing whitespace held until more content comes (the blank lines
        around calls are not content)."""
        body = text.rstrip(_WS)
        if body:
            self._out.append(ContentDelta(self._held_ws + body))
            self._held_ws = ""
        self._held_ws += text[len(body) :]

    def _run(self, final: bool) -> None:
        while True:
            if self._region is None:
                at = -1
                for opener in self._openers:
                    found = self._buf.find(opener)
                    if found != -1 and (at == -1 or found < at):
                        at, self._opened_with = found, opener
                if at == -1:
                    keep = 0 if final else partial_suffix(self._buf, self._openers)
                    self._content(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return
                self._content(self._buf[:at])
                self._region, self._buf = "", self._buf[at:]
                self._sent = []
            self._region += self._buf
            self._buf = ""
            if not self._step(final):
                return

    def _step(self, final: bool) -> bool:
        """Read the region; False to wait for more text."""
        assert self._region is not None
        scan = _Scan()
        cursor = _Cursor(self._region, final)
        try:
            self._scanner(cursor, scan, self._tools)
        except _Need:
            self._emit(scan, closing=False)
            return False
        except _NotACall:
            self._emit(scan, closing=True)
            done = sum(1 for c in scan.calls if c.closed)
            if done == 0 and not self._sent:
                # Not a call: the opener is content, and the search goes on after it.
                self._content(self._region[: len(self._opened_with)])
                self._buf = self._region[len(self._opened_with) :]
            else:
                self._buf = ""  # a broken call after good ones: the rest of the region is lost
            self._region = None
            return True
        self._emit(scan, closing=True)
        assert scan.end is not None
        self._buf = self._region[scan.end :]
        self._region = None
        return True

    def _emit(self, scan: _Scan, closing: bool) -> None:
        for i, call in enumerate(scan.calls):
            if i == len(self._sent):
                call_id = self._new_id()
                self._sent.append((call_id, 0))
                self._calls.append(ToolCall(call_id, call.name, ""))
                self._args.append("")
                self._out.append(ToolCallDelta(len(self._calls) - 1, call_id, call.name, ""))
            call_id, sent = self._sent[i]
            index = len(self._calls) - len(self._sent) + i
            args = call.args
            if closing and not call.closed and not args:
                args = "{}"
            if len(args) > sent:
                piece = args[sent:]
                self._args[index] += piece
                self._sent[i] = (call_id, len(args))
                self._out.append(ToolCallDelta(index, arguments=piece))


def _default_id() -> str:
    return ToolSyntax(ToolFormat.HERMES).new_call_id()
