"""A JSON Schema `pattern` (an ECMA-262 regular expression) as GBNF for a JSON string's text.

The subset every schema author uses: literals, escapes (\\d \\w \\s and their negations, \\. and
the like), classes with ranges and negation, `.`, groups (capturing, non-capturing, named),
alternation, and the quantifiers ? * + {m} {m,} {m,n} (lazy ones generate the same strings).
A pattern is not anchored unless it says so: "[a-z]+" accepts any string that contains letters,
so an unanchored end becomes "any characters". Back-references, lookaround and inline flags
cannot be written as a grammar: `UnsupportedPattern` names them.

The strings generated are written the JSON way: a `"` or `\\` the pattern matches is escaped,
and `.`, negated classes and \\S never produce control characters (a subset of what the pattern
accepts, every one of them valid).
"""

from __future__ import annotations

import json

from localllm.tools.gbnf import PLAIN_CHAR, gbnf_literal, repeat

# \d \w \s as code point ranges (\s as the space only: tabs and newlines are escapes in JSON).
_ESCAPE_RANGES = {
    "d": [(0x30, 0x39)],
    "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "s": [(0x20, 0x20)],
}
# What JSON text cannot hold unescaped: control characters, '"' and '\'.
_HOLES = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]
_SIMPLE_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


class UnsupportedPattern(ValueError):
    """The pattern uses a construct a grammar cannot express."""


def pattern_gbnf(pattern: str) -> str:
    """A GBNF expression for the text between a JSON string's quotes."""
    parser = _Parser(pattern)
    return parser.parse()


def _json_char(ch: str) -> str:
    """A literal character as it appears inside a JSON string."""
    return json.dumps(ch, ensure_ascii=False)[1:-1]


def _class_char(ch: str) -> str:
    """A character inside a GBNF [...] class."""
    if ch in "\\]^-[":
        return "\\" + ch
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\x{ord(ch):02X}"
    return ch


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.src = pattern
        self.pos = 0
        self.anchored_end = False

    def fail(self, what: str) -> UnsupportedPattern:
        return UnsupportedPattern(f"{what} (at character {self.pos} of the pattern)")

    def peek(self) -> str:
        return self.src[self.pos] if self.pos < len(self.src) else ""

    def take(self) -> str:
        ch = self.peek()
        self.pos += 1
        return ch

    def parse(self) -> str:
        anchored_start = self.src.startswith("^")
        if anchored_start:
            self.pos = 1
        body = self.alternation(top=True)
        anchored_end = self.anchored_end
        if self.pos < len(self.src):
            raise self.fail(f"unexpected {self.peek()!r}")
        any_text = f"{PLAIN_CHAR}*"
        parts = ([] if anchored_start else [any_text]) + [f"({body})" if body else ""]
        parts += [] if anchored_end else [any_text]
        return " ".join(p for p in parts if p) or '""'

    def alternation(self, top: bool = False) -> str:
        options = [self.sequence(top)]
        while self.peek() == "|":
            self.take()
            options.append(self.sequence(top))
        if len(options) == 1:
            return options[0]
        return " | ".join(o or '""' for o in options)

    def sequence(self, top: bool) -> str:
        items: list[str] = []
        while self.peek() and self.peek() not in "|)":
            if self.peek() == "$":
                if top and self.pos == len(self.src) - 1:
                    self.take()
                    self.anchored_end = True
                    break
                raise self.fail("'$' inside the pattern")
            if self.peek() == "^":
                raise self.fail("'^' inside the pattern")
            atom = self.atom()
            items.append(self.quantified(atom))
        return " ".join(i for i in items if i)

    def quantified(self, atom: str) -> str:
        ch = self.peek()
        if not ch or ch not in "?*+{":
            return atom
        if ch == "{":
            end = self.src.find("}", self.pos)
            spec = self.src[self.pos + 1 : end] if end != -1 else ""
            low_text, comma, high_text = spec.partition(",")
            if end == -1 or not low_text.isdigit() or (high_text and not high_text.isdigit()):
                return atom  # not a quantifier: ECMA reads "{" literally then
            self.pos = end + 1
            low = int(low_text)
            high = None if comma and not high_text else int(high_text or low_text)
            if high is not None and high < low:
                raise self.fail("a {m,n} with n < m")
        else:
            self.take()
            low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}[ch]
        if self.peek() == "?":
            self.take()  # lazy: the same strings
        try:
            return repeat(atom, low, high)
        except ValueError as exc:
            raise self.fail(str(exc)) from None

    def atom(self) -> str:
        ch = self.take()
        if not ch:
            raise self.fail("the pattern ended early")
        if ch == "(":
            if self.peek() == "?":
                self.take()
                kind = self.take()
                if kind == ":":
                    pass
                elif kind == "<" and self.peek() and self.peek() not in "=!":
                    self.named_group()
                elif kind == "P" and self.peek() == "<":
                    self.take()
                    self.named_group()
                else:
                    raise self.fail("lookaround and inline flags")
            inner = self.alternation()
            if self.take() != ")":
                raise self.fail("an unclosed group")
            return f"({inner})" if inner else ""
        if ch == "[":
            return self.char_class()
        if ch == ".":
            return PLAIN_CHAR
        if ch == "\\":
            return self.escape()
        if ch in "*+?":
            raise self.fail(f"a quantifier {ch!r} with nothing before it")
        if ch == ")":
            raise self.fail("an unmatched ')'")
        return gbnf_literal(_json_char(ch))

    def named_group(self) -> None:
        end = self.src.find(">", self.pos)
        if end == -1:
            raise self.fail("an unclosed group name")
        self.pos = end + 1

    def escape(self) -> str:
        ch = self.take()
        if not ch:
            raise self.fail("a trailing backslash")
        if ch in _ESCAPE_RANGES:
            return f"[{_class_text(_ESCAPE_RANGES[ch])}]"
        if ch.lower() in _ESCAPE_RANGES:  # \D \W \S: neither those nor what JSON escapes
            return f"[^{_class_text(_ESCAPE_RANGES[ch.lower()] + _HOLES)}]"
        if ch.isdigit() and ch != "0" or ch in "bBk":
            raise self.fail(f"back-references and word boundaries (\\{ch})")
        if ch in "ux":
            return gbnf_literal(_json_char(self.hex_escape(ch)))
        return gbnf_literal(_json_char(_SIMPLE_ESCAPES.get(ch, ch)))

    def hex_escape(self, kind: str) -> str:
        size = 4 if kind == "u" else 2
        digits = self.src[self.pos : self.pos + size]
        if len(digits) != size or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise self.fail(f"a malformed \\{kind} escape")
        self.pos += size
        return chr(int(digits, 16))

    def char_class(self) -> str:
        negated = self.peek() == "^"
        if negated:
            self.take()
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            ch = self.take()
            if not ch:
                raise self.fail("an unclosed character class")
            if ch == "]" and not first:
                break
            first = False
            if ch == "\\":
                esc = self.take()
                if esc in _ESCAPE_RANGES:
                    ranges += _ESCAPE_RANGES[esc]
                    continue
                if esc.lower() in _ESCAPE_RANGES:
                    raise self.fail(f"\\{esc} inside a class")
                ch = self.class_escape(esc)
            if self.peek() == "-" and self.src[self.pos + 1 : self.pos + 2] not in ("]", ""):
                self.take()
                end = self.take()
                if end == "\\":
                    end = self.class_escape(self.take())
                if ord(end) < ord(ch):
                    raise self.fail("a class range out of order")
                ranges.append((ord(ch), ord(end)))
            else:
                ranges.append((ord(ch), ord(ch)))
        if negated:
            return f"[^{_class_text(ranges + _HOLES)}]"
        # JSON escapes '"' and '\\': those two come as their escapes, the rest as they are.
        options = [f"[{_class_text(_minus(ranges, _HOLES))}]"] if _minus(ranges, _HOLES) else []
        for special in ('"', "\\"):
            if any(low <= ord(special) <= high for low, high in ranges):
                options.append(gbnf_literal(_json_char(special)))
        if not options:
            raise self.fail("a class of control characters only")
        return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"

    def class_escape(self, esc: str) -> str:
        if not esc:
            raise self.fail("a trailing backslash")
        if esc in "ux":
            return self.hex_escape(esc)
        if esc == "b":
            return "\b"
        return _SIMPLE_ESCAPES.get(esc, esc)


def _minus(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    kept = list(ranges)
    for h_low, h_high in holes:
        pieces = []
        for low, high in kept:
            if high < h_low or low > h_high:
                pieces.append((low, high))
                continue
            if low < h_low:
                pieces.append((low, h_low - 1))
            if high > h_high:
                pieces.append((h_high + 1, high))
        kept = pieces
    return kept


def _class_text(ranges: list[tuple[int, int]]) -> str:
    return "".join(
        _class_char(chr(low))
        if low == high
        else f"{_class_char(chr(low))}-{_class_char(chr(high))}"
        for low, high in ranges
    )
