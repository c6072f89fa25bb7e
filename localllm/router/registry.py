"""The models a router can serve: the GGUFs of the models folder (plus any named at start),
each with what its header says it can do and the fitter's plan for it on this machine.

The plans are made against the hardware as probed once, when the router starts: every model is
planned as if it had the machine to itself, and the router decides which plans fit together.
Headers and plans are cached per file (path, size, mtime, inode); the folder is re-listed on
each call, so a model pulled while the server runs is served without a restart, and a file
replaced under the same name is a new model (`file_state` tells the router its worker is stale).

A name a client sends is checked before it touches the file system: a NUL or control character,
or a name longer than a file name can be, is a RequestError (400) naming it; a file that is not
a readable GGUF is one too (400, `param` model), never a 500.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from localllm.engine.config import EngineConfig
from localllm.engine.embed import POOLING_NONE, POOLING_RANK
from localllm.errors import GGUFError, LocalLLMError, ModelNotFoundError, RequestError
from localllm.models import model_files, resolve_model
from localllm.settings import Settings
from localllm.vision import projector_path

if TYPE_CHECKING:
    from localllm.fitter import Plan
    from localllm.hardware import Hardware

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """One servable model file."""

    name: str  # the id clients use: the file's stem (or the alias given at start)
    path: Path
    architecture: str
    file_type: str | None
    pooling: int | None  # `<arch>.pooling_type` when the GGUF declares one
    signature: tuple[int, int, int]  # (size, mtime_ns, inode): a changed file is a new model
    data_complete: bool = True  # False: tensor data past the end of the file (truncated)
    plan: Plan | None = None
    config: EngineConfig | None = None
    warnings: list[str] = field(default_factory=list)
    plan_error: str | None = None
    projector: Path | None = None  # the vision projector it loads with (`mmproj` setting)

    @property
    def embedding_only(self) -> bool:
        """Declares a pooling layer: an embedding model (or a reranker), not a chat model."""
        return self.pooling not in (None, POOLING_NONE)

    @property
    def can_embed(self) -> bool:
        return self.pooling != POOLING_RANK

    @property
    def capabilities(self) -> list[str]:
        caps = [] if self.embedding_only else ["completion", "chat"]
        if self.projector is not None and not self.embedding_only:
            caps.append("vision")
        return caps + (["embeddings"] if self.can_embed else [])


NAME_MAX_BYTES = 255  # a file name's limit on Linux and macOS (ENAMETOOLONG beyond)


def _signature(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def shown_name(name: str) -> str:
    """A client's model name as an error message quotes it: repr'd (a NUL shows as \\x00), at
    most 60 characters, with its length when cut."""
    text = repr(name)
    return text if len(text) <= 60 else f"{text[:50]}...' ({len(name)} characters)"


def check_name(name: str) -> None:
    """Refuse what cannot be a model's file name, before any file system call sees it."""
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise RequestError(
            f"model name {shown_name(name)} holds a NUL or control character; "
            "name a model of GET /v1/models",
            param="model",
        )
    if len(name.encode("utf-8", "replace")) > NAME_MAX_BYTES + len(".gguf"):
        raise RequestError(
            f"model name {shown_name(name)} is longer than a file name can be "
            f"({NAME_MAX_BYTES} bytes); name a model of GET /v1/models",
            param="model",
        )


class Registry:
    """Thread-safe; reads headers and plans off the event loop (`asyncio.to_thread`)."""

    def __init__(
        self, settings: Settings, serving: tuple[Hardware, list[str]] | None = None
    ) -> None:
        self.settings = settings
        self.models_dir = Path(settings.models_dir).resolve()
        self._serving = serving
        self._extra: dict[str, Path] = {}  # models named at start (lower-case name -> path)
        self._alias: dict[Path, str] = {}
        self._entries: dict[Path, ModelEntry] = {}
        self._unreadable: dict[Path, tuple[int, int, int]] = {}  # skipped files, as they were
        self._lock = threading.RLock()

    def add(self, path: Path, name: str | None = None) -> ModelEntry:
        """Serve a file that is not in the folder (`serve PATH`), under `name` or its stem."""
        path = path.absolute()
        with self._lock:
            self._extra[(name or path.stem).lower()] = path
            self._alias[path] = name or path.stem
            return self._entry(path, name)

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            paths = dict.fromkeys(
                [p.absolute() for p in model_files(self.models_dir)]
                if self.models_dir.is_dir()
                else []
            )
            paths.update(dict.fromkeys(self._extra.values()))
            found = []
            for path in paths:
                try:
                    signature = _signature(path)
                    if self._unreadable.get(path) == signature:
                        continue  # said once; read again when the file changes
                    entry = self._entry(path, self._alias.get(path))
                except (OSError, LocalLLMError) as exc:
                    log.warning("skipping %s: %s", path.name, exc)
                    with contextlib.suppress(OSError):
                        self._unreadable[path] = _signature(path)
                    continue
                if entry.architecture != "clip":  # a vision projector, not a model
                    found.append(entry)
            return found

    def get(self, name: str) -> ModelEntry:
        """The entry for a model name: an id (case-insensitive, `.gguf` optional) or a file in
        the folder; the embedded default model is assembled on first use."""
        check_name(name)
        try:
            return self._get(name)
        except GGUFError as exc:
            raise RequestError(
                f"model {shown_name(name)}: its file is not a GGUF this server can read "
                f"({exc.problem}); replace or remove it",
                param="model",
            ) from None
        except OSError as exc:  # vanished between listing and reading, or a bad path
            raise ModelNotFoundError(
                f"model {shown_name(name)} cannot be read: {exc.strerror or exc}"
            ) from None

    def _get(self, name: str) -> ModelEntry:
        key = name.lower().removesuffix(".gguf")
        with self._lock:
            extra = self._extra.get(key)
            if extra is not None:
                return self._entry(extra, self._alias.get(extra))
            for entry in self.entries():
                if entry.name.lower() == key:
                    return entry
        path = resolve_model(name, self.models_dir, allow_outside=False)
        with self._lock:
            return self._entry(path.absolute(), None)

    def file_state(self, entry: ModelEntry) -> str | None:
        """None while the entry's file is as it was read; else "missing" (deleted or
        unreadable) or "replaced" (another size, mtime or inode: another model)."""
        try:
            signature = _signature(entry.path)
        except OSError:
            return "missing"
        return None if signature == entry.signature else "replaced"

    def planned(self, entry: ModelEntry) -> tuple[Plan, EngineConfig]:
        """The fitter's plan and the engine config for a model (blocking on first call)."""
        from localllm.loading import plan_for_serving, planning_hardware

        with self._lock:
            if entry.plan is not None and entry.config is not None:
                return entry.plan, entry.config
            if self._serving is None:
                self._serving = planning_hardware(self.settings, serving=True)
            serving = self._serving
        try:
            plan, config, warnings = plan_for_serving(entry.path, self.settings, serving)
        except LocalLLMError as exc:
            entry.plan_error = str(exc)
            raise
        with self._lock:
            entry.plan, entry.config, entry.warnings = plan, config, warnings
            entry.plan_error = None
        return plan, config

    def replanned(self, entry: ModelEntry, n_ctx: int) -> tuple[Plan, EngineConfig]:
        """Plan a model again for `n_ctx` tokens per conversation (Ollama's `num_ctx` above the
        loaded context); its next load uses this plan. Raises DoesNotFitError, saying why."""
        from localllm.loading import plan_for_serving, planning_hardware

        with self._lock:
            if self._serving is None:
                self._serving = planning_hardware(self.settings, serving=True)
            serving = self._serving
        settings = self.settings.model_copy(update={"n_ctx": n_ctx})
        plan, config, warnings = plan_for_serving(entry.path, settings, serving)
        for warning in warnings:
            log.warning("%s: %s", entry.name, warning)
        with self._lock:
            entry.plan, entry.config, entry.warnings = plan, config, warnings
            entry.plan_error = None
        return plan, config

    def _entry(self, path: Path, name: str | None) -> ModelEntry:
        signature = _signature(path)
        cached = self._entries.get(path)
        if cached is not None and cached.signature == signature:
            if name and cached.name != name:
                cached.name = name
            return cached
        from localllm.gguf_header import read_header

        header = read_header(path)
        declared = header.metadata.get(f"{header.architecture}.pooling_type")
        entry = ModelEntry(
            name=name or path.stem,
            path=path,
            architecture=header.architecture,
            file_type=header.file_type,
            pooling=int(declared) if isinstance(declared, int) else None,
            signature=signature,
            data_complete=header.data_complete,
            projector=projector_path(path, self.settings.mmproj),
        )
        self._entries[path] = entry
        return entry
