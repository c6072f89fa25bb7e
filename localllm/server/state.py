"""What every part of the HTTP layer shares: the engine protocol and the app's state record."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from localllm.engine.handle import RequestHandle
from localllm.engine.types import EngineStats, GenerationRequest
from localllm.server.metrics import Metrics
from localllm.settings import Settings
from localllm.tools import ToolSyntax

if TYPE_CHECKING:
    from localllm.router import Router


class ServingEngine(Protocol):
    """What the HTTP layer uses of `localllm.engine.Engine` (tests pass a fake)."""

    @property
    def n_ctx_slot(self) -> int: ...

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]: ...
    def detokenize(self, tokens: list[int]) -> str: ...
    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str | tuple[int, ...]: ...
    def chat_render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str | tuple[int, ...], bool]: ...
    def tool_syntax(self) -> ToolSyntax: ...
    def submit(self, request: GenerationRequest) -> RequestHandle: ...
    def stats(self) -> EngineStats: ...
    def cancel_all(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class AppState:
    """One app's state, on `app.state.localllm`; nothing in the HTTP layer is module-global."""

    settings: Settings
    model_id: str
    model_names: set[str]
    plan_summary: dict[str, Any]
    warnings: list[str]
    metrics: Metrics
    api_keys: list[str]
    allowed_hosts: frozenset[str] | None = None  # None: any Host (a public bind)
    engine: ServingEngine | None = None
    router: Router | None = None  # serving a models folder: models load by name, in workers
    own_engine: bool = False  # close it on shutdown (it was loaded by this app)
    load_error: str | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def public(self) -> bool:
        """Bound beyond loopback: say nothing about this machine to unauthenticated callers."""
        return self.allowed_hosts is None

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None
