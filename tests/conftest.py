"""Shared fixtures: the embedded model, one real engine and one real server per session, and a
small fake engine for HTTP-layer tests that need no model."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from localllm.engine.handle import RequestHandle
from localllm.engine.types import (
    EngineStats,
    FinishEvent,
    GenerationRequest,
    TextEvent,
    TokenLogprob,
    Usage,
)
from localllm.errors import CancelledError, ContextLengthExceededError, QueueFullError
from localllm.models import embedded_model_path as _embedded_model_path
from localllm.models import instruct_model_path as _instruct_model_path

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Tests press Ctrl-C in child processes (chat, bench) as a person at a terminal would. A
    suite started in the background by sh (`&`, nohup) inherits SIGINT ignored, and every child
    would too (an ignored signal stays ignored across exec): give it back its default."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
API_KEY = "test-key-1"
OTHER_API_KEY = "test-key-2"


@pytest.fixture(scope="session")
def embedded_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded Gemma 3 270M GGUF: the checkout's models/ when writable, else a temp dir."""
    models = REPO / "models"
    if not models.is_dir():
        models = tmp_path_factory.mktemp("models")
    return _embedded_model_path(models)


@pytest.fixture(scope="session")
def instruct_model_path(embedded_model_path: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF (the default model: llama architecture, a ChatML
    template), in the same folder as the embedded Gemma 3 270M."""
    return _instruct_model_path(embedded_model_path.parent)


# ---------------------------------------------------------------------------- a real server


@dataclass
class UvicornThread:
    """A uvicorn server on 127.0.0.1 and a free port, in a background thread."""

    app: Any
    server: Any = None
    thread: threading.Thread | None = None
    port: int = 0

    def start(self) -> UvicornThread:
        import uvicorn

        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120  # generous: a loaded machine starts slowly
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=30)


@contextlib.contextmanager
def served_process(
    settings: str, model_path: Path, config_dir: Path
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`serve(Settings(<settings>, port=<free>))` in a child process, no config file; yields
    (process, base URL) once /health answers 200, and kills what is left at the end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        "from localllm.server.run import serve\n"
        "from localllm.settings import Settings\n"
        f"serve(Settings({settings}, port={port}, models_dir={str(model_path.parent)!r}))\n"
    )
    (config_dir / "none.toml").write_text("")
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "LOCALLLM_CONFIG": str(config_dir / "none.toml")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="session")
def engine(embedded_model_path: Path) -> Iterator[Any]:
    """One real engine for the session: 4 slots of 512 tokens, a wait queue of 2.

    One decode thread: on a 2-core machine ggml's spinning thread barrier slows ~50x when a
    second busy thread (the test client building openai's response types, the event loop,
    another process) competes for the cores; one thread leaves a core for everything else.
    """
    from localllm.engine import Engine, EngineConfig

    config = EngineConfig(
        model_path=embedded_model_path,
        n_ctx=2048,
        n_parallel=4,
        n_threads=1,
        n_batch=512,
        n_ubatch=512,
        queue_size=2,
        max_tokens_default=256,
    )
    with Engine.load(config) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def live_server(engine: Any) -> Iterator[UvicornThread]:
    """The real engine behind the real app on loopback, with API keys and a warning set."""
    from localllm.server import create_app
    from localllm.settings import Settings

    settings = Settings(
        api_keys=[API_KEY, OTHER_API_KEY],
        max_body_bytes=64 * 1024,
        max_tokens_limit=400,
        cors_origins=["http://allowed.example"],
    )
    app = create_app(
        settings,
        engine,
        model_id="gemma-3-270m",
        model_names={"gemma-3-270m-q4_k_m"},
        plan_summary={"source": "test", "n_ctx": 2048},
        warnings=["test: 3 layers on the CPU, expect slow decoding"],
    )
    server = UvicornThread(app).start()
    yield server
    server.stop()


@pytest.fixture
def openai_client(live_server: UvicornThread) -> Any:
    import openai

    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=API_KEY, max_retries=0)


# ---------------------------------------------------------------------------- a fake engine


@dataclass
class FakeEngine:
    """Echoes the prompt's words back one event each; records what it was asked.

    Behaviour switches: `queue_full` raises QueueFullError, prompts over `n_ctx_slot` words raise
    ContextLengthExceededError, `delay_s` sleeps between events (from a thread, like the real
    scheduler), `hold` keeps a request open until cancelled.
    """

    n_ctx_slot: int = 64
    queue_full: bool = False
    delay_s: float = 0.0
    hold: bool = False
    requests: list[GenerationRequest] = field(default_factory=list)
    handles: list[RequestHandle] = field(default_factory=list)
    closed: bool = False
    busy: int = 0

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        return [len(word) for word in text.split()]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return " ".join("x" * t for t in tokens)

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        return " ".join(f"{m['role']}: {m['content']}" for m in messages)

    def chat_render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str, bool]:
        return self.chat_prompt(messages, tools), False

    def tool_syntax(self) -> Any:
        from localllm.tools import ToolFormat, ToolSyntax

        return ToolSyntax(ToolFormat.GENERIC)

    def stats(self) -> EngineStats:
        return EngineStats(4, self.busy, 0, 10, 256, 1, 2, 3, 4, 0.5, 0.5, 0.01)

    def cancel_all(self) -> None:
        self.hold = False
        for handle in self.handles:
            handle._fail(CancelledError("the server is shutting down"))

    def close(self) -> None:
        self.closed = True

    def submit(self, request: GenerationRequest) -> RequestHandle:
        if self.queue_full:
            raise QueueFullError("all slots busy", retry_after_s=3)
        prompt = request.prompt
        words = prompt.split() if isinstance(prompt, str) else [str(t) for t in prompt]
        if len(words) > self.n_ctx_slot:
            raise ContextLengthExceededError("too long", param="messages")
        self.requests.append(request)
        handle = RequestHandle(f"fake{len(self.requests)}", len(words), lambda: None)
        self.handles.append(handle)
        threading.Thread(target=self._run, args=(handle, words, request), daemon=True).start()
        return handle

    def _run(self, handle: RequestHandle, words: list[str], request: GenerationRequest) -> None:
        self.busy += 1
        try:
            limit = request.max_tokens or len(words)
            out = words[:limit]
            for i, word in enumerate(out):
                if handle.cancelled:
                    return
                if self.delay_s:
                    time.sleep(self.delay_s)
                lp = (
                    (TokenLogprob(word, word.encode(), -0.5),)
                    if request.logprobs is not None
                    else ()
                )
                handle._push(TextEvent(("" if i == 0 else " ") + word, lp))
            while self.hold and not handle.cancelled:
                time.sleep(0.01)
            if handle.cancelled:
                return
            reason = "length" if len(out) < len(words) else "stop"
            handle._push(FinishEvent(reason, Usage(len(words), len(out), 1), 0.01, 100.0, 50.0))
        finally:
            self.busy -= 1


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


def run_async(coro: Any) -> Any:
    """Run a coroutine to completion from a sync test."""
    return asyncio.run(coro)
