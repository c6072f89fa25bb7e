"""The handler behind /health, /metrics, /v1/models, /tokenize and /detokenize."""

from __future__ import annotations

from typing import Any

from localllm.server import types as t
from localllm.server.serving import Serving


class ModelsServing(Serving):
    def health(self) -> tuple[int, dict[str, Any]]:
        """(status, body): 503 while loading or after a failed load, else slots and the plan."""
        state = self.state
        if state.engine is None:
            body: dict[str, Any] = {"status": "error" if state.load_error else "loading"}
            if state.load_error:
                body["error"] = state.load_error
            return 503, body
        stats = state.engine.stats()
        return 200, {
            "status": "ok",
            "model": state.model_id,
            "slots_idle": stats.n_slots - stats.busy_slots,
            "slots_processing": stats.busy_slots,
            "queue_length": stats.queue_length,
            "plan": state.plan_summary,
            "warnings": state.warnings,
        }

    def metrics(self) -> bytes:
        return self.state.metrics.render()

    def list_models(self) -> t.ModelList:
        state = self.state
        extra: dict[str, Any] = {
            "loaded": state.engine is not None,
            "plan": state.plan_summary,
            "warnings": state.warnings,
        }
        if state.engine is not None:
            extra["n_ctx_slot"] = state.engine.n_ctx_slot
        card = t.ModelCard(id=state.model_id, created=state.created, localllm=extra)
        return t.ModelList(data=[card])

    def tokenize(self, body: t.TokenizeRequest) -> list[int]:
        return self.engine().tokenize(body.content, body.add_special, body.parse_special)

    def detokenize(self, body: t.DetokenizeRequest) -> str:
        return self.engine().detokenize(body.tokens)
