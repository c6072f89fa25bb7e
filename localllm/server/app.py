"""The OpenAI-compatible HTTP API over the engine: `create_app(settings, engine)`.

The factory wires the pieces: state on `app.state.localllm` (an `AppState`) and one handler per
endpoint family beside it (`app.state.chat`, `.completion`, `.models`), the routers, the edge
middleware and the error envelopes. Nothing is module-global, so tests can run several apps in
one process. The event loop never waits on llama.cpp: the engine's scheduler thread wakes request
coroutines through `call_soon_threadsafe`.

    app.py            factory, lifespan (background load), wiring
    state.py          AppState, the ServingEngine protocol
    auth.py           the API key dependency
    middleware.py     body limit, request metrics, warning header
    connections.py    idle, request-head and body timeouts (uvicorn protocol + middleware)
    errors.py         exceptions to OpenAI error envelopes
    serving.py        body parsing and the handlers' shared base
    streaming.py      collected JSON or SSE, once for every endpoint
    chat/, completions/, embeddings/, models/
                      api_router.py (thin routes) + serving.py (the handler)
    ollama/           Ollama's API (/api/*) as adapters over those handlers
    page/             the chat page at / (static files; Ollama's "is running" for non-browsers)

Serving a models folder, the app holds a `localllm.router.Router` instead of one engine: each
request names its model, which loads on demand in a worker process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from localllm.server.auth import allowed_hosts
from localllm.server.chat.api_router import router as chat_router
from localllm.server.chat.serving import ChatServing
from localllm.server.completions.api_router import router as completions_router
from localllm.server.completions.serving import CompletionServing
from localllm.server.connections import BodyDeadlineMiddleware
from localllm.server.embeddings.api_router import router as embeddings_router
from localllm.server.embeddings.serving import EmbeddingServing
from localllm.server.errors import install_handlers
from localllm.server.metrics import Metrics
from localllm.server.middleware import WARNING_HEADER, EdgeMiddleware
from localllm.server.models.api_router import router as models_router
from localllm.server.models.serving import ModelsServing
from localllm.server.ollama import Ollama, OllamaErrorMiddleware
from localllm.server.ollama.api_router import router as ollama_router
from localllm.server.page.api_router import router as page_router
from localllm.server.state import AppState, ServingEngine
from localllm.settings import Settings

if TYPE_CHECKING:
    from localllm.router import Router

__all__ = ["WARNING_HEADER", "AppState", "ServingEngine", "create_app"]

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    engine: ServingEngine | None = None,
    *,
    engine_factory: Callable[[], ServingEngine] | None = None,
    router: Router | None = None,
    model_id: str = "model",
    model_names: set[str] | frozenset[str] = frozenset(),
    plan_summary: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
    model_path: Path | None = None,
) -> FastAPI:
    """An app over a loaded engine, or one that loads it in the background (engine_factory).

    While loading, /health answers 503 and the API 503 with Retry-After. An engine passed in is
    the caller's to close; one built by engine_factory is closed when the app shuts down.
    """
    if sum(x is not None for x in (engine, engine_factory, router)) != 1:
        raise ValueError("give exactly one of engine, engine_factory and router")
    state_holder: list[AppState] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = state_holder[0]
        loader: asyncio.Task[None] | None = None
        if engine_factory is not None:
            loader = asyncio.create_task(_load(state, engine_factory))
        elif router is not None:
            loader = asyncio.create_task(_start_router(state, router))
        else:
            state.loaded.set()
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                # Loading runs in a thread that cannot be interrupted; let it finish, then close.
                with contextlib.suppress(Exception):
                    await loader
            if state.own_engine and state.engine is not None:
                engine_to_close, state.engine = state.engine, None
                await asyncio.to_thread(engine_to_close.close)
            if router is not None:
                await router.close()

    app = FastAPI(title="localllm", lifespan=lifespan, docs_url=None, redoc_url=None)
    state = AppState(
        settings=settings,
        model_id=model_id,
        model_names={model_id, *model_names},
        plan_summary=dict(plan_summary or {}),
        warnings=list(warnings or []),
        metrics=Metrics(lambda: state_holder[0].stats()),
        api_keys=settings.all_api_keys(),
        allowed_hosts=allowed_hosts(settings),
        engine=engine,
        router=router,
    )
    state_holder.append(state)
    app.state.localllm = state
    app.state.chat = ChatServing(state)
    app.state.completion = CompletionServing(state)
    app.state.models = ModelsServing(state)
    app.state.embeddings = EmbeddingServing(state)
    app.state.ollama = Ollama.build(
        state, app.state.chat, app.state.completion, app.state.embeddings, model_path
    )
    if router is not None:
        from localllm.router.metrics import RouterCollector

        state.metrics.registry.register(RouterCollector(router))
    install_handlers(app)
    for routes in (
        models_router, chat_router, completions_router, embeddings_router, ollama_router
    ):
        app.include_router(routes)
    app.include_router(page_router)  # the chat page at /
    # Order: the edge middleware (body limit, metrics, warning header) runs inside CORS, so
    # CORS headers are added to its error responses too.
    app.add_middleware(BodyDeadlineMiddleware, timeout_s=settings.body_timeout_s)
    app.add_middleware(EdgeMiddleware, state=state)
    app.add_middleware(OllamaErrorMiddleware)  # outside the edge: its refusals too
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


async def _load(state: AppState, factory: Callable[[], ServingEngine]) -> None:
    try:
        state.engine = await asyncio.to_thread(factory)
        state.own_engine = True
    except Exception as exc:  # reported by /health and by serve(), which exits non-zero
        log.error("model load failed: %s", exc)
        state.load_error = str(exc)
    finally:
        state.loaded.set()


async def _start_router(state: AppState, router: Router) -> None:
    """Load the start model (load_on_start); until then /health answers 503."""
    try:
        await router.start()
    except Exception as exc:  # reported by /health and by serve(), which exits non-zero
        log.error("start model load failed: %s", exc)
        state.load_error = str(exc)
    finally:
        state.loaded.set()
