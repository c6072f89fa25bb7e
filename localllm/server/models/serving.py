"""The handler behind /health, /metrics, /v1/models, /models/load, /models/unload, /tokenize
and /detokenize.

Serving a folder (a router), /v1/models lists every model with its state (llama-server's
`status`) and, under `localllm`, what it can do, the fitter's plan for it on this machine, and
while loaded where and how much memory it holds (what `localllm ps` prints). /models/load and
/models/unload take llama-server's router bodies (`{"model": ...}`) and answer
`{"success": true}`.

Listing checks the folder: a loaded model whose file was deleted or replaced is retired by the
router and listed with status `unloading` until its requests end (see `localllm.router`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from localllm.errors import APIError, LocalLLMError, SettingsError
from localllm.router.registry import ModelEntry
from localllm.server import types as t
from localllm.server.serving import Serving, offload

log = logging.getLogger(__name__)


class ModelsServing(Serving):
    def health(self) -> tuple[int, dict[str, Any]]:
        """(status, body): 503 while loading or after a failed load, else slots and the plan."""
        state = self.state
        if state.router is not None and state.loaded.is_set() and not state.load_error:
            body: dict[str, Any] = {
                "status": "ok",
                "model": state.model_id,
                "models_loaded": [m.name for m in state.router.loaded()],
            }
            return 200, body
        if state.engine is None:
            body = {"status": "error" if state.load_error else "loading"}
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

    async def metrics(self) -> bytes:
        # Off the event loop: with a router, a scrape asks each worker for its figures.
        return await asyncio.to_thread(self.state.metrics.render)

    async def list_models(self) -> t.ModelList:
        router = self.state.router
        if router is None:
            return t.ModelList(data=[self._card()])
        await router.check_files()
        # Loaded models outside the listing: one named at start (outside the folder) or one
        # retired because its file is gone. Router state is read here, on the event loop;
        # only file work (headers, plans) goes to a thread.
        resident = [m.entry for m in [*router.loaded(), *router.retiring()]]
        described = await asyncio.to_thread(self._describe_all, resident)
        return t.ModelList(data=[self._router_card(entry, extra) for entry, extra in described])

    async def model(self, name: str) -> t.ModelCard:
        router = self.state.router
        if router is None:
            self.check_model(name)
            return self._card()
        await router.check_files()
        found = router.find(name)
        if found is not None and found.retired is not None:
            entry = found.entry  # its file may be gone: no registry look-up
        else:
            entry = await asyncio.to_thread(router.registry.get, name)
        extra = await asyncio.to_thread(self._describe, entry)
        return self._router_card(entry, extra)

    async def load(self, body: t.ModelActionRequest) -> dict[str, Any]:
        router = self._router("load")
        keep = self._keep_alive(body.keep_alive)
        await router.load(body.model, keep)
        return {"success": True}

    async def unload(self, body: t.ModelActionRequest) -> dict[str, Any]:
        router = self._router("unload")
        if body.keep_alive is not None:
            raise APIError(400, "unload takes no keep_alive", param="keep_alive")
        await router.unload(body.model)
        return {"success": True}

    async def tokenize(self, body: t.TokenizeRequest) -> list[int]:
        model = getattr(body, "model", None)
        async with self.use_engine(model if isinstance(model, str) else None, None, "any") as (
            engine,
            _,
        ):  # a 4 MiB text takes seconds: not on the event loop
            limit = max(1 << 20, 64 * engine.n_ctx_slot)  # as the engine bounds a prompt
            if len(body.content) > limit:
                raise APIError(
                    400,
                    f"content is {len(body.content)} characters; this server tokenizes at most "
                    f"{limit} at once: split the text",
                    param="content",
                    code="context_length_exceeded",
                )
            return await offload(
                engine, engine.tokenize, body.content, body.add_special, body.parse_special
            )

    async def detokenize(self, body: t.DetokenizeRequest) -> str:
        model = getattr(body, "model", None)
        async with self.use_engine(model if isinstance(model, str) else None, None, "any") as (
            engine,
            _,
        ):
            return await offload(engine, engine.detokenize, body.tokens)

    # ------------------------------------------------------------------ one model

    def _card(self) -> t.ModelCard:
        state = self.state
        extra: dict[str, Any] = {
            "loaded": state.engine is not None,
            "plan": state.plan_summary,
            "warnings": state.warnings,
        }
        if state.engine is not None:
            extra["n_ctx_slot"] = state.engine.n_ctx_slot
            # a vision projector loaded with the model: chat requests may carry images
            extra["vision"] = getattr(state.engine, "media", None) is not None
        status = {"value": "loaded" if state.engine is not None else "loading"}
        return t.ModelCard(id=state.model_id, created=state.created, status=status, localllm=extra)

    # ------------------------------------------------------------------ a models folder

    def _router(self, action: str) -> Any:
        if self.state.router is None:
            raise APIError(
                400,
                f"this server serves one model for its whole life; to {action} models by name, "
                "start `localllm serve` without a model (it serves the models folder)",
                code="invalid_value",
            )
        return self.state.router

    def _keep_alive(self, value: str | int | float | None) -> Any:
        from localllm.router import UNSET, parse_keep_alive

        try:
            return UNSET if value is None else parse_keep_alive(value)
        except SettingsError as exc:
            raise APIError(400, str(exc), param="keep_alive", code="invalid_value") from None

    def _describe_all(self, resident: list[ModelEntry]) -> list[tuple[ModelEntry, dict[str, Any]]]:
        router = self.state.router
        assert router is not None
        entries = router.registry.entries()
        names = {e.name for e in entries}
        for entry in resident:
            if entry.name not in names:
                entries.append(entry)
                names.add(entry.name)
        # The default model (answering requests that name none) first: clients that take the
        # first model, `localllm chat --url` among them, then talk to it.
        entries.sort(key=lambda entry: entry.name != self.state.model_id)
        return [(entry, self._describe(entry)) for entry in entries]

    def _describe(self, entry: ModelEntry) -> dict[str, Any]:
        """What a card says of a model's file and plan. Blocking: the first call plans the
        model (reads its header)."""
        from localllm.loading import plan_summary

        router = self.state.router
        assert router is not None
        extra: dict[str, Any] = {
            "path": str(entry.path),
            "architecture": entry.architecture,
            "quant": entry.file_type,
            "capabilities": entry.capabilities,
            "default": entry.name == self.state.model_id,
        }
        try:
            plan, config = router.registry.planned(entry)
            extra["plan"] = plan_summary(entry.path, plan, config)
            extra["warnings"] = entry.warnings
        except (LocalLLMError, OSError) as exc:  # a file deleted or broken since: still listed
            extra["plan_error"] = str(exc)
        except Exception as exc:  # a file the planner trips on: one card says so, not a 500
            log.exception("planning %s failed", entry.path)
            extra["plan_error"] = f"{type(exc).__name__}: {exc}"
        return extra

    def _router_card(self, entry: ModelEntry, extra: dict[str, Any]) -> t.ModelCard:
        """A model's card: its description plus its state now (on the event loop)."""
        router = self.state.router
        assert router is not None
        rows = {row["model"]: row for row in router.ps()}
        if entry.name in rows:
            extra["loaded"] = rows[entry.name]
        if self.state.public:  # file paths and this machine's memory stay private
            for key in ("path", "plan", "loaded"):
                extra.pop(key, None)
        created = int(entry.signature[1] // 1_000_000_000)
        return t.ModelCard(
            id=entry.name, created=created, status=router.state_of(entry.name), localllm=extra
        )
