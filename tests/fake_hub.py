"""A hub-compatible HTTP server on 127.0.0.1 for tests: the model-info API and `resolve` downloads.

It answers what huggingface-hub asks the real hub (`/api/models/ORG/REPO[/revision/REV]` with
`siblings` and LFS sha256, `/ORG/REPO/resolve/REV/FILE` with Range, ETag and X-Repo-Commit), counts
the body bytes it sends per file, and can cut a download short to simulate an interruption.
`publish_like_unsloth` and `publish_like_mradermacher` lay out repos the way those publishers name
their files (UD- dynamic quants, split sets in per-quant folders, i1- imatrix quants, sidecars).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES

from tests.gguf_factory import ArchSpec, _add_metadata, tensor_bytes, tensor_plan, write_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    path: Path
    size: int
    sha256: str
    declared_size: int | None = None  # lie about the size (e.g. to test a full disk)


@dataclass
class FakeHub:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    sent_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)  # filename -> bytes, once
    url: str = ""

    def add(
        self, repo: str, path: Path, name: str | None = None, sha256: str | None = None
    ) -> None:
        if sha256 is None:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            sha256 = digest.hexdigest()
        self.repos.setdefault(repo, {})[name or path.name] = HubFile(
            path, path.stat().st_size, sha256
        )

    def total_sent(self) -> int:
        return sum(self.sent_bytes.values())


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, code: str, message: str) -> None:
            self._json(
                status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}
            )

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                return self._model_info(parts[2:])
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
                return self._file(repo, filename, head)
            self._error(404, "EntryNotFound", "not found")

        def _model_info(self, rest: list[str]) -> None:
            repo = "/".join(rest[:2])
            if repo in hub.gated:
                return self._error(401, "GatedRepo", f"Access to model {repo} is restricted.")
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo} not found")
            siblings = [
                {
                    "rfilename": name,
                    "size": f.declared_size or f.size,
                    "blobId": f.sha256[:40],
                    "lfs": {
                        "size": f.declared_size or f.size,
                        "sha256": f.sha256,
                        "pointerSize": 134,
                    },
                }
                for name, f in hub.repos[repo].items()
            ]
            self._json(
                200,
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": COMMIT,
                    "private": False,
                    "siblings": siblings,
                },
            )

        def _file(self, repo: str, filename: str, head: bool) -> None:
            if repo in hub.gated:
                return self._error(401, "GatedRepo", "gated")
            entry = hub.repos.get(repo, {}).get(filename)
            if entry is None:
                return self._error(404, "EntryNotFound", f"{filename} not found")
            start, end = 0, entry.size - 1
            status = 200
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes="):
                first, _, last = wanted[6:].partition("-")
                start = int(first)
                end = min(int(last), entry.size - 1) if last else entry.size - 1
                status = 206
            length = end - start + 1
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{entry.sha256}"')
            self.send_header("X-Repo-Commit", COMMIT)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
            self.end_headers()
            if head:
                return
            limit = hub.cut_after.pop(filename, None)
            with entry.path.open("rb") as f:
                f.seek(start)
                left = length
                while left > 0:
                    block = f.read(min(1 << 20, left))
                    if limit is not None:
                        if limit <= 0:
                            self.close_connection = True
                            self.connection.shutdown(2)  # the network drops mid-download
                            return
                        block = block[:limit]
                        limit -= len(block)
                    try:
                        self.wfile.write(block)
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client stopped reading: it had enough (a header read)
                    hub.sent_bytes[filename] += len(block)
                    left -= len(block)

    return Handler


@contextmanager
def running_hub(hub: FakeHub) -> Iterator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------
# Repos laid out as publishers lay them out


def write_split_gguf(folder: Path, stem: str, spec: ArchSpec, quant: str, count: int) -> list[Path]:
    """A split set as `llama-gguf-split` writes it: metadata in the first file, the tensor
    infos shared out, `split.*` keys in each (headers only: no tensor data)."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(spec, quant)
    per_file = -(-len(plan) // count)
    paths = []
    for index in range(count):
        path = folder / f"{stem}-{index + 1:05d}-of-{count:05d}.gguf"
        writer = gguf.GGUFWriter(str(path), spec.arch)
        if index == 0:
            _add_metadata(writer, spec, quant)
        writer.add_uint16("split.no", index)
        writer.add_uint16("split.count", count)
        writer.add_int32("split.tensors.count", len(plan))
        for name, shape, qtype in plan[index * per_file : (index + 1) * per_file]:
            block, type_size = GGML_QUANT_SIZES[qtype]
            byte_shape = (*reversed(shape[1:]), shape[0] // block * type_size)
            writer.add_tensor_info(
                name, byte_shape, np.dtype(np.uint8), tensor_bytes(qtype, shape), raw_dtype=qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        paths.append(path)
    return paths


# unsloth's names -> the llama.cpp mix the stand-in file is written with (bits per weight rise
# down the list, as they do in the real repos: UD-Q2_K_XL sits above Q2_K, UD-Q4_K_XL above
# Q4_K_M)
UNSLOTH_FILES = {
    "Model-Q2_K.gguf": "Q2_K",
    "Model-UD-Q2_K_XL.gguf": "Q3_K_M",
    "Model-IQ4_XS.gguf": "IQ4_XS",
    "Model-Q4_K_M.gguf": "Q4_K_M",
    "Model-UD-Q4_K_XL.gguf": "Q5_K_M",
}


def publish_like_unsloth(hub: FakeHub, repo: str, folder: Path, spec: ArchSpec) -> None:
    """UD- dynamic quants beside plain ones, a Q8_0 split set in its own folder, an mmproj and
    an imatrix GGUF (not models)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, quant in UNSLOTH_FILES.items():
        hub.add(repo, write_gguf(folder / name, spec, quant=quant))
    for path in write_split_gguf(folder / "Q8_0", "Model-Q8_0", spec, "Q8_0", 3):
        hub.add(repo, path, name=f"Q8_0/{path.name}")
    sidecar = write_gguf(folder / "mmproj-F16.gguf", spec, quant="F16", sparse=False)
    hub.add(repo, sidecar)
    hub.add(repo, sidecar, name="imatrix_unsloth.gguf")


def publish_like_mradermacher(hub: FakeHub, repo: str, folder: Path, spec: ArchSpec) -> None:
    """An imatrix ("-i1-GGUF") repo: `Model.i1-QUANT.gguf` files."""
    folder.mkdir(parents=True, exist_ok=True)
    for quant in ("Q4_K_M", "IQ4_XS", "Q6_K"):
        hub.add(repo, write_gguf(folder / f"Model.i1-{quant}.gguf", spec, quant=quant))
