"""GBNF grammars for response_format: any JSON object, or JSON following a schema.

Limits, checked before llama.cpp sees a grammar (llama.cpp's GBNF parser recurses once per
nesting level and crashes the process with SIGSEGV when its stack runs out; a grammar's rules
are expanded in memory, one per repetition):
- at most MAX_GRAMMAR_BYTES of grammar text (a json_schema enum of ~2,500 short strings);
- parentheses nested at most MAX_GRAMMAR_DEPTH deep;
- every repetition bound ({m,n}, maxLength, maxItems) at most MAX_REPETITION, as in
  llama-server, which accepts maxLength 100000.
"""

from __future__ import annotations

import json
import re
from typing import Any

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


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The schema as a grammar, within the limits above (else RequestError naming the limit)."""
    from llama_cpp import llama_grammar

    # llama-cpp-python 0.3.36 writes "up to n" as n nested optional groups, (a (a (a)?)?)?, which
    # llama.cpp's parser overflows its stack on from about maxLength 20000; llama.cpp's own
    # converter (json-schema-to-grammar.cpp) writes a{m,n}, which its parser expands in a loop.
    llama_grammar._build_repetition = _build_repetition
    try:
        grammar: str = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise RequestError(
            "response_format.json_schema is nested too deeply to turn into a grammar",
            param="response_format",
        ) from None
    except Exception as exc:  # the converter raises bare exceptions of many kinds
        raise RequestError(
            f"response_format.json_schema: cannot turn the schema into a grammar: {exc}",
            param="response_format",
        ) from None
    check_grammar(grammar)
    return grammar


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


def _build_repetition(
    item_rule: str,
    min_items: int,
    max_items: int | None,
    separator_rule: str | None = None,
    item_rule_is_literal: bool = False,
) -> str:
    """llama.cpp's own `build_repetition` (common/json-schema-to-grammar.cpp): a{m,n}."""
    if max_items == 0:
        return ""
    if min_items == 0 and max_items == 1:
        return f"{item_rule}?"
    if not separator_rule:
        if min_items == 1 and max_items is None:
            return f"{item_rule}+"
        if min_items == 0 and max_items is None:
            return f"{item_rule}*"
        upper = "" if max_items is None else str(max_items)
        return f"{item_rule}{{{min_items},{upper}}}"
    rest = _build_repetition(
        f"({separator_rule} {item_rule})",
        min_items - 1 if min_items > 0 else 0,
        None if max_items is None else max_items - 1,
    )
    result = f"{item_rule} {rest}"
    return f"({result})?" if min_items == 0 else result
