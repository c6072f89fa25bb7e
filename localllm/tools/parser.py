"""Model output to content and tool calls, fed incrementally as the text streams in.

`ToolCallParser.feed(text)` returns deltas as soon as they are certain: content, or a tool call's
header (index, id, name) followed by its arguments in pieces, the way OpenAI streams
`delta.tool_calls`. Text that might still turn out to open a call (`<tool_c` ...) is held back
until it is decided. What does not parse as a call stays content: a model that writes a broken
`<tool_call>` gets its text back, not an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from localllm.tools.formats import ToolFormat, ToolSyntax
from localllm.tools.spec import ToolCall


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """The first delta of a call has its id and name; later ones only argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of the model's reasoning (`reasoning_content`), apart from the answer."""

    text: str


Delta = ContentDelta | ToolCallDelta | ReasoningDelta


def merge_deltas(deltas: list[Delta]) -> list[Delta]:
    """Adjacent pieces of one kind as one delta (content, reasoning, one call's arguments; a
    call's header, with its id and name, stays a delta of its own); empty text dropped."""
    merged: list[Delta] = []
    for d in deltas:
        last = merged[-1] if merged else None
        if isinstance(d, ContentDelta) and isinstance(last, ContentDelta):
            merged[-1] = ContentDelta(last.text + d.text)
        elif isinstance(d, ReasoningDelta) and isinstance(last, ReasoningDelta):
            merged[-1] = ReasoningDelta(last.text + d.text)
        elif (
            isinstance(d, ToolCallDelta)
            and isinstance(last, ToolCallDelta)
            and d.index == last.index
            and d.id is None
            and last.id is None
        ):
            merged[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + d.arguments)
        else:
            merged.append(d)
    return [d for d in merged if not isinstance(d, ContentDelta | ReasoningDelta) or d.text]


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


_WS = " \t\r\n"
_ARG_KEYS = ("arguments", "parameters")
# Llama 3.x built-in tools: <|python_tag|>brave_search.call(query="...")
_BUILTIN_CALL = re.compile(r"^\s*([a-zA-Z0-9_]+)\.call\((.*)\)\s*$", re.S)
_BUILTIN_ARG = re.compile(r'\s*([a-zA-Z0-9_]+)\s*=\s*("(?:[^"\\]|\\.)*")\s*(?:,|$)', re.S)


class _Invalid(Exception):
    """The text after an opener is not a call."""


class _JsonValue:
    """Finds where one JSON value ends, a character at a time (it does not validate it)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.done = False
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._kind = ""  # "string", "container" or "scalar"

    def push(self, ch: str) -> bool:
        """Take `ch` if it belongs to the value; False (and done) at a scalar's end."""
        if not self._kind:
            if ch == '"':
                self._kind, self._in_string = "string", True
            elif ch in "{[":
                self._kind, self._depth = "container", 1
            elif ch in "-0123456789tfn":
                self._kind = "scalar"
            else:
                raise _Invalid(ch)
            self.text.append(ch)
            return True
        if self._kind == "scalar":
            if ch in "+-.0123456789eEtruefalsn":
                self.text.append(ch)
                return True
            self.done = True
            return False
        self.text.append(ch)
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._kind == "string":
                    self.done = True
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self.done = True
        return True

    def finish(self) -> None:
        if self._kind == "scalar":
            self.done = True


class _CallObject:
    """One JSON call object {"name": ..., "arguments": {...}} scanned a character at a time.
    The arguments' raw text goes out as it comes once the name is known (before that it
    waits: a model may write the arguments first)."""

    def __init__(self, on_name: Callable[[str], None], on_args: Callable[[str], None]) -> None:
        self._on_name = on_name
        self._on_args = on_args
        self._state = "open"
        self._key: _JsonValue | None = None
        self._value: _JsonValue | None = None
        self._current = ""
        self.name: str | None = None
        self.done = False
        self.args_seen = False
        self._args_string = False  # arguments written as a JSON string holding JSON
        self._held_args: list[str] = []

    def push(self, ch: str) -> bool:
        """Consume `ch`; False when the object is complete and `ch` is not part of it."""
        state = self._state
        if state == "done":
            return False
        if state == "open":
            if ch in _WS:
                return True
            if ch != "{":
                raise _Invalid(ch)
            self._state = "key_or_end"
            return True
        if state in ("key_or_end", "key"):
            if ch in _WS:
                return True
            if ch == "}" and state == "key_or_end":
                self._close()
                return True
            if ch != '"':
                raise _Invalid(ch)
            self._key = _JsonValue()
            self._key.push(ch)
            self._state = "in_key"
            return True
        if state == "in_key":
            assert self._key is not None
            self._key.push(ch)
            if self._key.done:
                self._current = json.loads("".join(self._key.text))
                self._state = "colon"
            return True
        if state == "colon":
            if ch in _WS:
                return True
            if ch != ":":
                raise _Invalid(ch)
            self._state = "value"
            self._value = _JsonValue()
            return True
        if state == "value":
            assert self._value is not None
            if not self._value.text and ch in _WS:
                return True
            if not self._value.push(ch):
                self._end_value()
                return self.push(ch)
            if self._current in _ARG_KEYS:
                self._args_piece(ch)
            if self._value.done:
                self._end_value()
            return True
        if state == "after_value":
            if ch in _WS:
                return True
            if ch == ",":
                self._state = "key"
                return True
            if ch == "}":
                self._close()
                return True
            raise _Invalid(ch)
        raise AssertionError(state)

    def _args_piece(self, ch: str) -> None:
        if not self.args_seen:
            self.args_seen = True
            self._args_string = ch == '"'
        if self._args_string:
            return  # decoded once complete
        if self.name is None:
            self._held_args.append(ch)
        else:
            self._on_args(ch)

    def _end_value(self) -> None:
        assert self._value is not None
        raw = "".join(self._value.text)
        key = self._current
        if key == "name":
            try:
                name = json.loads(raw)
            except json.JSONDecodeError:
                raise _Invalid(raw) from None
            if not isinstance(name, str) or self.name is not None:
                raise _Invalid(raw)
            self.name = name
            self._on_name(name)
            if self._held_args:
                self._on_args("".join(self._held_args))
                self._held_args.clear()
        elif key in _ARG_KEYS and self._args_string:
            try:
                decoded = json.loads(raw)
            except json.JSONDecodeError:
                raise _Invalid(raw) from None
            if self.name is None:
                self._held_args.append(decoded)
            else:
                self._on_args(decoded)
        self._value = None
        self._state = "after_value"

    def _close(self) -> None:
        if self.name is None:
            raise _Invalid("a call without a name")
        self._state = "done"
        self.done = True

    def end_of_text(self) -> None:
        """The text ended: a scalar value waiting for its terminator is complete."""
        if self._state == "value" and self._value is not None and self._value.text:
            self._value.finish()
            if self._value.done:
                self._end_value()


class ToolCallParser:
    """Feed the model's text as it streams; read back content and tool-call deltas."""

    def __init__(
        self,
        syntax: ToolSyntax,
        new_id: Callable[[], str] | None = None,
        names: frozenset[str] | None = None,
    ) -> None:
        """`names`: the declared tools; a call to any other name stays content (None: any)."""
        self.syntax = syntax
        self._names = names
        self._new_id = new_id or syntax.new_call_id
        self._buf = ""
        self._out: list[Delta] = []
        self._state = "start"  # start, content, region, builtin
        self._region = ""  # raw text of the call region, returned as content if it fails
        self._region_emitted = False  # a delta of this region went out: no taking it back
        self._steps: list[str] = []  # what the region still expects, e.g. ["[", "calls", "]"]
        self._call: _CallObject | None = None
        self._index = -1
        self._calls: list[ToolCall] = []
        self._args: list[list[str]] = []
        self._args_value: _JsonValue | None = None  # Mistral's name[ARGS]{...} arguments
        self._between = False  # between two calls of a list
        self._held_ws = ""  # whitespace after content: dropped if only calls follow

    # ------------------------------------------------------------------ public

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        self._run(final=True)
        if self._state == "region":
            if self._call is not None:
                self._call.end_of_text()
            if self._region_emitted:
                self._close_open_call()
            else:
                self._emit_content(self._region)
            self._region = ""
            self._state = "content"
        elif self._state == "builtin":
            self._builtin(self._region)
        if self._buf:
            self._emit_content(self._buf)
            self._buf = ""
        if self._held_ws and not self._calls:
            self._out.append(ContentDelta(self._held_ws))
        self._held_ws = ""
        return self._take()

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls parsed so far, arguments complete only after `finish()`."""
        return [
            ToolCall(c.id, c.name, "".join(a) or "{}")
            for c, a in zip(self._calls, self._args, strict=True)
        ]

    # ------------------------------------------------------------------ plumbing

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return merge_deltas(out)

    def _emit_content(self, text: str) -> None:
        """Content goes out, except trailing whitespace, held until more content comes (the
        blank lines around and between calls are not content)."""
        if not text:
            return
        body = text.rstrip()
        if body:
            self._out.append(ContentDelta(self._held_ws + body))
            self._held_ws = ""
        self._held_ws += text[len(body) :]

    def _on_name(self, name: str) -> None:
        if self._names is not None and name not in self._names:
            raise _Invalid(name)  # not a tool of this request: the text is content
        self._index += 1
        call_id = self._new_id()
        self._calls.append(ToolCall(call_id, name, ""))
        self._args.append([])
        self._region_emitted = True
        self._out.append(ToolCallDelta(self._index, call_id, name, ""))

    def _on_args(self, piece: str) -> None:
        self._args[self._index].append(piece)
        self._out.append(ToolCallDelta(self._index, arguments=piece))

    def _close_open_call(self) -> None:
        if self._call is not None and self._call.name is not None and not self._call.args_seen:
            self._on_args("{}")
        self._call = None

    # ------------------------------------------------------------------ the state machine

    def _openers(self) -> tuple[str, ...]:
        fmt = self.syntax.format
        if fmt is ToolFormat.HERMES:
            return ("<tool_call>",)
        if fmt is ToolFormat.MISTRAL:
            return ("[TOOL_CALLS]",)
        if fmt is ToolFormat.LLAMA3:
            return ("<|python_tag|>",)
        return ()

    def _run(self, final: bool) -> None:
        while True:
            if self._state == "start":
                if not self._start(final):
                    return
            elif self._state == "content":
                if not self._content(final):
                    return
            elif self._state == "region":
                if not self._step_region(final):
                    return
            elif self._state == "builtin":
                self._region += self._buf
                self._buf = ""
                return

    def _start(self, final: bool) -> bool:
        """At the start of the output: formats whose call is the whole answer (a bare JSON
        object) are recognised here, before any content went out."""
        fmt = self.syntax.format
        if fmt is ToolFormat.GENERIC:
            verdict, end = _match_tokens(self._buf, _GENERIC_OPENING)
        elif fmt is ToolFormat.LLAMA3:
            verdict, end = _match_tokens(self._buf, _LLAMA3_OPENING)
        else:
            verdict, end = "no", 0
        if verdict == "partial" and not final:
            return False
        if verdict != "match":
            self._state = "content"
            return True
        stripped = self._buf.lstrip()
        lead = len(self._buf) - len(stripped)
        self._emit_content(self._buf[:lead])
        self._buf = stripped
        if fmt is ToolFormat.GENERIC:
            fenced = stripped.startswith("```")
            closing = ["]", "}"] + (["```"] if fenced else [])
            self._enter_region(end - lead, ["calls", *closing])
        else:
            self._enter_region(0, ["calls_semicolon"])
        return True

    def _content(self, final: bool) -> bool:
        openers = self._openers()
        first, which = -1, ""
        for opener in openers:
            at = self._buf.find(opener)
            if at != -1 and (first == -1 or at < first):
                first, which = at, opener
        if first != -1:
            self._emit_content(self._buf[:first])
            self._buf = self._buf[first:]
            return self._open(which, final)
        keep = 0 if final else _partial_suffix(self._buf, openers)
        self._emit_content(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return False

    def _open(self, opener: str, final: bool) -> bool:
        """Enter the call region after `opener` (at the start of the buffer); False to wait
        for the text that decides which form the call takes."""
        fmt = self.syntax.format
        after = self._buf[len(opener) :].lstrip()
        if fmt is ToolFormat.HERMES:
            self._enter_region(len(opener), ["call", "</tool_call>"])
        elif fmt is ToolFormat.MISTRAL:
            if not after and not final:
                return False
            if self.syntax.mistral_args and not after.startswith("["):
                self._enter_region(len(opener), ["args_name", "args_value"])
            else:
                self._enter_region(len(opener), ["[", "calls", "]"])
        else:  # Llama 3.x <|python_tag|>
            if not after and not final:
                return False
            if after.startswith("{"):
                self._enter_region(len(opener), ["calls_semicolon"])
            else:
                self._region = ""
                self._buf = self._buf[len(opener) :]
                self._state = "builtin"
        return True

    def _enter_region(self, consumed: int, steps: list[str]) -> None:
        self._between = False
        self._region = self._buf[:consumed]
        self._buf = self._buf[consumed:]
        self._steps = steps
        self._region_emitted = False
        self._call = None
        self._state = "region"

    def _leave_region(self) -> None:
        self._region = ""
        self._call = None
        self._state = "content"

    def _fail_region(self) -> None:
        """The region is not a call after all: its text is content (unless a call already went
        out, then that call ends here and the rest is content)."""
        if self._region_emitted:
            self._close_open_call()
        else:
            self._buf = self._region + self._buf
            # Emit the opener as content so the search moves past it.
            self._emit_content(self._buf[:1])
            self._buf = self._buf[1:]
        self._leave_region()

    def _step_region(self, final: bool) -> bool:
        try:
            return self._region_step(final)
        except _Invalid:
            self._fail_region()
            return True

    def _region_step(self, final: bool) -> bool:
        if not self._steps:
            self._leave_region()
            return True
        step = self._steps[0]
        if step in ("call", "calls", "calls_semicolon"):
            return self._calls_step(step, final)
        if step == "args_name":
            at = self._buf.find("[ARGS]")
            if at == -1:
                if final or len(self._buf) > 64:
                    raise _Invalid(self._buf)
                return False
            name = self._buf[:at].strip()
            if not re.match(r"^[a-zA-Z0-9_-]{1,64}$", name):
                raise _Invalid(name)
            self._consume(at + len("[ARGS]"))
            self._on_name(name)
            self._steps.pop(0)
            return True
        if step == "args_value":
            if self._args_value is None:
                self._args_value = _JsonValue()
            value = self._args_value
            while self._buf:
                ch = self._buf[0]
                if not value.text and ch in _WS:
                    self._consume(1)
                    continue
                if not value.push(ch):
                    break
                self._consume(1)
                self._on_args(ch)
                if value.done:
                    break
            if final:
                value.finish()
            if value.done:
                self._args_value = None
                self._steps.pop(0)
                return True
            return False
        # A literal: whitespace, then exactly this text.
        stripped = self._buf.lstrip()
        lead = len(self._buf) - len(stripped)
        if stripped.startswith(step):
            self._consume(lead + len(step))
            self._steps.pop(0)
            return True
        if step.startswith(stripped) and not final:
            return False
        if step == "```" and not stripped:
            self._steps.pop(0)  # an unclosed fence at the very end
            return True
        raise _Invalid(stripped[:16])

    def _calls_step(self, step: str, final: bool) -> bool:
        """One call object ("call"), a comma-separated list ("calls") or a semicolon-separated
        run (Llama 3.x, "calls_semicolon")."""
        sep = "," if step == "calls" else ";"
        while True:
            if self._between:  # a call of the list ended: a separator, or the list ends
                stripped = self._buf.lstrip()
                self._consume(len(self._buf) - len(stripped))
                if not stripped and not final:
                    return False
                self._between = False
                if stripped[:1] == sep:
                    self._consume(1)
                    continue
                self._steps.pop(0)
                return True
            if not self._buf:
                break
            if self._call is None:
                stripped = self._buf.lstrip()
                self._consume(len(self._buf) - len(stripped))
                if not stripped:
                    break
                self._call = _CallObject(self._on_name, self._on_args)
            if self._call.push(self._buf[0]):
                self._consume(1)
            if self._call.done:
                self._close_open_call()
                if step == "call":
                    self._steps.pop(0)
                    return True
                self._between = True
        if final:
            if self._call is not None:
                self._call.end_of_text()
                if not self._call.done:
                    raise _Invalid("the text ended inside a call")
                self._close_open_call()
            self._steps.pop(0)
            return True
        return False

    def _consume(self, n: int) -> None:
        self._region += self._buf[:n]
        self._buf = self._buf[n:]

    def _builtin(self, text: str) -> None:
        """Llama 3.x after <|python_tag|> without JSON: name.call(k="v", ...) or raw code,
        which Llama's python tool receives as {"code": ...}."""
        match = _BUILTIN_CALL.match(text)
        builtin = match.group(1) if match else "python"
        if self._names is not None and builtin not in self._names:
            self._emit_content("<|python_tag|>" + text)
        elif match:
            name, arg_text = match.group(1), match.group(2)
            args: dict[str, object] = {}
            for arg in _BUILTIN_ARG.finditer(arg_text):
                args[arg.group(1)] = json.loads(arg.group(2))
            self._on_name(name)
            self._on_args(json.dumps(args, ensure_ascii=False))
        elif text.strip():
            self._on_name("python")
            self._on_args(json.dumps({"code": text.strip()}, ensure_ascii=False))
        self._region = ""
        self._state = "content"


_GENERIC_OPENING = (("```json", "```", ""), ("{",), ('"tool_calls"',), (":",), ("[",))
_LLAMA3_OPENING = (("{",), ('"name"', '"type"'), (":",))


def _match_tokens(text: str, tokens: tuple[tuple[str, ...], ...]) -> tuple[str, int]:
    """Does `text` open with these tokens (whitespace allowed between them; "" marks an
    optional one)? ("match", end), ("partial", 0) while it still could, or ("no", 0)."""
    pos = 0
    for alternatives in tokens:
        while pos < len(text) and text[pos] in _WS:
            pos += 1
        rest = text[pos:]
        if not rest:
            return "partial", 0
        for alt in alternatives:
            if alt and rest.startswith(alt):
                pos += len(alt)
                break
            if alt and alt.startswith(rest):
                return "partial", 0
        else:
            if "" in alternatives:
                continue
            return "no", 0
    return "match", pos


def _partial_suffix(buffer: str, openers: tuple[str, ...]) -> int:
    best = 0
    for opener in openers:
        for length in range(min(len(opener) - 1, len(buffer)), best, -1):
            if buffer.endswith(opener[:length]):
                best = length
                break
    return best


def parse_output(
    text: str,
    syntax: ToolSyntax,
    new_id: Callable[[], str] | None = None,
    names: frozenset[str] | None = None,
) -> ParsedOutput:
    """A whole answer at once: content (None when there is only whitespace around calls) and
    the calls."""
    parser = ToolCallParser(syntax, new_id, names)
    deltas = parser.feed(text) + parser.finish()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls = parser.tool_calls
    if calls and not content.strip():
        return ParsedOutput(None, calls)
    return ParsedOutput(content, calls)
