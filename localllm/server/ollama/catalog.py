"""What Ollama's model endpoints say about the models this server can serve: names, the GGUF
header (details, `model_info`, template, capabilities) and, for /api/ps, the router's figures.

Names are localllm's (a file's stem, or the alias given at start). Ollama's clients add
":latest" to a name without a tag; that suffix is dropped when resolving. A model pulled through
/api/pull also answers to the name it was pulled by, for the life of the server.
"""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from localllm.engine.chat import CHATML_TEMPLATE, FALLBACK_BY_ARCHITECTURE
from localllm.engine.embed import POOLING_NONE, POOLING_RANK
from localllm.engine.types import SamplingParams
from localllm.errors import ModelNotFoundError
from localllm.gguf_header import ArraySummary, ModelHeader, read_header
from localllm.server.state import AppState
from localllm.tools.reasoning import ReasoningFormat, detect_reasoning
from localllm.vision import projector_path

FOREVER = "2318-01-01T00:00:00Z"  # Ollama's expires_at of a model that never unloads


def keep_alive_forever(value: str | int | float) -> bool:
    from localllm.errors import SettingsError
    from localllm.router import parse_keep_alive

    try:
        return parse_keep_alive(value) is None
    except SettingsError:
        return False  # a bad value: the handlers refuse it, naming the field


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def parameter_size(n_params: int) -> str:
    """As Ollama prints it: 268.10M, 8.0B."""
    return f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"


def digest(path: Path) -> str:
    """An identifier of this version of the file (path, size, mtime), not a content hash:
    hashing gigabytes on every listing would take minutes."""
    stat = path.stat()
    return hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


class Catalog:
    """Thread-safe; the blocking methods (headers, plans) run off the event loop."""

    def __init__(self, state: AppState, model_path: Path | None = None) -> None:
        self.state = state
        self.model_path = model_path
        self.aliases: dict[str, str] = {}  # pulled name (lower case) -> served name
        self._headers: dict[Path, tuple[tuple[int, int], ModelHeader]] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- names and files

    def resolve(self, name: str) -> str:
        """The served name a request's `model` means."""
        bare = name.removesuffix(":latest")
        alias = self.aliases.get(bare.lower())
        if alias is not None:
            return alias
        if self.state.router is None and bare in self.state.model_names:
            return self.state.model_id
        return bare

    def entries(self) -> list[tuple[str, Path | None]]:
        """Every servable model: (name, file)."""
        router = self.state.router
        if router is None:
            return [(self.state.model_id, self._own_path())]
        found: list[tuple[str, Path | None]] = [(e.name, e.path) for e in router.registry.entries()]
        for model in router.loaded():  # a model named at start may live outside the folder
            if model.name not in {name for name, _ in found}:
                found.append((model.name, model.entry.path))
        return found

    def path_of(self, name: str) -> Path | None:
        """The file of a served model (blocking: the registry may read a header)."""
        router = self.state.router
        if router is None:
            if name != self.state.model_id:
                raise ModelNotFoundError(
                    f"model {name!r} is not served here; this server serves "
                    f"{self.state.model_id!r}"
                )
            return self._own_path()
        return router.registry.get(name).path

    def _own_path(self) -> Path | None:
        if self.model_path is not None:
            return self.model_path
        config = getattr(self.state.engine, "config", None)  # the real engine knows its file
        path = getattr(config, "model_path", None)
        return Path(path) if path is not None else None

    def projector(self, path: Path) -> Path | None:
        """The vision projector a model loads with, under the `mmproj` setting."""
        settings = getattr(self.state, "settings", None)  # test doubles may carry none
        return projector_path(path, getattr(settings, "mmproj", "auto"))

    def header(self, path: Path) -> ModelHeader:
        stat = path.stat()
        signature = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._headers.get(path)
            if cached is not None and cached[0] == signature:
                return cached[1]
        header = read_header(path)
        with self._lock:
            self._headers[path] = (signature, header)
        return header

    # ---------------------------------------------------------------- what a model is

    def capabilities(self, name: str) -> list[str]:
        """Ollama's capability names. Every text model here can call tools (its own template's
        syntax, else localllm's generic one) and embed; "vision" with a projector beside it."""
        path = self.path_of(name)
        if path is None:
            return ["completion", "tools"]
        header = self.header(path)
        pooling = header.metadata.get(f"{header.architecture}.pooling_type")
        embedding_only = isinstance(pooling, int) and pooling != POOLING_NONE
        caps = [] if embedding_only else ["completion", "tools"]
        if pooling != POOLING_RANK:
            caps.append("embedding")
        if not embedding_only and thinks(template_of(header)):
            caps.append("thinking")
        if not embedding_only and self.projector(path) is not None:
            caps.append("vision")
        return caps

    def thinking(self, name: str) -> tuple[bool, bool]:
        """(does the model think, does its template read a reasoning effort, as gpt-oss's)."""
        path = self.path_of(name)
        if path is None:
            return False, False
        template = template_of(self.header(path))
        return "thinking" in self.capabilities(name), "reasoning_effort" in template

    def context_length(self, name: str) -> int | None:
        """Tokens per conversation as loaded (or as planned, if not loaded yet)."""
        router = self.state.router
        if router is None:
            return self.state.engine.n_ctx_slot if self.state.engine is not None else None
        for model in router.loaded():
            if model.name == name:
                return model.config.n_ctx_slot
        entry = router.registry.get(name)
        _, config = router.registry.planned(entry)
        return config.n_ctx_slot

    def load_seconds(self, name: str, started: float) -> float:
        """How long this request waited for its model to load (0 when it was loaded)."""
        router = self.state.router
        if router is None:
            return 0.0
        arrived = time.time() - (time.perf_counter() - started)
        for model in router.loaded():
            if model.name == name and model.loaded_at >= arrived:
                return model.load_seconds
        return 0.0

    def details(self, header: ModelHeader) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": header.architecture,
            "families": [header.architecture],
            "parameter_size": parameter_size(header.n_params),
            "quantization_level": header.file_type or "unknown",
        }

    # ---------------------------------------------------------------- the endpoints' bodies

    def tags(self) -> list[dict[str, Any]]:
        models = []
        for name, path in self.entries():
            if path is None:
                continue
            header = self.header(path)
            models.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": iso(path.stat().st_mtime),
                    "size": sum(p.stat().st_size for p in header.paths),
                    "digest": digest(path),
                    "details": self.details(header),
                }
            )
        return models

    def show(self, name: str, verbose: bool) -> dict[str, Any]:
        path = self.path_of(name)
        if path is None:
            raise ModelNotFoundError(f"model {name!r}: this server does not know its file")
        header = self.header(path)
        info: dict[str, Any] = {}
        for key, value in header.metadata.items():
            if isinstance(value, ArraySummary):
                info[key] = None  # long arrays (the vocabulary) only when verbose, as Ollama
            elif isinstance(value, tuple):
                info[key] = list(value) if verbose or len(value) <= 64 else None
            elif isinstance(value, bytes):
                continue
            else:
                info[key] = value
        info["general.parameter_count"] = header.n_params
        body: dict[str, Any] = {
            "license": str(header.metadata.get("general.license", "")),
            "modelfile": f"# served by localllm from {path.name}\nFROM {name}\n",
            "parameters": self.parameters(name),
            "template": template_of(header),
            "details": self.details(header),
            "model_info": info,
            "capabilities": self.capabilities(name),
            "modified_at": iso(path.stat().st_mtime),
        }
        if self.state.public:  # file paths stay private beyond loopback
            body["modelfile"] = f"FROM {name}\n"
        return body

    def parameters(self, name: str) -> str:
        """The defaults a request gets, in Ollama's `parameters` text (one `key value` a line)."""
        defaults = SamplingParams()
        lines = [
            f"temperature {defaults.temperature}",
            f"top_k {defaults.top_k}",
            f"top_p {defaults.top_p}",
            f"min_p {defaults.min_p}",
            f"repeat_penalty {defaults.repeat_penalty}",
            f"repeat_last_n {defaults.penalty_last_n}",
        ]
        try:
            context = self.context_length(name)
        except Exception:  # a model that does not fit: no context to report
            context = None
        if context is not None:
            lines.append(f"num_ctx {context}")
        return "\n".join(lines)

    def ps(self) -> list[dict[str, Any]]:
        router = self.state.router
        if router is None:
            return self._ps_one()
        rows = []
        now = time.time()
        for row in router.ps():
            name = row["model"]
            devices: dict[str, int] = row["devices"]
            expires = row["expires_at"]
            if expires is None:
                keep = row["keep_alive_s"]
                forever = row["pinned"] or keep is None
                expires_at = FOREVER if forever else iso(now + keep)
            else:
                expires_at = iso(expires)
            path = self.path_of(name)
            details = self.details(self.header(path)) if path is not None else {}
            rows.append(
                {
                    "name": name,
                    "model": name,
                    "size": row["planned_bytes"],
                    "digest": digest(path) if path is not None else "",
                    "details": details,
                    "expires_at": expires_at,
                    "size_vram": sum(b for d, b in devices.items() if d != "host"),
                    "context_length": row["n_ctx_per_slot"],
                }
            )
        return rows

    def _ps_one(self) -> list[dict[str, Any]]:
        state = self.state
        if state.engine is None:
            return []
        devices = state.plan_summary.get("devices") or []
        path = self._own_path()
        return [
            {
                "name": state.model_id,
                "model": state.model_id,
                "size": sum(int(d.get("total_bytes", 0)) for d in devices),
                "digest": digest(path) if path is not None else "",
                "details": self.details(self.header(path)) if path is not None else {},
                "expires_at": FOREVER,  # held for the server's life
                "size_vram": sum(
                    int(d.get("total_bytes", 0)) for d in devices if d.get("name") != "host"
                ),
                "context_length": state.engine.n_ctx_slot,
            }
        ]


def thinks(template: str) -> bool:
    """The model thinks: its template shows reasoning as the chat path splits it (`<think>`,
    gpt-oss's channels) or lets a request switch it (`enable_thinking`)."""
    return detect_reasoning(template) is not ReasoningFormat.NONE or "enable_thinking" in template


def template_of(header: ModelHeader) -> str:
    """The chat template the engine renders: the file's own, else the fallback it uses."""
    return (
        header.chat_template
        or FALLBACK_BY_ARCHITECTURE.get(header.architecture)
        or CHATML_TEMPLATE
    )
