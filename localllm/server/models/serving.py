"""The handler behind /health, /metrics, /v1/models, /tokenize and /detokenize."""

from __future__ import annotations

import asyncio
from typing import Any

from localllm.server import types as t
from localllm.server.serving import Serving


class ModelsServing(Serving):
    def health(self) -> tuple[int, dict[str, Any]]:
        """(status, body): 503 while loading or after a failed load, else slots and the plan."""
        state = self.state
        if state.engine is None:
            body: dict[str, Any] = {"status": "error" if state.load_error else "loading"}
            if state.load_error and not state.public:
                body["error"] = state.load_error
            return 503, body
        stats = state.engine.stats()
        body = {
            "status": "ok",
            "model": state.model_id,
            "slots_idle": stats.n_slots - stats.busy_slots,
            "slots_processing": stats.busy_slots,
            "queue_length": stats.queue_length,
        }
        if not state.public:  # the plan names file paths and this machine's memory
            body.update(plan=state.plan_summary, warnings=state.warnings)
        return 200, body

    def metrics(self) -> bytes:
        return self.state.metrics.render()

    def list_models(self) -> t.ModelList:
        return t.ModelList(data=[self._card()])

    def model(self, name: str) -> t.ModelCard:
        self.check_model(name)
        return self._card()

    def _card(self) -> t.ModelCard:
        state = self.state
        extra: dict[str, Any] = {
            "loaded": state.engine is not None,
            "plan": state.plan_summary,
            "warnings": state.warnings,
        }
        if state.engine is not None:
            extra["n_ctx_slot"] = state.engine.n_ctx_slot
        return t.ModelCard(id=state.model_id, created=state.created, localllm=extra)

    async def tokenize(self, body: t.TokenizeRequest) -> list[int]:
        engine = self.engine()  # a 4 MiB text takes seconds: not on the event loop
        return await asyncio.to_thread(
            engine.tokenize, body.content, body.add_special, body.parse_special
        )

    async def detokenize(self, body: t.DetokenizeRequest) -> str:
        return await asyncio.to_thread(self.engine().detokenize, body.tokens)
