"""Turning a token stream into text: UTF-8 split over tokens, and stop strings.

Pure Python, no llama.cpp: the scheduler feeds it bytes and gets text that is safe to send.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class Utf8Stream:
    """Bytes in, complete characters out: a character split over two tokens waits for the rest."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """What is left at the end (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Holds back text that could be the start of a stop string; never emits a stop string.

    `push(text)` returns (text safe to emit now, stopped). Once stopped, the text after the stop
    string is dropped. `flush()` releases what was held back when generation ends otherwise.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        first = -1
        for stop in self._stops:
            at = buffer.find(stop)
            if at != -1 and (first == -1 or at < first):
                first = at
        if first != -1:
            self._held = ""
            self.stopped = True
            return buffer[:first], True
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest end of buffer that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens two sequences share from the start."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
