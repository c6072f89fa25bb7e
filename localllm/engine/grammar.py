"""GBNF grammars for response_format: any JSON object, or JSON following a schema."""

from __future__ import annotations

import json
from typing import Any

from localllm.errors import RequestError


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's json_object mode). Whitespace is at most one space: small models
    otherwise run away in newlines and indentation and never close the object."""
    from llama_cpp.llama_grammar import JSON_GBNF

    lines = [ln for ln in JSON_GBNF.splitlines() if not ln.startswith("ws ")]
    return "\n".join(lines) + '\nws ::= | " "\n'


def json_schema_grammar(schema: dict[str, Any]) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar: str = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare exceptions of many kinds
        raise RequestError(
            f"response_format.json_schema: cannot turn the schema into a grammar: {exc}",
            param="response_format",
        ) from None
    return grammar
