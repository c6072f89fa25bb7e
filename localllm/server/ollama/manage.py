"""Ollama's model management over the models folder: /api/pull (a hub download, progress as
Ollama's status lines), /api/delete and /api/copy.

A pull takes hub names as `localllm pull` does (ORG/REPO[:QUANT], hf.co/ORG/REPO[:QUANT], a
huggingface.co address); without a quant the fitter picks the one for this machine. Ollama's
library names (`llama3.2`) name no hub repo and are refused with that said. These act on the
models folder, so they need a server that serves one (`localllm serve` without a model).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from localllm.errors import APIError, ModelNotFoundError
from localllm.router import Router
from localllm.server.ollama import types as o
from localllm.server.ollama.catalog import Catalog
from localllm.server.ollama.shapes import NDJSON, error_line
from localllm.server.state import AppState

NAME_RE = re.compile(r"^[\w][\w.:-]{0,199}$")

Emit = Callable[[dict[str, Any]], None]


class ModelManager:
    def __init__(self, state: AppState, catalog: Catalog) -> None:
        self.state = state
        self.catalog = catalog

    def router(self, action: str) -> Router:
        if self.state.router is None:
            raise APIError(
                400,
                f"this server serves one model for its whole life; to {action} models, start "
                "`localllm serve` without a model (it serves the models folder)",
                code="invalid_value",
            )
        return self.state.router

    # ---------------------------------------------------------------- pull

    async def pull(self, body: o.PullRequest) -> Response:
        router = self.router("pull")
        name = body.model_name()
        from localllm.hub import looks_like_repo

        if not looks_like_repo(name):
            raise APIError(
                400,
                f"{name!r} is not a hub name: localllm pulls GGUF repos from Hugging Face, "
                "named ORG/REPO[:QUANT] or hf.co/ORG/REPO[:QUANT] (Ollama's library names are "
                "not on that hub)",
                param="model",
            )
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def emit(line: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(lines.put_nowait, line)

        task = asyncio.create_task(asyncio.to_thread(self._pull, router, name, emit))
        if not body.stream:
            path = await task
            self._remember(name, path)
            return JSONResponse({"status": "success"})
        return StreamingResponse(self._progress(name, task, lines), media_type=NDJSON)

    async def _progress(
        self, name: str, task: asyncio.Task[Path], lines: asyncio.Queue[dict[str, Any]]
    ) -> AsyncIterator[str]:
        import json

        while True:
            getter = asyncio.ensure_future(lines.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield json.dumps(getter.result()) + "\n"
                continue
            getter.cancel()
            while not lines.empty():
                yield json.dumps(lines.get_nowait()) + "\n"
            break
        try:
            path = task.result()
        except Exception as exc:  # the status line is gone: in-band, as Ollama does
            yield json.dumps(error_line(exc)) + "\n"
            return
        self._remember(name, path)
        yield json.dumps({"status": "success"}) + "\n"

    def _pull(self, router: Router, name: str, emit: Emit) -> Path:
        """Blocking: the hub listing, the fitter's choice, the download (resumable, verified)."""
        from localllm.hub import HubClient, RepoRef
        from localllm.pull import recommend

        settings = router.settings
        emit({"status": "pulling manifest"})
        ref = RepoRef.parse(name)
        client = HubClient()
        quant, _ = recommend(ref, settings, client)
        first = quant.files[0]
        digest = f"sha256:{first.sha256}" if first.sha256 else ""
        status = f"pulling {first.sha256[:12] if first.sha256 else quant.label}"
        total = quant.size
        emit({"status": status, "digest": digest, "total": total, "completed": 0})
        last = [0]

        def progress(done: int, size: int) -> None:
            if done - last[0] >= max(1, size // 100) or done == size:  # about 100 lines a pull
                last[0] = done
                emit({"status": status, "digest": digest, "total": size, "completed": done})

        path = client.download(ref, quant, Path(settings.models_dir), progress)
        if last[0] != total:
            emit({"status": status, "digest": digest, "total": total, "completed": total})
        emit({"status": "verifying sha256 digest"})  # download() checked it before the rename
        emit({"status": "writing manifest"})
        return path

    def _remember(self, name: str, path: Path) -> None:
        """The pulled name answers for the file from now on (as Ollama lists it by that name)."""
        self.catalog.aliases[name.removesuffix(":latest").lower()] = path.stem

    # ---------------------------------------------------------------- delete and copy

    async def delete(self, body: o.ModelRequest) -> Response:
        router = self.router("delete")
        name = self.catalog.resolve(body.model_name())
        path = await self._folder_file(router, name)
        await router.unload(name)
        header = await asyncio.to_thread(self.catalog.header, path)
        for part in header.paths:
            part.unlink(missing_ok=True)
        for alias, target in list(self.catalog.aliases.items()):
            if target == name:
                del self.catalog.aliases[alias]
        return Response(status_code=200)

    async def copy(self, body: o.CopyRequest) -> Response:
        router = self.router("copy")
        source = self.catalog.resolve(body.source)
        path = await self._folder_file(router, source, outside_ok=True)
        destination = body.destination.removesuffix(":latest")
        if not NAME_RE.match(destination) or destination.startswith("."):
            raise APIError(
                400,
                "destination must be a plain model name (letters, digits, '.', '_', '-', ':')",
                param="destination",
            )
        header = await asyncio.to_thread(self.catalog.header, path)
        if len(header.paths) > 1:
            raise APIError(400, f"{source} is a split set; copy its files by hand", param="source")
        target = router.registry.models_dir / f"{destination}.gguf"
        if target.exists():
            raise APIError(
                400, f"a model named {destination!r} exists already; delete it first",
                param="destination",
            )
        await asyncio.to_thread(_link_or_copy, path, target)
        return Response(status_code=200)

    async def _folder_file(self, router: Router, name: str, outside_ok: bool = False) -> Path:
        try:
            entry = await asyncio.to_thread(router.registry.get, name)
        except ModelNotFoundError:
            raise ModelNotFoundError(f"model '{name}' not found") from None
        folder = router.registry.models_dir.resolve()
        if not outside_ok and entry.path.resolve().parent != folder:
            raise APIError(
                400,
                f"{name} is not in the models folder ({entry.path}); localllm deletes only "
                "files it manages there",
                param="model",
            )
        return entry.path


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no space (Ollama's copy shares its blobs too); a copy across file
    systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
