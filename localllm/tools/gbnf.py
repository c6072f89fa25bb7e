"""GBNF writing helpers shared by the schema and pattern converters."""

from __future__ import annotations

# llama.cpp's grammar parser (llama-grammar.cpp, MAX_REPETITION_THRESHOLD) refuses a minimum
# repetition above this and silently drops a larger maximum, so every {m,n} we write stays <= it.
MAX_REPETITION = 2000
_CHUNK = 1000

# One character of JSON string text that needs no escape.
PLAIN_CHAR = '[^"\\\\\\x7F\\x00-\\x1F]'


def gbnf_literal(text: str) -> str:
    """A GBNF string literal matching exactly `text`."""
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def repeat(item: str, min_times: int, max_times: int | None) -> str:
    """`item` between min_times and max_times times (None: unbounded), within llama.cpp's
    repetition limit: long bounds become a chunk of 1000 repeated, plus a remainder."""
    if max_times is not None and max_times < min_times:
        raise ValueError("max_times < min_times")
    if max_times is not None and max_times == 0:
        return ""
    if min_times <= MAX_REPETITION and (max_times is None or max_times <= MAX_REPETITION):
        if max_times is None:
            return f"({item})*" if min_times == 0 else f"({item}){{{min_times},}}"
        if min_times == max_times:
            return f"({item}){{{min_times}}}"
        return f"({item}){{{min_times},{max_times}}}"
    chunk = f"(({item}){{{_CHUNK}}})"
    q_lo, r_lo = divmod(min_times, _CHUNK)
    if max_times is None:
        return f"{chunk}{{{q_lo}}} ({item}){{{r_lo},}}"
    q_hi, r_hi = divmod(max_times, _CHUNK)
    if q_hi > MAX_REPETITION:
        raise ValueError(f"a bound of {max_times} is beyond what a grammar can count")
    head = f"{chunk}{{{q_lo}}} " if q_lo else ""
    if q_lo == q_hi:
        return f"{head}({item}){{{r_lo},{r_hi}}}"
    # q_lo chunks then: a tail of r_lo..999 items, or more chunks (all but the last full one
    # with any tail, the last one with a tail up to r_hi).
    alternatives = [f"({item}){{{r_lo},{_CHUNK - 1}}}"]
    middle = q_hi - q_lo - 1
    if middle > 0:
        alternatives.append(f"{chunk}{{1,{middle}}} ({item}){{0,{_CHUNK - 1}}}")
    last = f" ({item}){{0,{r_hi}}}" if r_hi else ""
    alternatives.append(f"{chunk}{{{middle + 1}}}{last}")
    return f"{head}({' | '.join(alternatives)})"
