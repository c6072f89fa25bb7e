"""What the router and a model's worker process say to each other over their pipe.

Each message is one tuple sent with `multiprocessing.connection.Connection.send`, which frames
it (a length prefix) and pickles it: both ends are this package in processes this router
started, so the pickles are trusted. Requests carry an id the parent picks:

    parent -> worker                         worker -> parent
    ("submit", id, GenerationRequest)        ("accepted", id) then ("event", id, Event)...
    ("cancel", id)                           ("error", id, WireError)  (ends request `id`)
    ("call", id, method, args)               ("result", id, value)
    ("shutdown",)                            ("ready", WorkerInfo) | ("load_failed", WireError)

Exceptions travel as `WireError` (class name, message, attributes) and are rebuilt only as
classes of `localllm.errors`, so a message cannot name an arbitrary class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from localllm import errors
from localllm.errors import LocalLLMError

# Engine methods a parent may call in its worker (anything else is refused there).
CALLABLE = frozenset(
    {
        "tokenize",
        "detokenize",
        "apply_chat_template",
        "chat_prompt",
        "chat_render",
        "tool_syntax",
        "embed",
        "stats",
        "cancel_all",
    }
)


@dataclass(frozen=True)
class WireError:
    kind: str
    message: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports once its model is loaded."""

    pid: int
    load_seconds: float
    n_ctx: int
    n_parallel: int
    n_ctx_slot: int
    memory_mib: dict[str, float]  # from llama.cpp's load log: model, kv_cache, compute, output
    embedding_only: bool


def to_wire(exc: BaseException) -> WireError:
    if isinstance(exc, LocalLLMError):
        attributes = {
            key: value
            for key, value in vars(exc).items()
            if isinstance(value, str | int | float | bool | type(None))
        }
        return WireError(type(exc).__name__, str(exc), attributes)
    return WireError("LocalLLMError", f"{type(exc).__name__}: {exc}")


def from_wire(wire: WireError) -> LocalLLMError:
    cls = getattr(errors, wire.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, LocalLLMError)):
        cls = LocalLLMError
    exc = cls.__new__(cls)
    Exception.__init__(exc, wire.message)
    exc.__dict__.update(wire.attributes)
    return exc
