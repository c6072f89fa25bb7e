"""One loaded model = one worker process running the Engine; the parent talks to it by pipe.

Why a process per model, as llama-server's router does: llama.cpp aborts the whole process on
some errors (GGML_ASSERT, a CUDA error, an allocation failure), and only a process boundary keeps
that from taking the server and every other model down. It also makes unloading exact: the
process exits and the OS takes back every byte it held (RSS, mapped files, VRAM), whatever
llama.cpp or the allocator would have kept.

The worker (`worker_main`) is forked from multiprocessing's fork server, a clean
single-threaded process that has imported llama.cpp once: no thread or lock of the server is
inherited, and a worker starts without paying the imports again (0.6 s of a 1.5 s warm reload,
measured on the embedded model on 2 cores). It loads the Engine, reports `WorkerInfo`, then
serves the pipe: each submitted request gets a thread that forwards its events as they come;
calls (tokenize, embed, ...) run on their own threads so a long embedding batch does not hold up
a cancel. It exits when the parent says so or when the pipe closes (the parent died), never
outliving it. From its first moment (before the model loads) it sends a heartbeat every
HEARTBEAT_S seconds from a thread of its own.

`WorkerClient` is the parent's side and looks like an `Engine` to the HTTP layer (submit,
tokenize, chat_prompt, stats, embed, cancel_all, close), each call crossing the pipe; `asubmit` and
`acall` are the event-loop versions. One reader thread per worker turns replies into events on
the request's `RequestHandle`. When the worker dies, every request in flight fails with
`ModelCrashedError` and `on_exit` tells the router.

Bounds the parent keeps without the worker's help (a worker stopped by SIGSTOP, deadlocked, or
swapping cannot be trusted to end its own requests):
- a worker silent for `hang_timeout_s` (no heartbeat, no message; the `worker_hang_timeout_s`
  setting, 15 s by default, fifteen heartbeats) is killed with SIGKILL: its requests end with
  `ModelCrashedError` saying it stopped answering, and the router loads the model again on the
  next request. Loading counts too: a load that goes silent is killed the same way.
- every request and call has a deadline (`request_timeout_s`, plus DEADLINE_SLACK_S so that the
  worker's own timeout, with its truthful message, normally comes first): past it the parent
  ends it with RequestTimeoutError and asks the worker to cancel it.
- messages to the worker go through a writer thread, so a caller never blocks on a pipe the
  worker stopped reading (the event loop cancels requests too).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Any

from localllm.engine.config import EngineConfig
from localllm.engine.embed import EmbeddingResult
from localllm.engine.handle import RequestHandle
from localllm.engine.types import EngineStats, FinishEvent, GenerationRequest
from localllm.errors import (
    CancelledError,
    LocalLLMError,
    ModelCrashedError,
    ModelLoadError,
    RequestTimeoutError,
)
from localllm.router.protocol import CALLABLE, WireError, WorkerInfo, from_wire, to_wire
from localllm.tools import ToolSyntax

log = logging.getLogger(__name__)

ExitCallback = Callable[["WorkerClient", "int | None", bool], None]

HEARTBEAT_S = 1.0  # how often a worker says it is alive
DEFAULT_HANG_TIMEOUT_S = 15.0  # the worker_hang_timeout_s setting's default
DEADLINE_SLACK_S = 2.0  # the parent's deadline trails the worker's own request timeout
_TICK_S = 0.25  # how often the reader checks deadlines and silence


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ---------------------------------------------------------------------------- the worker process

_PRELOAD = ["localllm.router.worker", "localllm.engine.core", "llama_cpp"]


def _context() -> ForkServerContext | SpawnContext:
    """The fork server with llama.cpp imported; spawn where there is no fork server."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def _first_message(
    conn: Connection, process: Any, hang_timeout_s: float | None
) -> tuple[Any, ...]:
    """The worker's first message after its heartbeats: "ready" or "load_failed". Raises
    TimeoutError when it stays silent for hang_timeout_s, EOFError when it died."""
    last_heard = time.monotonic()
    while True:
        if conn.poll(_TICK_S):
            message: tuple[Any, ...] = conn.recv()
            last_heard = time.monotonic()
            if message[0] != "heartbeat":
                return message
        elif hang_timeout_s is not None and time.monotonic() - last_heard > hang_timeout_s:
            raise TimeoutError


def prestart() -> None:
    """Start the fork server now (blocking, about a second), so the first load does not."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        from multiprocessing import forkserver

        _context()
        forkserver.ensure_running()



def worker_main(conn: Connection, config: EngineConfig, log_level: int) -> None:
    """Entry point of a worker process (spawned): load, report, serve the pipe, exit."""
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s worker {os.getpid()} %(levelname)s %(message)s"
    )
    logging.getLogger("localllm.llama").setLevel(max(log_level, logging.WARNING))
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    threading.Thread(target=_heartbeat, args=(send,), daemon=True).start()
    from localllm.engine import Engine

    try:
        engine = Engine.load(config)
    except BaseException as exc:  # report any failure, then exit non-zero
        send(("load_failed", to_wire(exc)))
        raise SystemExit(1) from None
    backend: Any = engine.backend
    send(
        (
            "ready",
            WorkerInfo(
                pid=os.getpid(),
                load_seconds=float(getattr(backend, "load_seconds", 0.0)),
                n_ctx=config.n_ctx,
                n_parallel=config.n_parallel,
                n_ctx_slot=config.n_ctx_slot,
                memory_mib=dict(engine.memory),
                embedding_only=bool(backend.embedding_only),
            ),
        )
    )
    _Server(conn, engine, send_lock).serve()


def _heartbeat(send: Callable[[tuple[Any, ...]], None]) -> None:
    while True:
        try:
            send(("heartbeat",))
        except (OSError, ValueError):
            return  # the pipe closed: the process is ending
        time.sleep(HEARTBEAT_S)


class _Server:
    def __init__(self, conn: Connection, engine: Any, send_lock: threading.Lock) -> None:
        self.conn = conn
        self.engine = engine
        self.send_lock = send_lock
        self.handles: dict[int, RequestHandle] = {}
        self.lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.send_lock:
            self.conn.send(message)

    def serve(self) -> None:
        try:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    break  # the parent is gone: do not outlive it
                kind = message[0]
                if kind == "shutdown":
                    break
                if kind == "submit":
                    self._submit(message[1], message[2])
                elif kind == "cancel":
                    with self.lock:
                        handle = self.handles.get(message[1])
                    if handle is not None:
                        handle.cancel()
                elif kind == "call":
                    threading.Thread(target=self._call, args=message[1:], daemon=True).start()
        finally:
            self.engine.close()  # cancels whatever still runs; their threads report it
            self.conn.close()

    def _submit(self, request_id: int, request: GenerationRequest) -> None:
        try:
            handle = self.engine.submit(request)
        except BaseException as exc:
            self.send(("error", request_id, to_wire(exc)))
            return
        with self.lock:
            self.handles[request_id] = handle
        self.send(("accepted", request_id, handle.id, handle.prompt_tokens))
        threading.Thread(target=self._forward, args=(request_id, handle), daemon=True).start()

    def _forward(self, request_id: int, handle: RequestHandle) -> None:
        try:
            for event in handle:
                self.send(("event", request_id, event))
        except BaseException as exc:
            try:
                self.send(("error", request_id, to_wire(exc)))
            except OSError:
                pass  # the pipe closed: the parent already knows
        finally:
            with self.lock:
                self.handles.pop(request_id, None)

    def _call(self, request_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            if method not in CALLABLE:
                raise LocalLLMError(f"a worker cannot be asked {method!r}")
            result = getattr(self.engine, method)(*args)
        except BaseException as exc:
            reply: tuple[Any, ...] = ("error", request_id, to_wire(exc))
        else:
            reply = ("result", request_id, result)
        try:
            self.send(reply)
        except OSError:
            pass


# ---------------------------------------------------------------------------- the parent's side


class WorkerClient:
    """A worker process seen from the router: an Engine look-alike. Thread-safe."""

    def __init__(
        self,
        name: str,
        process: Any,
        conn: Connection,
        info: WorkerInfo,
        on_exit: ExitCallback | None,
        hang_timeout_s: float | None = DEFAULT_HANG_TIMEOUT_S,
        request_timeout_s: float | None = None,
    ) -> None:
        self.name = name
        self.process = process
        self.info = info
        self.n_ctx_slot = info.n_ctx_slot
        self.on_exit = on_exit
        self.hang_timeout_s = hang_timeout_s  # silent this long: killed (None: never)
        self.request_timeout_s = request_timeout_s  # a call's deadline (None: none)
        self.hung = False  # killed for silence
        self._tool_syntax: ToolSyntax | None = None
        self.exit_code: int | None = None
        self._conn = conn
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # request id -> (handle, on_done): on_done runs once an accepted request has ended
        self._handles: dict[int, tuple[RequestHandle, Callable[[], None] | None]] = {}
        self._waiting: dict[int, Future[Any]] = {}
        self._deadlines: dict[int, float] = {}  # request id -> monotonic time
        self._closing = False
        self._alive = True
        self._last_heard = time.monotonic()
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._write, name=f"localllm-worker-{name}-writer", daemon=True
        )
        self._writer.start()
        self._reader = threading.Thread(
            target=self._read, name=f"localllm-worker-{name}", daemon=True
        )
        self._reader.start()

    @classmethod
    def start(
        cls,
        name: str,
        config: EngineConfig,
        on_exit: ExitCallback | None = None,
        log_level: int | None = None,
        hang_timeout_s: float | None = DEFAULT_HANG_TIMEOUT_S,
        request_timeout_s: float | None = None,
    ) -> WorkerClient:
        """Spawn a worker and wait until its model is loaded (blocking; seconds). A worker that
        goes silent for `hang_timeout_s` while loading is killed (ModelLoadError)."""
        context = _context()
        parent_end, child_end = context.Pipe(duplex=True)
        level = log_level if log_level is not None else logging.getLogger("localllm").level
        process = context.Process(
            target=worker_main,
            args=(child_end, config, level or logging.WARNING),
            name=f"localllm-worker-{name}",
            daemon=True,
        )
        process.start()
        child_end.close()
        try:
            message = _first_message(parent_end, process, hang_timeout_s)
        except TimeoutError:  # before OSError, its base class
            process.kill()
            process.join(10)
            parent_end.close()
            raise ModelLoadError(
                f"the worker loading {config.model_path.name} sent nothing for "
                f"{hang_timeout_s:g} s (worker_hang_timeout_s) and was killed"
            ) from None
        except (EOFError, OSError):
            process.join(10)
            parent_end.close()
            raise ModelLoadError(
                f"the worker loading {config.model_path.name} ended "
                f"({describe_exit(process.exitcode)}) before it was ready: see its log above"
            ) from None
        if message[0] != "ready":
            process.join(10)
            parent_end.close()
            raise from_wire(message[1])
        return cls(
            name, process, parent_end, message[1], on_exit, hang_timeout_s, request_timeout_s
        )

    @property
    def pid(self) -> int:
        return self.info.pid

    @property
    def alive(self) -> bool:
        return self._alive

    # Engine look-alike (blocking; each crosses the pipe).
    def submit(
        self, request: GenerationRequest, on_done: Callable[[], None] | None = None
    ) -> RequestHandle:
        """Queue a request in the worker; `on_done` (from the reader thread) once it has ended,
        however it ends, unless the submit itself raises."""
        handle, future = self._send_submit(request, on_done)
        future.result()
        return handle

    async def asubmit(
        self, request: GenerationRequest, on_done: Callable[[], None] | None = None
    ) -> RequestHandle:
        handle, future = self._send_submit(request, on_done)
        await asyncio.wrap_future(future)
        return handle

    def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        return self._send_call(method, args).result(timeout_s)

    async def acall(self, method: str, *args: Any) -> Any:
        return await asyncio.wrap_future(self._send_call(method, args))

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        tokens: list[int] = self.call("tokenize", text, add_special, parse_special)
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        text: str = self.call("detokenize", list(tokens))
        return text

    def apply_chat_template(self, messages: Sequence[Any]) -> str:
        prompt: str = self.call("apply_chat_template", list(messages))
        return prompt

    def chat_prompt(
        self, messages: Sequence[Any], tools: Sequence[Any] | None = None
    ) -> str | tuple[int, ...]:
        prompt: str | tuple[int, ...] = self.call(
            "chat_prompt", list(messages), list(tools) if tools else None
        )
        return prompt

    def chat_render(
        self,
        messages: Sequence[Any],
        tools: Sequence[Any] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[str | tuple[int, ...], bool]:
        prompt, opened = self.call(
            "chat_render",
            list(messages),
            list(tools) if tools else None,
            dict(template_kwargs) if template_kwargs else None,
        )
        return prompt, bool(opened)

    def tool_syntax(self) -> ToolSyntax:
        """The worker's model's tool-call syntax, asked once (its template never changes)."""
        if self._tool_syntax is None:
            self._tool_syntax = self.call("tool_syntax")
        return self._tool_syntax

    def cancel_all(self, message: str = "the server is shutting down") -> None:
        """End every request of this worker now (shutdown past its grace), here in the parent,
        with CancelledError(message): a worker that stopped answering cannot hold them. Then
        asks the worker to stop them too. Does not wait."""
        self._fail_all(CancelledError(message))
        try:
            self._send_call("cancel_all", ())
        except LocalLLMError:
            pass  # the worker is gone: its requests already failed

    def embed(self, inputs: Sequence[str | Sequence[int]]) -> EmbeddingResult:
        result: EmbeddingResult = self.call("embed", list(inputs))
        return result

    def stats(self, timeout_s: float | None = None) -> EngineStats:
        stats: EngineStats = self.call("stats", timeout_s=timeout_s)
        return stats

    def in_flight(self) -> int:
        with self._lock:
            return len(self._handles)

    def close(self, timeout_s: float = 10.0, message: str | None = None) -> None:
        """Ask the worker to exit, then make sure it did. Requests still running end with
        CancelledError(message) (default: the engine's own "the server is shutting down")."""
        with self._lock:
            self._closing = True
        if message is not None:
            self._fail_all(CancelledError(message))
        self._outbox.put(("shutdown",))
        self.process.join(timeout_s)
        if self.process.is_alive():
            log.warning("worker %s (pid %d) did not exit; killing it", self.name, self.pid)
            self.process.kill()
            self.process.join(5)
        self._outbox.put(None)
        self._reader.join(5)
        self._writer.join(5)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests, and a worker that stopped answering)."""
        self.process.kill()

    # Internals.
    def _send(self, message: tuple[Any, ...]) -> None:
        """Queue a message for the writer thread: never blocks on the pipe."""
        if not self._alive:
            raise self._crash_error()
        self._outbox.put(message)

    def _write(self) -> None:
        while True:
            message = self._outbox.get()
            if message is None:
                return
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the worker is gone; the reader notices
                if message[0] in ("submit", "call"):
                    self._fail_request(message[1], self._crash_error())
            except Exception as exc:  # a message that cannot be pickled: that request's bug
                if message[0] in ("submit", "call"):
                    self._fail_request(message[1], LocalLLMError(f"cannot send to worker: {exc}"))

    def _deadline(self, timeout_s: float | None) -> float | None:
        timeout = timeout_s if timeout_s is not None else self.request_timeout_s
        return None if timeout is None else time.monotonic() + timeout + DEADLINE_SLACK_S

    def _send_submit(
        self, request: GenerationRequest, on_done: Callable[[], None] | None
    ) -> tuple[RequestHandle, Future[Any]]:
        request_id = next(self._ids)
        handle = RequestHandle(f"{self.name}-{request_id}", 0, lambda: self._cancel(request_id))
        future: Future[Any] = Future()
        deadline = self._deadline(request.timeout_s)
        with self._lock:
            if not self._alive:
                raise self._crash_error()
            self._handles[request_id] = (handle, on_done)
            self._waiting[request_id] = future
            if deadline is not None:
                self._deadlines[request_id] = deadline
        self._outbox.put(("submit", request_id, request))
        return handle, future

    def _send_call(self, method: str, args: tuple[Any, ...]) -> Future[Any]:
        request_id = next(self._ids)
        future: Future[Any] = Future()
        deadline = self._deadline(None)
        with self._lock:
            if not self._alive:
                raise self._crash_error()
            self._waiting[request_id] = future
            if deadline is not None:
                self._deadlines[request_id] = deadline
        self._outbox.put(("call", request_id, method, args))
        return future

    def _cancel(self, request_id: int) -> None:
        try:
            self._send(("cancel", request_id))
        except LocalLLMError:
            pass  # the worker is gone; the reader fails the request

    def _fail_request(self, request_id: int, error: LocalLLMError) -> None:
        """End one request here: a caller still waiting for its submit or call gets `error`
        (no on_done: it was never accepted); a running one fails its handle."""
        with self._lock:
            future = self._waiting.pop(request_id, None)
            entry = self._handles.pop(request_id, None)
            self._deadlines.pop(request_id, None)
        if future is not None:
            if not future.done():
                future.set_exception(error)
        elif entry is not None:
            entry[0]._fail(error)
            if entry[1] is not None:
                entry[1]()

    def _fail_all(self, error: LocalLLMError) -> None:
        with self._lock:
            ids = set(self._handles) | set(self._waiting)
        for request_id in ids:
            self._fail_request(request_id, error)

    def _crash_error(self) -> ModelCrashedError:
        if self.hung:
            return ModelCrashedError(
                f"the worker process of model {self.name} stopped answering (nothing for "
                f"{self.hang_timeout_s:g} s, worker_hang_timeout_s) and was killed; requests in "
                "flight were dropped. Retry: the model is loaded again on the next request"
            )
        return ModelCrashedError(
            f"the worker process of model {self.name} ended "
            f"({describe_exit(self.process.exitcode)}); requests in flight were dropped. "
            "Retry: the model is loaded again on the next request"
        )

    def _read(self) -> None:
        try:
            while True:
                if self._conn.poll(_TICK_S):
                    message = self._conn.recv()
                    self._last_heard = time.monotonic()
                    self._dispatch(message)
                self._check_bounds()
        except (EOFError, OSError):
            pass
        except Exception:  # a bug in dispatch: treat the worker as lost rather than hang
            log.exception("reading from worker %s failed", self.name)
        self.process.join(5)
        self.exit_code = self.process.exitcode
        with self._lock:
            self._alive = False
            crashed = not self._closing
            handles = list(self._handles.values())
            waiting = list(self._waiting.values())
            self._handles.clear()
            self._waiting.clear()
            self._deadlines.clear()
        self._conn.close()
        if crashed:
            log.error("worker of %s died: %s", self.name, describe_exit(self.exit_code))
        # The router first (it posts to its event loop, as the handles below do): a client that
        # sees its request fail and asks again finds the model already marked unloaded.
        if self.on_exit is not None:
            self.on_exit(self, self.exit_code, crashed)
        error = self._crash_error()
        for future in waiting:
            if not future.done():
                future.set_exception(error)
        for handle, on_done in handles:
            handle._fail(error)
            if on_done is not None:
                on_done()

    def _check_bounds(self) -> None:
        """Kill a silent worker; end requests past their deadline (reader thread)."""
        now = time.monotonic()
        if (
            self.hang_timeout_s is not None
            and not self.hung
            and now - self._last_heard > self.hang_timeout_s
        ):
            self.hung = True
            log.error(
                "worker of %s (pid %d) sent nothing for %.0f s: killing it",
                self.name,
                self.pid,
                now - self._last_heard,
            )
            self.process.kill()  # the pipe's end follows: its requests fail as a crash
            return
        with self._lock:
            for request_id in list(self._deadlines):
                if request_id not in self._handles and request_id not in self._waiting:
                    del self._deadlines[request_id]  # ended already
            expired = [i for i, deadline in self._deadlines.items() if deadline <= now]
        for request_id in expired:
            self._fail_request(
                request_id,
                RequestTimeoutError(
                    f"the request to model {self.name} ran past request_timeout_s "
                    f"({(self.request_timeout_s or 0):g} s) and was ended by the router"
                ),
            )
            self._cancel(request_id)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        if message[0] == "heartbeat":
            return
        kind, request_id = message[0], message[1]
        if kind == "event":
            finished = isinstance(message[2], FinishEvent)
            with self._lock:
                entry = (
                    self._handles.pop(request_id, None)
                    if finished
                    else self._handles.get(request_id)
                )
            if entry is not None:
                entry[0]._push(message[2])
                if finished and entry[1] is not None:
                    entry[1]()
            return
        with self._lock:
            future = self._waiting.pop(request_id, None)
            if kind == "accepted":
                entry = self._handles.get(request_id)
            elif kind == "error":  # refused at submit (a future waits), or a stream's end
                entry = self._handles.pop(request_id, None)
            else:
                entry = None
        if kind == "accepted":
            if entry is not None:
                entry[0].id, entry[0].prompt_tokens = message[2], message[3]
            if future is not None:
                future.set_result(None)
        elif kind == "result":
            if future is not None:
                future.set_result(message[2])
        elif kind == "error":
            error = from_wire(message[2]) if isinstance(message[2], WireError) else None
            error = error or LocalLLMError("the worker reported an unreadable error")
            if future is not None:
                future.set_exception(error)  # refused: the caller sees it, no on_done
            elif entry is not None:
                entry[0]._fail(error)
                if entry[1] is not None:
                    entry[1]()


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (Linux /proc), None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
