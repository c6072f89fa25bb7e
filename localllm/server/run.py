"""`serve(settings)`: resolve the model, plan, load in the background, run uvicorn.

With a model named (`serve MODEL`, or `model` in the settings) the server holds that one model
in-process for its whole life. Without one it serves the models folder through a router: the two
embedded models are written into the folder if they are not there yet, `default_model` (the
embedded SmolLM2-135M-Instruct unless set) loads at start when `load_on_start` and answers
requests that name no model, and any model of the folder loads when a request names it.

Startup order: bind the socket and answer /health with 503 while the model loads; send systemd
READY=1 only once the model is loaded AND the socket listens; then ping the watchdog from the
event loop. On SIGTERM uvicorn stops accepting, in-flight requests get `shutdown_grace_s` to
finish, the rest are cancelled by the engine (a stream ends with an error event saying so and
`data: [DONE]`, an unstreamed request with a 503 envelope), uvicorn gets one more second to send
those ends, the engine is closed, and serve() returns (exit status 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import uvicorn

from localllm.errors import ModelLoadError, SettingsError
from localllm.loading import plan_engine_config
from localllm.pull import ensure_local
from localllm.server.app import AppState, create_app
from localllm.server.auth import is_loopback
from localllm.server.connections import uvicorn_options
from localllm.settings import Settings

log = logging.getLogger(__name__)


def check_bind(settings: Settings) -> None:
    """Refuse to expose an unauthenticated API beyond this machine, unless told to."""
    if is_loopback(settings.host) or settings.allow_public_bind:
        return
    if not settings.all_api_keys():
        raise SettingsError(
            f"refusing to listen on {settings.host} without an API key: set api_keys (or "
            "api_key_file), bind 127.0.0.1, or set allow_public_bind = true"
        )


def _service() -> ModuleType | None:
    try:
        import localllm.service as service
    except ImportError:  # written by another part of the project; optional
        return None
    return service


def _notify(service: ModuleType | None, name: str, *args: Any) -> None:
    if service is None:
        return
    function = getattr(service, name, None)
    if function is not None:
        try:
            function(*args)
        except Exception as exc:  # never let systemd plumbing stop the server
            log.warning("systemd %s failed: %s", name, exc)


def _configure_logging(settings: Settings) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    logging.getLogger("localllm").setLevel(settings.log_level.upper())
    # llama.cpp's load log is long; INFO lines are kept on the engine (load_log) anyway.
    logging.getLogger("localllm.llama").setLevel(
        logging.DEBUG if settings.log_level == "debug" else logging.WARNING
    )


@contextlib.contextmanager
def _sigterm_exits_cleanly() -> Iterator[None]:
    # uvicorn re-raises the signal it caught once it has shut down; with the default SIGTERM
    # action the process would die with status 143 after a clean drain. A no-op handler makes
    # serve() return instead, so the service exits 0.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(settings: Settings) -> None:
    """Serve the OpenAI-compatible API until SIGTERM/SIGINT. Raises LocalLLMError on bad start."""
    from localllm.engine import Engine

    _configure_logging(settings)
    check_bind(settings)
    if settings.model is None:
        # The models folder: every model by name, each loaded on demand in a worker process.
        from localllm.models import write_embedded_models
        from localllm.router import Router

        for problem in write_embedded_models(settings.models_dir):
            log.warning("%s", problem)
        router = Router(settings)
        model_id = router.start_model_name()
        app = create_app(settings, router=router, model_id=model_id)
    else:
        model_path = ensure_local(settings.model, settings)  # pulls ORG/REPO[:QUANT] if needed
        config, plan_summary, warnings = plan_engine_config(model_path, settings)
        for warning in warnings:
            log.warning("%s", warning)
        model_id = settings.model_alias or model_path.stem
        app = create_app(
            settings,
            engine_factory=lambda: Engine.load(config),
            model_id=model_id,
            model_names={model_path.stem, model_path.name},
            plan_summary=plan_summary,
            warnings=warnings,
            model_path=model_path,
        )
    uv_config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our logging, to stderr
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        # One second past the grace: the engine's cancellations are sent before uvicorn cuts.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + 1,
        lifespan="on",
        **uvicorn_options(settings),  # idle and request-head timeouts
    )
    server = uvicorn.Server(uv_config)
    state: AppState = app.state.localllm
    log.info(
        "serving %s on http://%s:%d (loading the model)", model_id, settings.host, settings.port
    )
    with _sigterm_exits_cleanly():
        asyncio.run(_serve(server, state, model_id))
    if state.load_error is not None:
        raise ModelLoadError(state.load_error)


async def _serve(server: uvicorn.Server, state: AppState, model_id: str) -> None:
    service = _service()
    _notify(service, "notify_status", f"loading {model_id}")
    supervisor = asyncio.create_task(_supervise(server, state, model_id, service))
    try:
        await server.serve()
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor


async def _supervise(
    server: uvicorn.Server, state: AppState, model_id: str, service: ModuleType | None
) -> None:
    """READY=1 once loaded and listening; the watchdog; STOPPING=1 when shutdown begins."""
    await state.loaded.wait()
    if state.load_error is not None:
        log.error("cannot serve %s: %s", model_id, state.load_error)
        server.should_exit = True
        return
    while not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.05)
    _notify(service, "notify_ready")
    _notify(service, "notify_status", f"serving {model_id}")
    log.info("ready: %s", model_id)
    watchdog: asyncio.Task[None] | None = None
    if service is not None and hasattr(service, "watchdog_loop"):
        watchdog = asyncio.create_task(service.watchdog_loop())
    try:
        while not server.should_exit:
            await asyncio.sleep(0.1)
        _notify(service, "notify_stopping")
        grace = state.settings.shutdown_grace_s
        log.info("shutting down: in-flight requests have %.0f s", grace)
        await asyncio.sleep(grace)
        if state.engine is not None:
            log.info("grace period over: cancelling the requests still running")
            state.engine.cancel_all()
        elif state.router is not None:
            log.info("grace period over: cancelling the requests still running")
            state.router.cancel_all()
    finally:
        if watchdog is not None:
            watchdog.cancel()
