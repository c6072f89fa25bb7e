"""llama.cpp's log lines, routed into Python `logging` and kept for the profile tool.

llama.cpp logs through one process-wide callback. We install ours once; every line goes to the
`localllm.llama` logger, and lines logged while a `LogCapture` is active are also kept (the load
log carries `... buffer size = X MiB` and `llama_kv_cache: size = ...`). Debug lines are dropped
before any Python work: llama.cpp's debug output is what makes verbose mode 100x slower.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

from localllm.units import MIB

logger = logging.getLogger("localllm.llama")

# ggml_log_level in the vendored llama.cpp, as measured: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4,
# CONT 5 (continues the previous line). Older releases had INFO 1 ... DEBUG 4; check on upgrades.
_LEVELS = {0: logging.CRITICAL, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_GGML_DEBUG = 1
_GGML_CONT = 5

_lock = threading.Lock()
_captures: list[list[str]] = []
_partial: list[str] = []  # text of a line still being written (no newline yet)
_partial_level = logging.INFO
_last_level = 2
_callback: Any = None  # keeps the ctypes callback alive for the process lifetime


def _on_log(level: int, text: bytes | None, _user_data: Any) -> None:
    global _last_level, _partial_level
    if level == _GGML_CONT:
        level = _last_level
    _last_level = level
    if level == _GGML_DEBUG or not text:
        return
    chunk = text.decode("utf-8", errors="replace")
    with _lock:
        if not _partial:
            _partial_level = _LEVELS.get(level, logging.INFO)
        _partial.append(chunk)
        if not chunk.endswith("\n"):
            return
        lines = "".join(_partial).splitlines()
        _partial.clear()
        for capture in _captures:
            capture.extend(lines)
    for line in lines:
        if line.strip():
            logger.log(_partial_level, "%s", line)


def install() -> None:
    """Route llama.cpp's logs to Python logging (idempotent; replaces llama-cpp-python's)."""
    global _callback
    import llama_cpp

    with _lock:
        if _callback is not None:
            return
        _callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


@contextmanager
def capture() -> Iterator[list[str]]:
    """Keep every llama.cpp line logged inside the block in the yielded list."""
    install()
    lines: list[str] = []
    with _lock:
        _captures.append(lines)
    try:
        yield lines
    finally:
        with _lock:
            _captures.remove(lines)


# "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB", "llama_kv_cache:   CUDA0 KV buffer
# size = 24.00 MiB", "llama_context:  CUDA_Host  output buffer size = 4.00 MiB",
# "sched_reserve:  CUDA0 compute buffer size = 514.50 MiB" (llama-model.cpp, llama-kv-cache.cpp,
# llama-context.cpp): the buffer's name, what it holds, and its size, rounded to 0.01 MiB.
_BUFFER_LINE = re.compile(
    r"(?P<buffer>\S+)\s+(?P<kind>model|KV|output|compute) buffer size =\s*(?P<mib>[\d.]+) MiB"
)
BufferKind = Literal["model", "KV", "output", "compute"]


@dataclass(frozen=True)
class BufferLine:
    buffer: str  # "CPU_Mapped", "CPU_REPACK", "CUDA0", "CUDA_Host", ...
    kind: BufferKind
    bytes: int


def buffer_lines(lines: Iterable[str]) -> list[BufferLine]:
    """Every `... buffer size = X MiB` line of a load log, in order."""
    found = []
    for line in lines:
        if match := _BUFFER_LINE.search(line):
            kind = cast(BufferKind, match["kind"])
            found.append(BufferLine(match["buffer"], kind, round(float(match["mib"]) * MIB)))
    return found


_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def placement(lines: Iterable[str]) -> str:
    """llama.cpp's own account of where the weights went, for the load's log line:
    'offloaded 29/29 layers to GPU; weights: CUDA0 1234.50 MiB, CPU_Mapped 98.00 MiB'."""
    lines = list(lines)
    parts = []
    for line in lines:
        if match := _OFFLOADED.search(line):
            parts.append(f"offloaded {match[1]}/{match[2]} layers to GPU")
    weights = [b for b in buffer_lines(lines) if b.kind == "model"]
    if weights:
        sizes = ", ".join(f"{b.buffer} {b.bytes / MIB:.2f} MiB" for b in weights)
        parts.append(f"weights: {sizes}")
    return "; ".join(parts)
