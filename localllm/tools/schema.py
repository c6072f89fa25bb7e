"""JSON Schema to a GBNF grammar that only generates documents the schema accepts.

The grammar is a subset of the schema's language: every document it lets the model write
validates, but not every valid document can be written (object properties come in the schema's
order; declared properties only, when there are any; at most one space between tokens, so small
models cannot run away in whitespace). Keywords that constrain documents and that the grammar
cannot enforce (`multipleOf`, `uniqueItems`, `not`, a `pattern` with lookaround, ...) raise
`UnsupportedSchemaError` naming the keyword and where it is: the request gets a 400 instead of an
answer that silently ignores part of its schema. Keywords that only annotate (`title`,
`description`, `default`, `examples`, ...) are ignored.

Supported: `type` (one or a list), `enum`, `const`, `$ref` to `#/...` (recursion included),
`$defs`/`definitions`, `anyOf`, `oneOf` (generated as anyOf: alternatives the model could match
twice are the schema author's to keep disjoint), `allOf` of object schemas (merged),
`properties`/`required`/`additionalProperties`, `items`/`prefixItems` with
`minItems`/`maxItems`, `minLength`/`maxLength` (any size: llama.cpp treats a repetition bound
above 2000 as unbounded, so long bounds are split into chunks), string `format` date, time,
date-time and uuid, `pattern` (see `localllm.tools.pattern`), integer `minimum`/`maximum` and
their exclusive forms (as digit patterns).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from localllm.errors import UnsupportedSchemaError
from localllm.tools.gbnf import gbnf_literal, repeat
from localllm.tools.pattern import UnsupportedPattern, pattern_gbnf

# Integers are JSON numbers of at most this many digits (llama.cpp's own converter's limit).
MAX_INTEGER_DIGITS = 16

_ANNOTATIONS = frozenset(
    {
        "$schema", "$id", "$comment", "$anchor", "title", "description", "default", "examples",
        "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "strict",
        "discriminator", "nullable",
    }
)  # fmt: skip
_STRUCTURAL = frozenset(
    {
        "type", "enum", "const", "$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf",
        "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
        "maxItems", "minLength", "maxLength", "format", "pattern", "minimum", "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum", "unevaluatedProperties", "uniqueItems",
    }
)  # fmt: skip

PRIMITIVES: dict[str, str] = {
    "ws": '| " "',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "integral-part": "[0] | [1-9] [0-9]{0,15}",
    "decimal-part": "[0-9]{1,16}",
    "integer": '"-"? integral-part',
    "number": '"-"? integral-part ("." decimal-part)? ([eE] [-+]? integral-part)?',
    "char": '[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char* "\\""',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws ( string ":" ws value ("," ws string ":" ws value)* )? ws "}"',
    "array": '"[" ws ( value ("," ws value)* )? ws "]"',
}
# Which primitives each one needs, so a grammar carries only what it uses.
_PRIMITIVE_DEPS: dict[str, tuple[str, ...]] = {
    "integer": ("integral-part",),
    "number": ("integral-part", "decimal-part"),
    "string": ("char",),
    "value": ("object", "array", "string", "number", "boolean", "null"),
    "object": ("ws", "string", "value"),
    "array": ("ws", "value"),
}

_FORMATS: dict[str, str] = {
    "date": '"\\"" [0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( [0-2] [0-9] | "3" [0-1] ) "\\""',
    "time": (
        '"\\"" ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{3})?'
        ' ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9]) "\\""'
    ),
    "date-time": (
        '"\\"" [0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( [0-2] [0-9] | "3" [0-1] ) "T"'
        ' ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{3})?'
        ' ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9]) "\\""'
    ),
    "uuid": (
        '"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-"'
        ' [0-9a-fA-F]{12} "\\""'
    ),
}

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9-]+")


def json_literal(value: Any) -> str:
    """A GBNF literal for one JSON value, written compactly as the model should write it."""
    return gbnf_literal(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))


def integer_range(low: int | None, high: int | None) -> str:
    """GBNF for the integers in [low, high] (None: unbounded), written without leading zeros,
    as digit patterns: [5, 120] is [5-9] | [1-9] [0-9] | "1" [0-1] [0-9] | "120"."""
    alternatives: list[str] = []
    if low is None or low < 0:
        # Negative numbers: "-" and a magnitude in [max(1, -high), -low].
        magnitude_low = 1 if high is None or high >= 0 else -high
        magnitude_high = None if low is None else -low
        alternatives += [f'"-" {a}' for a in _natural_range(magnitude_low, magnitude_high)]
    if high is None or high >= 0:
        alternatives += _natural_range(max(low or 0, 0), high)
    return " | ".join(f"({a})" if " | " in a else a for a in alternatives)


def _natural_range(low: int, high: int | None) -> list[str]:
    """Patterns for the non-negative integers in [low, high]; high None: unbounded."""
    if high is not None and high < low:
        return []
    top = high if high is not None else 10 ** len(str(low)) - 1
    patterns = [_digits_pattern(a, b) for a, b in _split_range(low, top)]
    more = len(str(top))
    if high is None and more < MAX_INTEGER_DIGITS:
        # Every number with more digits than `top`, up to the digits an integer may have.
        patterns.append(f"[1-9] [0-9]{{{more},{MAX_INTEGER_DIGITS - 1}}}")
    return patterns


def _split_range(low: int, high: int) -> list[tuple[int, int]]:
    """[low, high] as ranges whose ends have the same digits but for a run of [x-y] digits and
    then [0-9]s (the classic regex range split)."""
    stops = {high}
    nines = 1
    stop = int(str(low)[:-nines] + "9" * nines) if nines <= len(str(low)) else -1
    while low <= stop < high:
        stops.add(stop)
        nines += 1
        digits = str(low)
        stop = int(digits[:-nines] + "9" * nines) if nines <= len(digits) else int("9" * nines)
    zeros = 1
    stop = (high + 1) // 10**zeros * 10**zeros - 1
    while low < stop <= high:
        stops.add(stop)
        zeros += 1
        stop = (high + 1) // 10**zeros * 10**zeros - 1
    ranges = []
    start = low
    for stop in sorted(stops):
        ranges.append((start, stop))
        start = stop + 1
    return ranges


def _digits_pattern(low: int, high: int) -> str:
    a, b = str(low), str(high)
    assert len(a) == len(b)
    parts = []
    for x, y in zip(a, b, strict=True):
        parts.append(f'"{x}"' if x == y else f"[{x}-{y}]")
    return " ".join(parts)


class GrammarBuilder:
    """Collects named rules; several schemas (one per tool) can share one builder."""

    def __init__(self) -> None:
        self._rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}

    def primitive(self, name: str) -> str:
        if name not in self._rules:
            self._rules[name] = PRIMITIVES[name]  # first: value and object refer to each other
            for dep in _PRIMITIVE_DEPS.get(name, ()):
                self.primitive(dep)
        return name

    def add(self, hint: str, body: str) -> str:
        """A rule with this body (an existing one if the body was seen before)."""
        if body in self._by_body:
            return self._by_body[body]
        name = self.reserve(hint)
        self.define(name, body)
        return name

    def reserve(self, hint: str) -> str:
        base = _NAME_UNSAFE.sub("-", hint).strip("-").lower() or "rule"
        if base in PRIMITIVES or base == "root":
            base += "-x"
        name, n = base, 1
        while name in self._rules:
            n += 1
            name = f"{base}-{n}"
        self._rules[name] = ""  # placeholder until defined
        return name

    def define(self, name: str, body: str) -> None:
        self._rules[name] = body
        self._by_body.setdefault(body, name)

    def schema(self, schema: Any, hint: str, *, where: str) -> str:
        """The name of a rule generating JSON valid under `schema` (a JSON Schema document)."""
        try:
            return _SchemaVisitor(self, schema, where).visit(schema, hint, "#")
        except RecursionError:
            raise UnsupportedSchemaError(
                f"{where}: the schema is nested too deeply to become a grammar",
                param=_param(where),
            ) from None

    def render(self, root: str) -> str:
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self._rules.items()]
        return "\n".join(lines) + "\n"


def json_schema_grammar(schema: Any, *, where: str = "response_format.json_schema") -> str:
    """A complete GBNF grammar (root rule `root`) for one JSON Schema."""
    if not isinstance(schema, dict | bool):
        raise UnsupportedSchemaError(
            f"{where}: a schema must be a JSON object", param=_param(where)
        )
    builder = GrammarBuilder()
    rule = builder.schema(schema, "root-value", where=where)
    return builder.render(rule)


def _param(where: str) -> str:
    return where.split(".", 1)[0].split("[", 1)[0]


class _SchemaVisitor:
    def __init__(self, builder: GrammarBuilder, root: Any, where: str) -> None:
        self.b = builder
        self.root = root
        self.where = where
        self.refs: dict[str, str] = {}
        # References being expanded with nothing written yet: one met again is a loop, a rule
        # that refers to itself first (llama.cpp refuses such left recursion).
        self._head: set[str] = set()

    # ------------------------------------------------------------------ errors

    def fail(self, path: str, problem: str) -> UnsupportedSchemaError:
        return UnsupportedSchemaError(
            f"{self.where}: {problem} (at {path}); remove it or express it with the supported "
            "keywords (type, enum, const, $ref, anyOf, properties, required, items, "
            "minItems/maxItems, minLength/maxLength, pattern, format date/time/date-time/uuid, "
            "integer minimum/maximum)",
            param=_param(self.where),
        )

    def unsupported(self, path: str, keyword: str) -> UnsupportedSchemaError:
        return self.fail(
            path, f"the JSON Schema keyword {keyword!r} cannot be enforced by a grammar"
        )

    # ------------------------------------------------------------------ dispatch

    def visit(self, schema: Any, hint: str, path: str) -> str:
        if schema is True or schema == {}:
            return self.b.primitive("value")
        if schema is False:
            raise self.fail(path, "the schema `false` accepts nothing")
        if not isinstance(schema, dict):
            raise self.fail(path, f"a schema must be an object or a boolean, not {schema!r}")
        for key in schema:
            if key not in _ANNOTATIONS and key not in _STRUCTURAL:
                raise self.unsupported(path, key)
        if "$ref" in schema:
            extra = set(schema) - _ANNOTATIONS - {"$ref", "$defs", "definitions"}
            if extra:
                raise self.fail(path, f"$ref next to {sorted(extra)} is not supported")
            return self.ref(schema["$ref"], path)
        if "const" in schema:
            return self.b.add(hint, json_literal(schema["const"]))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(path, "enum must be a non-empty list")
            return self.b.add(hint, " | ".join(json_literal(v) for v in values))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.alternatives(schema, key, hint, path)
        if "allOf" in schema:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            parts = schema["allOf"]
            if not isinstance(parts, list):
                raise self.fail(path, "allOf must be a list")
            for i, part in enumerate(parts):
                merged = _merge(merged, self.resolve(part), f"{path}/allOf/{i}", self)
            return self.visit(merged, hint, path)
        types = schema.get("type")
        if isinstance(types, list):
            if not types:
                raise self.fail(path, "type must not be an empty list")
            rules = [self.visit({**schema, "type": t}, f"{hint}-{t}", path) for t in types]
            return self.b.add(hint, " | ".join(rules))
        if types is None:
            if "properties" in schema or "additionalProperties" in schema:
                types = "object"
            elif "items" in schema or "prefixItems" in schema:
                types = "array"
            elif _has_constraints(schema):
                raise self.fail(path, "a schema with constraints needs a `type`")
            else:
                return self.b.primitive("value")
        if not isinstance(types, str):
            raise self.fail(path, f"type must be a name or a list of names, not {types!r}")
        handler: Callable[[dict[str, Any], str, str], str] | None = {
            "object": self.object,
            "array": self.array,
            "string": self.string,
            "integer": self.integer,
            "number": self.number,
            "boolean": lambda s, h, p: self.b.primitive("boolean"),
            "null": lambda s, h, p: self.b.primitive("null"),
        }.get(types)
        if handler is None:
            raise self.fail(path, f"unknown type {types!r}")
        # Keywords of other types (maxLength next to type integer) do not apply, per JSON Schema.
        if types not in ("object", "array"):
            return handler(schema, hint, path)
        head, self._head = self._head, set()  # "{" or "[" is written before anything recurs
        try:
            return handler(schema, hint, path)
        finally:
            self._head = head

    def alternatives(self, schema: dict[str, Any], key: str, hint: str, path: str) -> str:
        options = schema[key]
        if not isinstance(options, list) or not options:
            raise self.fail(path, f"{key} must be a non-empty list")
        # Keywords beside anyOf (a shared `type`, say) apply to every alternative.
        base = {k: v for k, v in schema.items() if k != key}
        rules = []
        for i, option in enumerate(options):
            where = f"{path}/{key}/{i}"
            if _has_constraints(base):
                option = _merge(base, self.resolve(option), where, self)
            rules.append(self.visit(option, f"{hint}-{i}", where))
        return self.b.add(hint, " | ".join(rules))

    # ------------------------------------------------------------------ $ref

    def resolve(self, schema: Any) -> Any:
        if isinstance(schema, dict) and "$ref" in schema and len(schema) == 1:
            return self.lookup(schema["$ref"], "#")
        return schema

    def lookup(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.fail(path, f"only local references (#/...) are supported, not {ref!r}")
        target: Any = self.root
        for raw in ref[1:].split("/")[1:] if ref != "#" else []:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise self.fail(path, f"the reference {ref!r} points to nothing")
        return target

    def ref(self, ref: Any, path: str) -> str:
        target = self.lookup(ref, path)
        key = str(ref)
        if key in self._head:
            raise self.fail(
                path,
                f"the reference {key!r} leads back to itself before any value is written "
                "(a $ref loop)",
            )
        if key not in self.refs:
            name = self.b.reserve("ref-" + key.rsplit("/", 1)[-1])
            self.refs[key] = name  # before visiting: recursive schemas refer to the name
            self._head.add(key)
            try:
                self.b.define(name, self.visit(target, name + "-body", key))
            finally:
                self._head.discard(key)
        return self.refs[key]

    # ------------------------------------------------------------------ types

    def object(self, schema: dict[str, Any], hint: str, path: str) -> str:
        properties = schema.get("properties") or {}
        if not isinstance(properties, dict):
            raise self.fail(path, "properties must be an object")
        required = schema.get("required") or []
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(path, "required must be a list of names")
        missing = [r for r in required if r not in properties]
        additional = schema.get("additionalProperties", None)
        if missing and (additional is False or additional is None and properties):
            raise self.fail(
                path,
                f"required properties {missing} are not declared in properties, so no object "
                "can be written",
            )
        if missing:
            raise self.fail(path, f"required properties {missing} without a declared schema")
        ws = self.b.primitive("ws")
        if not properties:
            if additional is False:
                return self.b.add(hint, '"{" ws "}"')
            if additional is None or additional is True:
                return self.b.primitive("object")
            value = self.visit(additional, f"{hint}-additional", f"{path}/additionalProperties")
            string = self.b.primitive("string")
            pair = f'{string} ":" {ws} {value}'
            return self.b.add(hint, f'"{{" {ws} ( {pair} ("," {ws} {pair})* )? {ws} "}}"')
        # Declared properties only, in declaration order (extra ones are optional anyway).
        # `first_k`: properties k.. when none is written yet; `after_k`: when one was.
        names = list(properties)
        pairs = [
            self.b.add(
                f"{hint}-{name}-kv",
                f'{gbnf_literal(json.dumps(name, ensure_ascii=False))} ":" {ws} '
                + self.visit(properties[name], f"{hint}-{name}", f"{path}/properties/{name}"),
            )
            for name in names
        ]
        first, after = "", ""
        for k in range(len(names) - 1, -1, -1):
            pair = pairs[k]
            if names[k] in required:
                new_after = f'"," {ws} {pair} {after}'.strip()
                new_first = f"{pair} {after}".strip()
            else:
                new_after = f'("," {ws} {pair})? {after}'.strip()
                # An empty alternative goes first: a trailing "|" would swallow the newline.
                taken = f"{pair} {after}".strip()
                new_first = f"{taken} | {first}" if first else f"| {taken}"
            if k > 0:  # nothing comes before the first property
                after = self.b.add(f"{hint}-after-{k}", new_after)
            first = self.b.add(f"{hint}-from-{k}", new_first)
        return self.b.add(hint, f'"{{" {ws} {first} {ws} "}}"')

    def array(self, schema: dict[str, Any], hint: str, path: str) -> str:
        min_items = _count(schema, "minItems", path, self)
        max_items = schema.get("maxItems")
        if max_items is not None:
            max_items = _count(schema, "maxItems", path, self)
            if max_items < min_items:
                raise self.fail(path, "maxItems is below minItems")
        if schema.get("uniqueItems") and (max_items is None or max_items > 1):
            raise self.unsupported(path, "uniqueItems")
        ws = self.b.primitive("ws")
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if prefix is not None:
            if not isinstance(prefix, list):
                raise self.fail(path, "prefixItems must be a list")
            n = len(prefix)
            if n < min_items or (max_items is not None and n > max_items):
                raise self.fail(path, "prefixItems with minItems/maxItems other than its length")
            rules = [
                self.visit(p, f"{hint}-{i}", f"{path}/prefixItems/{i}")
                for i, p in enumerate(prefix)
            ]
            body = f' "," {ws} '.join(rules)
            return self.b.add(hint, f'"[" {ws} {body} {ws} "]"' if rules else '"[" ws "]"')
        item = self.visit(items, f"{hint}-item", f"{path}/items")
        if max_items == 0:
            return self.b.add(hint, f'"[" {ws} "]"')
        try:
            more = repeat(
                f'"," {ws} {item}',
                max(min_items - 1, 0),
                None if max_items is None else max_items - 1,
            )
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None
        body = f"{item} {more}".strip()
        if min_items == 0:
            body = f"({body})?"
        return self.b.add(hint, f'"[" {ws} {body} {ws} "]"')

    def string(self, schema: dict[str, Any], hint: str, path: str) -> str:
        if "pattern" in schema:
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                raise self.fail(path, "pattern must be a string")
            others = [k for k in ("format", "minLength", "maxLength") if k in schema]
            if others:
                raise self.fail(path, f"pattern together with {', '.join(others)}")
            try:
                body = pattern_gbnf(pattern)
            except UnsupportedPattern as exc:
                raise self.fail(
                    path, f"the pattern {pattern!r} cannot be a grammar: {exc}"
                ) from None
            return self.b.add(hint, f'"\\"" {body} "\\""')
        if "format" in schema:
            fmt = schema["format"]
            if not isinstance(fmt, str) or fmt not in _FORMATS:
                raise self.fail(
                    path, f"string format {fmt!r} is not supported (only {sorted(_FORMATS)})"
                )
            if "minLength" in schema or "maxLength" in schema:
                raise self.fail(path, "minLength/maxLength together with format")
            return self.b.add(f"{hint}-{fmt}", _FORMATS[fmt])
        min_len = _count(schema, "minLength", path, self)
        max_len = schema.get("maxLength")
        if max_len is not None:
            max_len = _count(schema, "maxLength", path, self)
            if max_len < min_len:
                raise self.fail(path, "maxLength is below minLength")
        if min_len == 0 and max_len is None:
            return self.b.primitive("string")
        char = self.b.primitive("char")
        try:
            body = repeat(char, min_len, max_len)
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None
        return self.b.add(hint, f'"\\"" {body} "\\""')

    def integer(self, schema: dict[str, Any], hint: str, path: str) -> str:
        low, high = _integer_bounds(schema, path, self)
        if low is None and high is None:
            return self.b.primitive("integer")
        if low is not None and high is not None and high < low:
            raise self.fail(path, "maximum is below minimum: no integer fits")
        return self.b.add(hint, integer_range(low, high))

    def number(self, schema: dict[str, Any], hint: str, path: str) -> str:
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in schema:
                raise self.fail(path, f"{key} on a number (only integers can be bounded)")
        return self.b.primitive("number")


def _count(schema: Mapping[str, Any], key: str, path: str, visitor: _SchemaVisitor) -> int:
    value = schema.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise visitor.fail(path, f"{key} must be a non-negative integer")
    return value


def _integer_bounds(
    schema: Mapping[str, Any], path: str, visitor: _SchemaVisitor
) -> tuple[int | None, int | None]:
    def number(key: str) -> float | None:
        value = schema.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise visitor.fail(path, f"{key} must be a number")
        if not math.isfinite(value):
            raise visitor.fail(path, f"{key} must be finite")
        return float(value)

    low, high = number("minimum"), number("maximum")
    ex_low, ex_high = number("exclusiveMinimum"), number("exclusiveMaximum")
    lo = None if low is None else math.ceil(low)
    hi = None if high is None else math.floor(high)
    if ex_low is not None:
        candidate = math.floor(ex_low) + 1
        lo = candidate if lo is None else max(lo, candidate)
    if ex_high is not None:
        candidate = math.ceil(ex_high) - 1
        hi = candidate if hi is None else min(hi, candidate)
    # JSON integers here have at most MAX_INTEGER_DIGITS digits: a bound beyond that is none.
    largest = 10**MAX_INTEGER_DIGITS - 1
    if lo is not None and lo > largest or hi is not None and hi < -largest:
        raise visitor.fail(path, f"no integer of at most {MAX_INTEGER_DIGITS} digits is in range")
    lo = None if lo is not None and lo < -largest else lo
    hi = None if hi is not None and hi > largest else hi
    return lo, hi


def _has_constraints(schema: Mapping[str, Any]) -> bool:
    return any(k not in _ANNOTATIONS and k not in ("$defs", "definitions") for k in schema)


def _merge(
    base: Mapping[str, Any], extra: Any, path: str, visitor: _SchemaVisitor
) -> dict[str, Any]:
    """allOf (and a schema's own keywords next to anyOf) as one schema: objects' properties and
    required lists are joined; any other keyword must agree."""
    if not isinstance(extra, dict):
        raise visitor.fail(path, "allOf/anyOf parts must be schema objects")
    merged = dict(base)
    for key, value in extra.items():
        if key in _ANNOTATIONS or key in ("$defs", "definitions"):
            continue
        if key == "properties":
            if not isinstance(value, dict) or not isinstance(merged.get("properties", {}), dict):
                raise visitor.fail(path, "properties must be an object")
            props = dict(merged.get("properties") or {})
            for name, sub in value.items():
                if name in props and props[name] != sub:
                    raise visitor.fail(path, f"allOf declares property {name!r} twice differently")
                props[name] = sub
            merged["properties"] = props
        elif key == "required":
            before = merged.get("required", [])
            if not all(isinstance(r, list) and all(isinstance(n, str) for n in r)
                       for r in (value, before)):  # fmt: skip
                raise visitor.fail(path, "required must be a list of names")
            merged["required"] = list(dict.fromkeys([*before, *value]))
        elif key in merged and merged[key] != value:
            raise visitor.fail(path, f"allOf parts disagree on {key!r}")
        else:
            merged[key] = value
    return merged
