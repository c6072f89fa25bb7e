"""GBNF grammars the engine takes: any JSON object, and the limits every grammar is checked
against (schemas become grammars in `localllm.tools.schema`).

Limits, checked before llama.cpp sees a grammar (llama.cpp's GBNF parser recurses once per
nesting level and crashes the process with SIGSEGV when its stack runs out; a grammar's rules
are expanded in memory, one per repetition):
- at most MAX_GRAMMAR_BYTES of grammar text (a json_schema enum of ~2,500 short strings);
- parentheses nested at most MAX_GRAMMAR_DEPTH deep;
- every repetition bound ({m,n}, maxLength, maxItems) at most MAX_REPETITION, as in
  llama-server, which accepts maxLength 100000.
"""

from __future__ import annotations

import re

from localllm.errors import RequestError

MAX_GRAMMAR_BYTES = 64 * 1024
MAX_GRAMMAR_DEPTH = 64
MAX_REPETITION = 100_000

_REPETITION = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's json_object mode). Whitespace is at most one space: small models
    otherwise run away in newlines and indentation and never close the object."""
    from llama_cpp.llama_grammar import JSON_GBNF

    lines = [ln for ln in JSON_GBNF.splitlines() if not ln.startswith("ws ")]
    return "\n".join(lines) + '\nws ::= | " "\n'


def check_grammar(grammar: str, param: str = "response_format") -> None:
    """Refuse a grammar beyond the module's limits, naming the limit (and `param`, the field
    whose schema it came from)."""
    size = len(grammar.encode("utf-8"))
    if size > MAX_GRAMMAR_BYTES:
        raise RequestError(
            f"the schema's grammar is {size} bytes, over this server's limit of "
            f"{MAX_GRAMMAR_BYTES} (a smaller enum or schema fits)",
            param=param,
        )
    depth = deepest = 0
    structure = _outside_literals(grammar)
    for char in structure:
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    if deepest > MAX_GRAMMAR_DEPTH:
        raise RequestError(
            f"the schema's grammar nests {deepest} deep, over this server's limit of "
            f"{MAX_GRAMMAR_DEPTH}",
            param=param,
        )
    for match in _REPETITION.finditer(structure):
        bound = max(int(match[1]), int(match[2] or 0))
        if bound > MAX_REPETITION:
            raise RequestError(
                f"the schema repeats something up to {bound} times (maxLength, maxItems or a "
                f"pattern's {{m,n}}), over this server's limit of {MAX_REPETITION}",
                param=param,
            )


def _outside_literals(grammar: str) -> str:
    """The grammar with "strings", [classes] and # comments blanked out: its structure only."""
    out: list[str] = []
    i, n = 0, len(grammar)
    while i < n:
        char = grammar[i]
        if char in '"[':
            close = '"' if char == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
            out.append(" ")
        elif char == "#":
            while i < n and grammar[i] != "\n":
                i += 1
            out.append(" ")
        else:
            out.append(char)
        i += 1
    return "".join(out)
