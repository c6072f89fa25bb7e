"""The router: which models are loaded, where, and for how long.

A request names a model; `Router.use(name)` loads it if needed and counts the request in flight
until it ends. Placement is decided from the fitter's plans, before loading: the new model's
plan must fit beside the models already loaded on every device (each GPU, and host memory) within
the budget (what the device had free at start, less the fitter's margin; host memory may be
capped by `models_memory_limit`), and at most `models_max` models are loaded. When it does not
fit, the least recently used idle models are unloaded until it does. Models with requests in
flight and pinned models are never unloaded to make room: the request waits, and past
`queue_size` waiting requests the next one is refused with QueueFullError (503 + Retry-After).

keep_alive is Ollama's: after a model's last request ends it stays loaded for the duration the
request asked (`keep_alive` field) or the `keep_alive` setting; 0 unloads right after the
answer, a negative duration never. Loads, unloads and evictions are serialised by one lock:
memory is what they compete for.

A worker that dies (llama.cpp abort, OOM killer, SIGKILL) is noticed by its reader thread; its
requests end with ModelCrashedError, the model is marked unloaded (with the exit status), and the
next request for it loads it again.

A worker that stops answering (no heartbeat for `worker_hang_timeout_s`) is killed by its
client (`worker.py`) and handled as a crash; every request also has a deadline kept here in the
parent (`request_timeout_s`), whatever the worker does.

No pool is shared between models: each loaded model has a small executor of its own
(`LoadedModel.executor`, n_parallel + 2 threads) for the blocking calls into its worker
(submit, tokenize, chat prompts, embeddings), and the registry's file work (headers, plans,
listing) runs on the router's own `files` executor. A flood of slow work for one model queues
behind that model only; the API's other routes and the other models go on.

Model files are checked whenever the folder is listed or a request names a model, and every
FILE_CHECK_S seconds once `start` ran: a loaded
model whose file was deleted or replaced (another size, mtime or inode) is retired, that is
taken out of the loaded set at once (a new request for the name loads the new file, or gets a
404 for a deleted one) and unloaded as soon as its requests in flight end, whatever its
keep_alive (-1 included) or pinning: the file it was loaded from is no longer the model of
that name. Until then it is listed with status `unloading` and can be unloaded by name.

Everything here runs on the event loop except worker start/stop and planning (threads).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from localllm.engine.config import EngineConfig
from localllm.engine.embed import EmbeddingResult
from localllm.engine.handle import RequestHandle
from localllm.engine.types import EngineStats, GenerationRequest
from localllm.errors import (
    DoesNotFitError,
    EmbeddingsNotSupportedError,
    GenerationNotSupportedError,
    ModelLoadError,
    QueueFullError,
    RequestError,
    SettingsError,
)
from localllm.router.registry import ModelEntry, Registry
from localllm.router.worker import (
    ExitCallback,
    WorkerClient,
    describe_exit,
    prestart,
    rss_bytes,
)
from localllm.settings import Settings
from localllm.tools import ToolSyntax
from localllm.units import gib

log = logging.getLogger(__name__)

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m|h)")


FILE_CHECK_S = 5.0  # how often the loaded models' files are checked besides listings and requests
KEEP_ALIVE_MAX_S = 365 * 86400.0  # a year; longer is a typo or an attack ("-1" means never)


def parse_keep_alive(value: str | int | float) -> float | None:
    """Ollama's keep_alive in seconds: a Go-style duration ('5m', '1h30m', '500ms') or a number
    of seconds; 0 unloads right after the answer; any negative value means never (None).

    Finite and bounded: 'inf', 'nan', '1e400' or a number of 5000 digits would reach JSON
    (/v1/models) and the event loop's timer as a value neither can hold."""
    if isinstance(value, bool):
        raise SettingsError(f"keep_alive {value!r} is not a duration; write it like 5m or 30s")
    shown = _shown(value)
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        else:
            seconds = _duration_seconds(value.strip().lower(), shown)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds > KEEP_ALIVE_MAX_S:
        raise SettingsError(
            f"keep_alive {shown} is not a finite duration of at most a year; write it like 5m, "
            "or -1 to never unload"
        )
    return None if seconds < 0 else seconds


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _duration_seconds(text: str, shown: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _DURATION_RE.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise SettingsError(
            f"keep_alive {shown} is not a duration; write it like 5m, 1h30m, 30s, "
            "0 (unload after the answer) or -1 (never unload)"
        )
    return sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


class _Unset:
    pass


UNSET: Any = _Unset()


@dataclass
class ModelCounters:
    """Per-model figures for /metrics (the `model` label)."""

    loads: int = 0
    load_seconds_total: float = 0.0
    last_load_seconds: float = 0.0
    unloads: dict[str, int] = field(default_factory=dict)  # by reason
    unload_seconds_total: float = 0.0
    crashes: int = 0
    requests: int = 0


@dataclass(eq=False)
class LoadedModel:
    entry: ModelEntry
    config: EngineConfig
    worker: WorkerClient
    need: dict[str, int]  # planned bytes per device ("CUDA0", ..., "host")
    loaded_at: float  # wall clock
    load_seconds: float
    keep_alive_s: float | None
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    expires_at: float | None = None  # wall clock; None: not counting down
    timer: asyncio.TimerHandle | None = None
    embedding_bytes: dict[str, int] = field(default_factory=dict)  # once it has embedded
    retired: str | None = None  # "missing" or "replaced": its file changed; unloads when idle
    executor: ThreadPoolExecutor = field(init=False)  # this model's blocking calls, no one else's

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(
            max_workers=self.config.n_parallel + 2,
            thread_name_prefix=f"localllm-{self.entry.name[:40]}",
        )

    @property
    def name(self) -> str:
        return self.entry.name

    def bytes_on(self, device: str) -> int:
        return self.need.get(device, 0) + self.embedding_bytes.get(device, 0)


@dataclass
class _Failure:
    exit_code: int | None
    message: str


class Router:
    """Loads, places and unloads models in worker processes. Use from one event loop."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry | None = None,
        start_worker: Callable[[str, EngineConfig, ExitCallback], WorkerClient] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or Registry(settings)
        self.default_keep_alive = parse_keep_alive(settings.keep_alive)
        self.pinned = {name.lower() for name in settings.pinned_models}
        self.host_limit: int | None = None
        if settings.models_memory_limit:
            from localllm.hardware import parse_size

            self.host_limit = parse_size(settings.models_memory_limit)
        self._start_worker = start_worker or (
            lambda name, config, on_exit: WorkerClient.start(
                name,
                config,
                on_exit,
                hang_timeout_s=settings.worker_hang_timeout_s,
                request_timeout_s=settings.request_timeout_s,
            )
        )
        # Header reads, plans and folder listings: never behind a model's work.
        self.files = ThreadPoolExecutor(max_workers=4, thread_name_prefix="localllm-files")
        self.counters: dict[str, ModelCounters] = {}
        self._loaded: dict[str, LoadedModel] = {}
        self._retiring: list[LoadedModel] = []  # files deleted or replaced; unloaded when idle
        self._file_check: asyncio.Task[None] | None = None
        self._loading: str | None = None
        self._failures: dict[str, _Failure] = {}
        self._lock = asyncio.Lock()  # loads, unloads and evictions, one at a time
        self._waiters: list[asyncio.Future[None]] = []
        self._waiting = 0  # requests waiting for a model to load
        self._closed = False

    # ------------------------------------------------------------------ public API

    @asynccontextmanager
    async def use(
        self, name: str, keep_alive: Any = UNSET, purpose: str = "generate"
    ) -> AsyncIterator[LoadedModel]:
        """The loaded model for one request (loading it if needed), counted in flight inside."""
        model = await self.acquire(name, keep_alive, purpose)
        try:
            yield model
        finally:
            self.release(model)

    async def acquire(
        self, name: str, keep_alive: Any = UNSET, purpose: str = "generate"
    ) -> LoadedModel:
        """Like `use` without the context manager: pair every call with `release`."""
        await self.check_files()
        entry = await self._in_files(self.registry.get, name)
        if not entry.data_complete:
            raise RequestError(
                f"model {entry.name}: its file {entry.path.name} ends before its tensor data "
                "does (truncated: a download cut short?); download it again",
                param="model",
            )
        _check_purpose(entry, purpose)
        keep = self.default_keep_alive if keep_alive is UNSET else keep_alive
        model = self._loaded.get(entry.name)
        if model is not None and model.entry.signature != entry.signature:
            self._retire(model, "replaced")  # the name is another file now
            model = None
        if model is None:
            if not self.settings.models_autoload:
                raise ModelLoadError(
                    f"model {entry.name} is not loaded and autoload is off: POST /models/load first"
                )
            if self._waiting and self._waiting >= self.settings.queue_size:
                raise QueueFullError(
                    f"{self._waiting} requests already wait for a model to load; retry shortly",
                    retry_after_s=5,
                )
            self._waiting += 1
            try:
                model = await self._load(entry)
            finally:
                self._waiting -= 1
        model.in_flight += 1
        model.keep_alive_s = keep
        model.expires_at = None
        if model.timer is not None:
            model.timer.cancel()
            model.timer = None
        self.counters.setdefault(model.name, ModelCounters()).requests += 1
        return model

    def release(self, model: LoadedModel) -> None:
        model.in_flight -= 1
        model.last_used = time.monotonic()
        if model.in_flight == 0 and self._loaded.get(model.name) is model:
            self._schedule_expiry(model)
        elif model.in_flight == 0 and model in self._retiring:
            asyncio.get_running_loop().create_task(self._unload_retired(model))
        self._notify()

    async def check_files(self) -> None:
        """Retire the loaded models whose files were deleted or replaced. A stat each, on the
        event loop: microseconds, and no pool to wait in."""
        for model in list(self._loaded.values()):
            state = self.registry.file_state(model.entry)
            if state is not None and self._loaded.get(model.name) is model:
                self._retire(model, state)

    async def _check_files_often(self) -> None:
        """Also between requests: a deleted file's model is unloaded even if nobody lists the
        folder or names it again (with keep_alive -1 nothing else would)."""
        while True:
            await asyncio.sleep(FILE_CHECK_S)
            try:
                await self.check_files()
            except Exception:  # a bug here must not end the checks
                log.exception("checking the model files failed")

    def retiring(self) -> list[LoadedModel]:
        """Loaded models whose files are gone or replaced, until their requests end."""
        return list(self._retiring)

    async def _in_files(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.files, function, *args)

    def _retire(self, model: LoadedModel, state: str) -> None:
        del self._loaded[model.name]
        model.retired = state
        self._retiring.append(model)
        if model.timer is not None:
            model.timer.cancel()
            model.timer = None
        model.expires_at = None
        log.warning(
            "model %s: its file %s was %s; the worker unloads once its %d requests end",
            model.name,
            model.entry.path,
            "deleted" if state == "missing" else "replaced",
            model.in_flight,
        )
        if model.in_flight == 0:
            asyncio.get_running_loop().create_task(self._unload_retired(model))

    async def _unload_retired(self, model: LoadedModel) -> None:
        async with self._lock:
            if model in self._retiring and model.in_flight == 0:
                await self._unload(model, "file " + (model.retired or "changed"))

    def note_embeddings(self, model: LoadedModel) -> None:
        """A model built its embedding context: count its memory from now on (about one more
        compute buffer, as planned for the generation context)."""
        plan = model.entry.plan
        if plan is not None and not model.embedding_bytes and not model.entry.embedding_only:
            model.embedding_bytes = {d.name: d.compute_bytes for d in plan.devices}

    @asynccontextmanager
    async def lease(
        self, name: str, keep_alive: Any = UNSET, purpose: str = "generate"
    ) -> AsyncIterator[Lease]:
        """An engine for one HTTP request. The model stays counted in flight until the
        generation submitted through the lease ends (a stream outlives the handler), or until
        the block exits when nothing was submitted."""
        model = await self.acquire(name, keep_alive, purpose)
        lease = Lease(self, model, asyncio.get_running_loop())
        try:
            yield lease
        finally:
            lease.close()

    async def load(self, name: str, keep_alive: Any = UNSET) -> LoadedModel:
        """Load a model (POST /models/load) and start its keep-alive countdown."""
        async with self.use(name, keep_alive, purpose="any") as model:
            return model

    async def unload(self, name: str, reason: str = "requested") -> bool:
        """Unload a model once its requests in flight end (up to shutdown_grace_s, then they are
        cancelled). False when it was not loaded."""
        await self.check_files()
        model = self.find(name)  # a retired model's file may be gone: no registry look-up
        if model is None:
            entry = await self._in_files(self.registry.get, name)
            model = self._loaded.get(entry.name)
        if model is None:
            return False
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while model.in_flight and time.monotonic() < deadline:
            await self._wait(deadline - time.monotonic())
        async with self._lock:
            if self._loaded.get(model.name) is not model and model not in self._retiring:
                return False
            await self._unload(model, reason)
        return True

    def find(self, name: str) -> LoadedModel | None:
        """A loaded or retiring model by the name clients use (case-insensitive)."""
        key = name.lower().removesuffix(".gguf")
        for model in [*self._loaded.values(), *self._retiring]:
            if model.name.lower() == key:
                return model
        return None

    async def start(self) -> None:
        """Start the fork server and the file check, then load the start model when
        `load_on_start` is set."""
        await asyncio.to_thread(prestart)
        self._file_check = asyncio.get_running_loop().create_task(self._check_files_often())
        if self.settings.load_on_start:
            name = await self._in_files(self.start_model_name)
            await self.load(name)

    def cancel_all(self) -> None:
        """End every request on every model now (shutdown past its grace), in the parent: a
        worker that stopped answering cannot keep a request (or its stream's [DONE]) waiting."""
        for model in [*self._loaded.values(), *self._retiring]:
            model.worker.cancel_all()

    async def close(self) -> None:
        """Unload everything (server shutdown)."""
        self._closed = True
        if self._file_check is not None:
            self._file_check.cancel()
        async with self._lock:  # all at once: a stuck worker's 10 s do not add up
            models = [*self._loaded.values(), *self._retiring]
            await asyncio.gather(*(self._unload(model, "shutdown") for model in models))
        self.files.shutdown(wait=False)

    def loaded(self) -> list[LoadedModel]:
        return sorted(self._loaded.values(), key=lambda m: m.loaded_at)

    def state_of(self, name: str) -> dict[str, Any]:
        """llama-server's router status object: value loaded | loading | unloaded, and after a
        crash `failed` and `exit_code`; `unloading` (with `file`: missing | replaced) while a
        retired model's last requests run."""
        if name in self._loaded:
            return {"value": "loaded"}
        for model in self._retiring:
            if model.name == name:
                return {"value": "unloading", "file": model.retired}
        if self._loading == name:
            return {"value": "loading"}
        status: dict[str, Any] = {"value": "unloaded"}
        failure = self._failures.get(name)
        if failure is not None:
            status.update(failed=True, exit_code=failure.exit_code, error=failure.message)
        return status

    def budget(self) -> dict[str, int]:
        """Bytes the loaded models may use together, per device."""
        for model in self._loaded.values():
            if model.entry.plan is not None:
                return self._budget_of(model.entry)
        return {}

    def ps(self) -> list[dict[str, Any]]:
        """What `localllm ps` shows: one row per loaded model."""
        rows = []
        for model in [*self.loaded(), *self._retiring]:
            plan = model.entry.plan
            rows.append(
                {
                    "model": model.name,
                    "pid": model.worker.pid,
                    "devices": {
                        device: model.bytes_on(device)
                        for device in model.need
                        if model.bytes_on(device)
                    },
                    "planned_bytes": sum(model.bytes_on(d) for d in model.need),
                    "rss_bytes": rss_bytes(model.worker.pid),
                    "n_gpu_layers": plan.n_gpu_layers if plan else 0,
                    "n_layer": plan.n_layer if plan else 0,
                    "n_ctx_per_slot": model.config.n_ctx_slot,
                    "n_parallel": model.config.n_parallel,
                    "in_flight": model.in_flight,
                    "pinned": model.name.lower() in self.pinned,
                    "keep_alive_s": model.keep_alive_s,
                    "expires_at": model.expires_at,
                    "loaded_at": model.loaded_at,
                    "load_seconds": round(model.load_seconds, 3),
                }
            )
        return rows

    # ------------------------------------------------------------------ loading and placement

    def start_model_name(self) -> str:
        """The model loaded at start and answering requests that name none (blocking)."""
        from localllm.models import resolve_model

        path = resolve_model(
            self.settings.model or self.settings.default_model, self.settings.models_dir
        )
        if path.resolve().parent != self.registry.models_dir.resolve():
            return self.registry.add(path, self.settings.model_alias).name
        if self.settings.model_alias:
            return self.registry.add(path, self.settings.model_alias).name
        return self.registry.get(path.stem).name

    async def _load(self, entry: ModelEntry) -> LoadedModel:
        async with self._lock:
            existing = self._loaded.get(entry.name)
            if existing is not None:
                return existing
            plan, config = await self._in_files(self.registry.planned, entry)
            need = {device.name: device.total_bytes for device in plan.devices}
            budget = self._budget_of(entry)
            self._check_fits_alone(entry, need, budget)
            deadline = time.monotonic() + self.settings.request_timeout_s
            while not self._fits_beside(need, budget):
                victim = self._least_recently_used_idle()
                if victim is not None:
                    await self._unload(victim, "evicted")
                    continue
                if time.monotonic() >= deadline:
                    raise QueueFullError(
                        f"{entry.name} does not fit beside the models in use, and they stayed "
                        "busy; retry later or unload one",
                        retry_after_s=10,
                    )
                await self._wait(deadline - time.monotonic())  # a request ends, a model goes
            return await self._spawn(entry, config, need)

    async def _spawn(
        self, entry: ModelEntry, config: EngineConfig, need: dict[str, int]
    ) -> LoadedModel:
        loop = asyncio.get_running_loop()
        self._loading = entry.name

        def on_exit(worker: WorkerClient, code: int | None, crashed: bool) -> None:
            try:
                loop.call_soon_threadsafe(self._on_worker_exit, entry.name, worker, code, crashed)
            except RuntimeError:
                pass  # the loop is closed: the server is gone

        started = time.perf_counter()
        try:
            worker = await asyncio.to_thread(self._start_worker, entry.name, config, on_exit)
        except Exception as exc:
            self._failures[entry.name] = _Failure(None, str(exc))
            raise
        finally:
            self._loading = None
        seconds = time.perf_counter() - started
        counters = self.counters.setdefault(entry.name, ModelCounters())
        counters.loads += 1
        counters.load_seconds_total += seconds
        counters.last_load_seconds = seconds
        self._failures.pop(entry.name, None)
        model = LoadedModel(
            entry=entry,
            config=config,
            worker=worker,
            need=need,
            loaded_at=time.time(),
            load_seconds=seconds,
            keep_alive_s=self.default_keep_alive,
        )
        self._loaded[entry.name] = model
        from localllm.loading import layer_placement

        log.info(
            "loaded %s in %.2f s (pid %d, %s); repeating layers: %s",
            entry.name,
            seconds,
            worker.pid,
            ", ".join(f"{d} {gib(b, 2)}" for d, b in need.items() if b),
            layer_placement(entry.plan) if entry.plan is not None else "not planned",
        )
        return model

    def _budget_of(self, entry: ModelEntry) -> dict[str, int]:
        assert entry.plan is not None
        budget = {d.name: d.capacity_bytes - d.margin_bytes for d in entry.plan.devices}
        if self.host_limit is not None:
            budget["host"] = self.host_limit
        return budget

    def _check_fits_alone(
        self, entry: ModelEntry, need: dict[str, int], budget: dict[str, int]
    ) -> None:
        for device, n_bytes in need.items():
            if n_bytes > budget.get(device, 0):
                raise DoesNotFitError(
                    f"{entry.name} needs {gib(n_bytes, 2)} on {device} but the models may "
                    f"use {gib(budget.get(device, 0), 2)} there; raise "
                    "models_memory_limit, lower n_ctx or parallel, or pick a smaller quant",
                    needed_bytes=n_bytes,
                    available_bytes=budget.get(device, 0),
                )

    def _fits_beside(self, need: dict[str, int], budget: dict[str, int]) -> bool:
        resident = [*self._loaded.values(), *self._retiring]  # retiring ones hold memory too
        if len(resident) >= self.settings.models_max:
            return False
        for device, n_bytes in need.items():
            used = sum(model.bytes_on(device) for model in resident)
            if used + n_bytes > budget.get(device, 0):
                return False
        return True

    def _least_recently_used_idle(self) -> LoadedModel | None:
        idle = [
            model
            for model in self._loaded.values()
            if model.in_flight == 0 and model.name.lower() not in self.pinned
        ]
        return min(idle, key=lambda m: m.last_used) if idle else None

    async def _unload(self, model: LoadedModel, reason: str) -> None:
        """Stop a model's worker; the caller holds the lock."""
        if self._loaded.get(model.name) is model:
            del self._loaded[model.name]
        if model in self._retiring:
            self._retiring.remove(model)
        if model.timer is not None:
            model.timer.cancel()
            model.timer = None
        model.expires_at = None
        counters = self.counters.setdefault(model.name, ModelCounters())
        counters.unloads[reason] = counters.unloads.get(reason, 0) + 1
        started = time.perf_counter()
        await asyncio.to_thread(model.worker.close, 10.0, _unload_message(model.name, reason))
        model.executor.shutdown(wait=False)
        seconds = time.perf_counter() - started
        counters.unload_seconds_total += seconds
        log.info("unloaded %s (%s) in %.2f s", model.name, reason, seconds)
        self._notify()

    # ------------------------------------------------------------------ keep_alive and crashes

    def _schedule_expiry(self, model: LoadedModel) -> None:
        if self._closed or model.name.lower() in self.pinned or model.keep_alive_s is None:
            return
        loop = asyncio.get_running_loop()
        delay = model.keep_alive_s
        model.expires_at = time.time() + delay
        model.timer = loop.call_later(delay, lambda: loop.create_task(self._expire(model)))

    async def _expire(self, model: LoadedModel) -> None:
        async with self._lock:
            if self._loaded.get(model.name) is model and model.in_flight == 0:
                await self._unload(model, "expired")

    def _on_worker_exit(
        self, name: str, worker: WorkerClient, code: int | None, crashed: bool
    ) -> None:
        retired = [m for m in self._retiring if m.worker is worker]
        if crashed and retired:
            self._retiring.remove(retired[0])
            retired[0].executor.shutdown(wait=False)
            return
        model = self._loaded.get(name)
        if not crashed or model is None or model.worker is not worker:
            return
        del self._loaded[name]
        model.executor.shutdown(wait=False)
        if model.timer is not None:
            model.timer.cancel()
        counters = self.counters.setdefault(name, ModelCounters())
        counters.crashes += 1
        counters.unloads["crashed"] = counters.unloads.get("crashed", 0) + 1
        what = "stopped answering and was killed" if worker.hung else "died"
        self._failures[name] = _Failure(code, f"the worker {what} ({describe_exit(code)})")
        log.error("model %s: worker died (%s); it loads again on demand", name, describe_exit(code))
        self._notify()

    # ------------------------------------------------------------------ waiting

    async def _wait(self, timeout_s: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await asyncio.wait_for(future, max(0.0, timeout_s))
        except TimeoutError:
            pass
        finally:
            if future in self._waiters:
                self._waiters.remove(future)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)


class Lease:
    """A loaded model as the HTTP layer's engine (submit, tokenize, chat_prompt, embed, stats),
    holding one in-flight count on it. Blocking calls: run them off the event loop."""

    def __init__(self, router: Router, model: LoadedModel, loop: asyncio.AbstractEventLoop):
        self.router = router
        self.model = model
        self.worker = model.worker
        self.executor = model.executor  # the HTTP layer runs this lease's blocking calls here
        self.n_ctx_slot = model.config.n_ctx_slot
        self._loop = loop
        self._held = True
        self._submitted = False
        self._lock = threading.Lock()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        with self._lock:
            if self._submitted:
                raise RuntimeError("a lease carries one generation")
            self._submitted = True
        try:
            return self.worker.submit(request, on_done=self._release_threadsafe)
        except BaseException:
            with self._lock:
                self._submitted = False
            raise

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        return self.worker.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.worker.detokenize(tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        return self.worker.apply_chat_template(messages)

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str | tuple[int, ...]:
        return self.worker.chat_prompt(messages, tools)

    def chat_render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str | tuple[int, ...], bool]:
        return self.worker.chat_render(messages, tools, template_kwargs)

    def tool_syntax(self) -> ToolSyntax:
        return self.worker.tool_syntax()

    def cancel_all(self) -> None:
        self.worker.cancel_all()

    def embed(self, inputs: list[str | list[int]]) -> EmbeddingResult:
        result = self.worker.embed(inputs)
        self._loop.call_soon_threadsafe(self.router.note_embeddings, self.model)
        return result

    def stats(self) -> EngineStats:
        return self.worker.stats()

    def close(self) -> None:
        """Give the model back, unless a submitted generation holds it (it gives it back)."""
        with self._lock:
            if self._submitted or not self._held:
                return
            self._held = False
        self.router.release(self.model)

    def _release_threadsafe(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        try:
            self._loop.call_soon_threadsafe(self.router.release, self.model)
        except RuntimeError:
            pass  # the loop is closed: the server is gone


def _unload_message(name: str, reason: str) -> str | None:
    """What a request still running when its model unloads is told (None: the worker's own
    "the server is shutting down", true at shutdown)."""
    if reason == "shutdown":
        return None
    if reason == "requested":
        return (
            f"model {name} was unloaded (POST /models/unload) before this request ended; "
            "send it again to load the model again"
        )
    if reason.startswith("file"):
        return f"model {name}'s file was deleted or replaced; send the request again"
    return f"model {name} was unloaded ({reason}) before this request ended"


def _check_purpose(entry: ModelEntry, purpose: str) -> None:
    if purpose == "generate" and entry.embedding_only:
        raise GenerationNotSupportedError(
            f"{entry.name} is an embedding model: it has no text to generate; use "
            "/v1/embeddings with it, or a chat model for chat and completions",
            param="model",
        )
    if purpose == "embed" and not entry.can_embed:
        raise EmbeddingsNotSupportedError(
            f"{entry.name} is a reranker (pooling type rank): it scores pairs and has no "
            "embedding vector; use an embedding or chat model for /v1/embeddings",
            param="model",
        )
