"""Hugging Face repos: read each quantization's GGUF header by HTTP range requests, then pull one.

Fitting a repo never downloads weights: `HttpRangeSource` feeds the same header parser as local
files, a few megabytes per quantization, and the header bytes are cached by content hash so a
second fit is instant and works offline. `pull` downloads into the models folder through a
`.partial` file that resumes after an interruption and becomes the real name only once its size
and sha256 match what the hub says.

huggingface-hub does the hub's parts (endpoint and `HF_ENDPOINT`, auth tokens, repo listing, error
classes); the byte transfers are ours because its downloader restarts interrupted files from zero.
A file that huggingface-hub (or `hf download`) already put in its own cache is linked from there
instead of being downloaded again, and its header is read from that copy.

A repo is named the way users type it for llama.cpp's `-hf` and Ollama: `ORG/REPO[:QUANT]`,
`hf.co/ORG/REPO[:QUANT]`, or a browser address (`https://huggingface.co/ORG/REPO`, with
`/tree/REV` or `/blob/REV/FILE.gguf`). QUANT picks a file as llama.cpp does: a label equal to
the one `quant_label` reads from a file name, else the file names that contain QUANT followed by
`.` or `-`, ignoring case (so `Q4_K_M` finds mradermacher's `Model.i1-Q4_K_M.gguf`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from localllm.errors import GGUFError, HubError, HubUnreachableError, LocalLLMError
from localllm.gguf_header import (
    SPLIT_RE,
    ByteSource,
    FileSource,
    ModelHeader,
    parse_source,
    read_sources,
)
from localllm.models import (
    free_disk_bytes,
    gguf_stem,
    is_model_file,
    looks_like_path,
    quant_label,
)
from localllm.vision.projector import Projector, projector_from_header

log = logging.getLogger(__name__)

_Parsed = TypeVar("_Parsed")
REPO_RE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<quant>[\w.-]+))?$")
# How Ollama users and browsers write a repo: hf.co/ORG/REPO:QUANT, https://huggingface.co/...
HUB_PREFIX_RE = re.compile(
    r"^(?:https?://)?(?:www\.)?(?:hf\.co|huggingface\.co)/(?P<rest>.+)$", re.IGNORECASE
)
# Ollama's tag for "the default quantization": here, the fitter's choice.
DEFAULT_TAGS = ("latest",)
CHUNK_BYTES = 1 << 20

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base / "localllm" / "hub"


def default_hf_cache_dir() -> Path:
    """huggingface-hub's cache, from the environment now (huggingface-hub reads it at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"


def looks_like_repo(name: str) -> bool:
    """A hub reference rather than a local file: hf.co/... and huggingface.co/... always; a bare
    ORG/REPO[:QUANT] unless it exists here or reads as a path (a .gguf name, or a first folder
    that exists), which then gets "no such file" instead of a hub lookup."""
    if HUB_PREFIX_RE.match(name):
        return True
    if REPO_RE.match(name) is None or Path(name).expanduser().exists():
        return False
    return not looks_like_path(name.partition(":")[0])


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    quant: str | None = None
    revision: str | None = None
    filename: str | None = None  # one file named in a /blob/ or /resolve/ address

    @classmethod
    def parse(cls, text: str, revision: str | None = None) -> RepoRef:
        """ORG/REPO[:QUANT], hf.co/ORG/REPO[:QUANT], or a hub address in a browser's form."""
        usage = (
            f"{text!r} is not a hub reference; expected ORG/REPO[:QUANT], hf.co/ORG/REPO[:QUANT] "
            "or https://huggingface.co/ORG/REPO"
        )
        body = text.strip()
        prefixed = HUB_PREFIX_RE.match(body)
        filename = None
        if prefixed:
            rest = prefixed["rest"].split("?", 1)[0].split("#", 1)[0].rstrip("/")
            parts = rest.split("/")
            if len(parts) > 2:  # ORG/REPO/tree/REV[/DIR], ORG/REPO/blob|resolve/REV/FILE
                kind, tail = parts[2], parts[3:]
                if kind not in ("tree", "blob", "resolve") or not tail:
                    raise HubError(usage)
                revision = revision or (tail[0] if tail[0] != "main" else None)
                if kind != "tree":
                    filename = "/".join(tail[1:]) or None
                    if filename is None:
                        raise HubError(usage)
                body = "/".join(parts[:2])
            else:
                body = rest
        match = REPO_RE.match(body)
        if not match:
            raise HubError(usage)
        quant = match["quant"]
        if quant is not None and quant.lower() in DEFAULT_TAGS:
            quant = None
        return cls(match["repo"], quant, revision, filename)


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class RemoteQuant:
    """One quantization in a repo: a single GGUF or a whole split set."""

    label: str
    files: tuple[RemoteFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def group_quants(files: list[RemoteFile]) -> list[RemoteQuant]:
    """Group GGUFs into quantizations: a split set counts once; projector, imatrix and draft
    files are skipped. Labels are unique within a repo: where two groups would share one (two
    models in one repo), each is labelled by its file name instead."""
    groups: dict[str, list[RemoteFile]] = {}
    for remote in files:
        if not is_model_file(remote.filename):
            continue
        split = SPLIT_RE.match(Path(remote.filename).name)
        key = str(Path(remote.filename).parent / split["stem"]) if split else remote.filename
        groups.setdefault(key, []).append(remote)
    labelled = []
    for key, members in groups.items():
        members.sort(key=lambda f: f.filename)
        labelled.append((key, quant_label(members[0].filename), members))
    counts: dict[str, int] = {}
    for _, label, _ in labelled:
        counts[label.upper()] = counts.get(label.upper(), 0) + 1
    quants = [
        RemoteQuant(label if counts[label.upper()] == 1 else gguf_stem(key), tuple(members))
        for key, label, members in labelled
    ]
    return sorted(quants, key=lambda q: q.size)


# ---------------------------------------------------------------------------------------------
# Byte sources over HTTP


class HttpRangeSource:
    """A remote file read by `Range` requests; remembers what it fetched for the header cache."""

    def __init__(self, session: Any, url: str, size: int, headers: dict[str, str]) -> None:
        self.name = url
        self._session = session
        self._url = url
        self._size = size
        self._headers = headers
        self.fetched = bytearray()  # the contiguous prefix read so far (reads are sequential)
        self.bytes_received = 0

    @property
    def size(self) -> int | None:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        if length == 0:
            return b""
        headers = {**self._headers, "Range": f"bytes={offset}-{offset + length - 1}"}
        chunks = []
        received = 0
        with (
            _hub_errors(self._url),
            self._session.stream(
                "GET", self._url, headers=headers, follow_redirects=True
            ) as response,
        ):
            _raise_for_status(response)
            skip = offset if response.status_code == 200 else 0  # server ignored Range
            for chunk in response.iter_bytes(CHUNK_BYTES):
                if skip:
                    drop = min(skip, len(chunk))
                    chunk, skip = chunk[drop:], skip - drop
                chunks.append(chunk)
                received += len(chunk)
                if received >= length:
                    break  # leaving the block closes the connection: no more is sent
        data = b"".join(chunks)[:length]
        self.bytes_received += received
        if offset <= len(self.fetched) < offset + len(data):  # extend the contiguous prefix
            self.fetched += data[len(self.fetched) - offset :]
        return data

    def close(self) -> None:
        pass


class CachedPrefixSource:
    """A remote file's header bytes from the cache, with the remote file's size."""

    def __init__(self, name: str, prefix: bytes, size: int) -> None:
        self.name = name
        self._prefix = prefix
        self._size = size

    @property
    def size(self) -> int | None:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        if offset + length > len(self._prefix) and offset + length <= self._size:
            raise LookupError("cached header is shorter than needed")
        return self._prefix[offset : offset + length]

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Errors


def _raise_for_status(response: Any) -> None:
    from huggingface_hub import hf_raise_for_status

    hf_raise_for_status(response)


@contextmanager
def _hub_errors(what: str) -> Iterator[None]:
    """Turn huggingface-hub's and the network's exceptions into HubError with advice."""
    from huggingface_hub import errors as hub

    try:
        yield
    except LocalLLMError:
        raise
    except hub.GatedRepoError:
        raise HubError(
            f"{what}: the repo is gated; accept its terms on the hub's page, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from None
    except hub.RepositoryNotFoundError:
        raise HubError(
            f"{what}: no such repo, or it is private (log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except hub.RevisionNotFoundError:
        raise HubError(f"{what}: no such revision") from None
    except hub.EntryNotFoundError:
        raise HubError(f"{what}: no such file in the repo") from None
    except hub.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubError(f"{what}: the hub answered HTTP {status}; try again later") from None
    except OSError as exc:
        raise HubError(f"{what}: {exc.strerror or exc}") from None
    except Exception as exc:  # httpx2 transport errors have no common public base we can import
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise HubUnreachableError(
                f"{what}: could not reach the hub ({type(exc).__name__}: {exc}); check the "
                "network, or HF_ENDPOINT, or HF_HUB_OFFLINE=1 to use what is cached"
            ) from None
        raise


# ---------------------------------------------------------------------------------------------
# The client


class HubClient:
    """Lists a repo's quantizations, reads their headers, downloads one."""

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | bool | None = None,
        cache_dir: Path | None = None,
        hf_cache_dir: Path | None = None,
    ) -> None:
        from huggingface_hub import constants

        # Read HF_ENDPOINT now, not at huggingface-hub's import time.
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip(
            "/"
        )
        self.token = token
        self.cache_dir = cache_dir or default_cache_dir()
        self.hf_cache_dir = hf_cache_dir or default_hf_cache_dir()
        self.offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        self.bytes_received = 0

    def _session(self) -> Any:
        from huggingface_hub import get_session

        return get_session()

    def _headers(self) -> dict[str, str]:
        from huggingface_hub.utils._headers import build_hf_headers

        headers: dict[str, str] = build_hf_headers(token=self.token, library_name="localllm")
        headers["Accept-Encoding"] = "identity"
        return headers

    def file_url(self, ref: RepoRef, filename: str, revision: str | None = None) -> str:
        from huggingface_hub import hf_hub_url

        url: str = hf_hub_url(
            ref.repo_id, filename, revision=revision or ref.revision, endpoint=self.endpoint
        )
        return url

    def hf_cached(self, ref: RepoRef, remote: RemoteFile, commit: str) -> Path | None:
        """This version of a file in huggingface-hub's cache, if a complete copy is there."""
        from huggingface_hub import try_to_load_from_cache

        for revision in dict.fromkeys((commit, ref.revision or "main")):
            found = try_to_load_from_cache(
                ref.repo_id, remote.filename, cache_dir=self.hf_cache_dir, revision=revision
            )
            if not isinstance(found, str):
                continue
            try:
                blob = Path(found).resolve(strict=True)
                size = blob.stat().st_size
            except OSError:
                continue
            # The cache names an LFS blob by its sha256: a match proves the content without
            # hashing gigabytes (a cache without symlinks, as on Windows, is not reused).
            if size == remote.size and (remote.sha256 is None or blob.name == remote.sha256):
                return blob
        return None

    # -- listing ---------------------------------------------------------------------------

    def _listing_cache(self, ref: RepoRef) -> Path:
        return (
            self.cache_dir
            / "repos"
            / ref.repo_id.replace("/", "--")
            / f"{ref.revision or 'main'}.json"
        )

    def list_quants(self, ref: RepoRef) -> tuple[str, list[RemoteQuant]]:
        """(commit sha, quantizations) of a repo; from the cache when offline or unreachable."""
        commit, files = self.list_files(ref)
        quants = group_quants(files)
        if not quants:
            raise HubError(f"{ref.repo_id} holds no GGUF files; localllm serves GGUF models only")
        return commit, quants

    def projector_file(self, ref: RepoRef, quant: RemoteQuant) -> RemoteFile | None:
        """The vision projector `llama-server -hf` downloads with this quantization, if any."""
        from localllm.vision import best_projector

        _, files = self.list_files(ref)
        name = best_projector([f.filename for f in files], quant.files[0].filename)
        return next((f for f in files if f.filename == name), None)

    def read_projectors(
        self, ref: RepoRef, quants: Sequence[RemoteQuant]
    ) -> list[Projector | None]:
        """For each quantization, the header of the projector `pull` fetches with it (the choice
        of `projector_file`), read by range requests like a model's; None where there is none."""
        from localllm.vision import best_projector

        commit, files = self.list_files(ref)
        by_name = {f.filename: f for f in files}
        read: dict[str, Projector | None] = {}
        found: list[Projector | None] = []
        for quant in quants:
            name = best_projector(list(by_name), quant.files[0].filename)
            if name is None:
                found.append(None)
                continue
            if name not in read:
                try:
                    read[name] = self.read_projector(ref, by_name[name], commit)
                except GGUFError as exc:  # as for one beside a local model: skipped, said
                    log.warning("ignoring the vision projector %s: %s", name, exc)
                    read[name] = None
            found.append(read[name])
        return found

    def list_files(self, ref: RepoRef) -> tuple[str, list[RemoteFile]]:
        """(commit sha, every GGUF) of a repo; from the cache when offline or unreachable."""
        cache = self._listing_cache(ref)
        try:
            if self.offline:
                raise HubUnreachableError(
                    f"{ref.repo_id}: HF_HUB_OFFLINE is set and nothing is cached"
                )
            commit, files = self._fetch_listing(ref)
        except HubUnreachableError as exc:
            if cache.is_file():
                log.warning("hub unreachable (%s); using the listing cached at %s", exc, cache)
                cached = json.loads(cache.read_text())
                commit, files = cached["commit"], [RemoteFile(**f) for f in cached["files"]]
            else:
                snapshot = self._hf_cache_listing(ref)
                if snapshot is None:
                    raise
                log.warning("hub unreachable (%s); using the Hugging Face cache's copy", exc)
                commit, files = snapshot
        else:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"commit": commit, "files": [asdict(f) for f in files]}))
        return commit, files

    def _hf_cache_listing(self, ref: RepoRef) -> tuple[str, list[RemoteFile]] | None:
        """The GGUFs of a repo's snapshot in huggingface-hub's cache (what `hf download` left),
        so a repo fetched with other tools can be fitted and served offline."""
        repo_dir = self.hf_cache_dir / f"models--{ref.repo_id.replace('/', '--')}"
        revision = ref.revision or "main"
        ref_file = repo_dir / "refs" / revision
        commit = ref_file.read_text().strip() if ref_file.is_file() else revision
        snapshot = repo_dir / "snapshots" / commit
        if not snapshot.is_dir():
            return None
        files = []
        for path in sorted(snapshot.rglob("*.gguf")):
            try:
                blob = path.resolve(strict=True)
            except OSError:
                continue  # a link to a blob that was cleaned up
            sha = blob.name if re.fullmatch(r"[0-9a-f]{64}", blob.name) else None
            files.append(
                RemoteFile(path.relative_to(snapshot).as_posix(), blob.stat().st_size, sha)
            )
        return (commit, files) if files else None

    def _fetch_listing(self, ref: RepoRef) -> tuple[str, list[RemoteFile]]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token, library_name="localllm")
        with _hub_errors(ref.repo_id):
            info = api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        files = []
        for sibling in info.siblings or []:
            if sibling.rfilename.endswith(".gguf") and sibling.size is not None:
                sha = sibling.lfs.sha256 if sibling.lfs else None
                files.append(RemoteFile(sibling.rfilename, sibling.size, sha))
        return info.sha or (ref.revision or "main"), files

    # -- headers ---------------------------------------------------------------------------

    def _header_cache(self, remote: RemoteFile, commit: str) -> Path:
        key = remote.sha256 or hashlib.sha256(f"{commit}/{remote.filename}".encode()).hexdigest()
        return self.cache_dir / "headers" / f"{key}.bin"

    def read_header(self, ref: RepoRef, quant: RemoteQuant, commit: str) -> ModelHeader:
        """The quantization's header, from the cache or by range requests (never the weights)."""
        return self._read_prefix(ref, quant, commit, read_sources)

    def read_projector(self, ref: RepoRef, remote: RemoteFile, commit: str) -> Projector:
        """A vision projector's header, as `read_header` reads a model's (never its weights)."""

        def build(sources: Sequence[ByteSource], paths: Sequence[Path]) -> Projector:
            raw = parse_source(sources[0])
            return projector_from_header(paths[0], raw.metadata, raw.tensors)

        return self._read_prefix(ref, RemoteQuant("mmproj", (remote,)), commit, build)

    def _read_prefix(
        self, ref: RepoRef, quant: RemoteQuant, commit: str,
        build: Callable[[Sequence[ByteSource], Sequence[Path]], _Parsed],
    ) -> _Parsed:
        sources: list[HttpRangeSource | CachedPrefixSource | FileSource] = []
        fresh: list[tuple[HttpRangeSource, Path]] = []
        try:
            for remote in quant.files:
                cache = self._header_cache(remote, commit)
                url = self.file_url(ref, remote.filename, commit)
                local = self.hf_cached(ref, remote, commit)
                if local is not None:
                    sources.append(FileSource(local))
                elif cache.is_file():
                    sources.append(CachedPrefixSource(url, cache.read_bytes(), remote.size))
                elif self.offline:
                    raise HubError(
                        f"{ref.repo_id}/{remote.filename}: header not cached and HF_HUB_OFFLINE "
                        "is set"
                    )
                else:
                    remote_source = HttpRangeSource(
                        self._session(), url, remote.size, self._headers()
                    )
                    sources.append(remote_source)
                    fresh.append((remote_source, cache))
            paths = [Path(f"{ref.repo_id}/{remote.filename}") for remote in quant.files]
            try:
                header = build(sources, paths)
            except LookupError:  # a cache entry too short for this parser: refetch it
                for remote in quant.files:
                    self._header_cache(remote, commit).unlink(missing_ok=True)
                return self._read_prefix(ref, quant, commit, build)
        finally:
            for opened in sources:
                opened.close()
        for source, cache in fresh:
            self.bytes_received += source.bytes_received
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(bytes(source.fetched))
        return header

    def read_headers(self, ref: RepoRef) -> list[tuple[RemoteQuant, ModelHeader]]:
        commit, quants = self.list_quants(ref)
        named = select(quants, ref)
        if named is not None:
            quants = [named]
        return [(quant, self.read_header(ref, quant, commit)) for quant in quants]

    # -- downloads -------------------------------------------------------------------------

    def download(
        self,
        ref: RepoRef,
        quant: RemoteQuant,
        models_dir: Path,
        progress: Progress | None = None,
        names: tuple[str, ...] | None = None,
    ) -> Path:
        """Download a quantization (all its split files) into models_dir; resumable, verified.
        `names`: the local file names, when not the hub's (a projector named after its model)."""
        commit, _ = self.list_files(ref)
        models_dir.mkdir(parents=True, exist_ok=True)
        local_names = names or tuple(Path(remote.filename).name for remote in quant.files)
        targets = [models_dir / name for name in local_names]
        for remote, target in zip(quant.files, targets, strict=True):
            cached = None if _complete(target, remote) else self.hf_cached(ref, remote, commit)
            if cached is not None:
                _link(cached, target)
                log.info("%s: reusing the copy in the Hugging Face cache", remote.filename)
        missing = [(r, t) for r, t in zip(quant.files, targets, strict=True) if not _complete(t, r)]
        partial_bytes = sum(_partial(t).stat().st_size for _, t in missing if _partial(t).exists())
        needed = sum(r.size for r, _ in missing) - partial_bytes
        free = free_disk_bytes(models_dir)
        if needed > free:
            raise HubError(
                f"{ref.repo_id} {quant.label} needs {needed / 1e9:.1f} GB more in {models_dir}, "
                f"which has {free / 1e9:.1f} GB free; free some space or choose a smaller quant"
            )
        completed = quant.size - sum(r.size for r, _ in missing)
        for remote, target in missing:
            url = self.file_url(ref, remote.filename, commit)

            def report(written: int, base: int = completed) -> None:
                if progress:
                    progress(base + written, quant.size)

            self._download_file(url, remote, target, report)
            completed += remote.size
        return targets[0]

    def _download_file(
        self, url: str, remote: RemoteFile, target: Path, report: Callable[[int], None]
    ) -> None:
        partial = _partial(target)
        digest = hashlib.sha256()
        start = 0
        if partial.exists():
            start = partial.stat().st_size
            if start > remote.size:
                partial.unlink()
                start = 0
            else:
                with partial.open("rb") as existing:  # the hash must cover the resumed bytes too
                    for block in iter(lambda: existing.read(CHUNK_BYTES), b""):
                        digest.update(block)
        headers = self._headers()
        if start:
            headers["Range"] = f"bytes={start}-"
            log.info("resuming %s at %.1f MB", target.name, start / 1e6)
        written = start
        try:
            with (
                _hub_errors(remote.filename),
                self._session().stream(
                    "GET", url, headers=headers, follow_redirects=True
                ) as response,
            ):
                _raise_for_status(response)
                if start and response.status_code != 206:  # no resume support: start over
                    written, digest = 0, hashlib.sha256()
                with partial.open("ab" if written else "wb") as out:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                        self.bytes_received += len(chunk)
                        report(written)
        except HubUnreachableError as exc:
            raise HubError(
                f"{remote.filename}: download interrupted at {written:,} of {remote.size:,} bytes "
                f"({exc}); run the same command again to resume"
            ) from None
        if written != remote.size:
            raise HubError(
                f"{remote.filename}: download stopped at {written:,} of {remote.size:,} bytes; "
                "run the same command again to resume"
            )
        if remote.sha256 and digest.hexdigest() != remote.sha256:
            partial.unlink()
            raise HubError(
                f"{remote.filename}: sha256 {digest.hexdigest()} does not match the hub's "
                f"{remote.sha256}; the partial file was removed, run the command again"
            )
        partial.replace(target)


def _link(source: Path, target: Path) -> None:
    """Put a cached file into the models folder without copying it: a hard link (it outlives a
    cache clean-up), or a symbolic link across file systems."""
    target.unlink(missing_ok=True)
    _partial(target).unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        target.symlink_to(source)


def _partial(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def _complete(target: Path, remote: RemoteFile) -> bool:
    return target.is_file() and target.stat().st_size == remote.size


def select_quant(quants: list[RemoteQuant], label: str, repo_id: str) -> RemoteQuant:
    """The quantization QUANT names, as llama.cpp's `-hf ORG/REPO:QUANT` picks it.

    A label equal to QUANT (any case) wins; else the files whose path contains QUANT followed by
    '.' or '-' (so `Q4_K_XL` finds `Model-UD-Q4_K_XL.gguf` and `Q4_K_M` finds
    `Model.i1-Q4_K_M.gguf`, while `Q2_K` never finds `UD-Q2_K_XL`). Where that names several,
    llama.cpp would take the first listed; here the user is asked to choose.
    """
    for quant in quants:
        if quant.label.upper() == label.upper():
            return quant
    pattern = re.compile(re.escape(label) + r"[.-]", re.IGNORECASE)
    found = [q for q in quants if any(pattern.search(f.filename) for f in q.files)]
    if len(found) == 1:
        return found[0]
    available = ", ".join(q.label for q in quants)
    if found:
        raise HubError(
            f"{repo_id}: {label!r} matches several files ({', '.join(q.label for q in found)}); "
            "name one of them after the ':'"
        )
    raise HubError(f"{repo_id} has no quantization {label!r} (it has: {available})")


def select_file(quants: list[RemoteQuant], filename: str, repo_id: str) -> RemoteQuant:
    """The quantization holding one file (any part of a split set), named in a hub address."""
    for quant in quants:
        if any(f.filename.lower() == filename.lower() for f in quant.files):
            return quant
    available = ", ".join(q.label for q in quants)
    raise HubError(f"{repo_id} has no model file {filename!r} (its quantizations: {available})")


def select(quants: list[RemoteQuant], ref: RepoRef) -> RemoteQuant | None:
    """What a reference names: a file, a quantization, or nothing (the fitter chooses)."""
    if ref.filename:
        return select_file(quants, ref.filename, ref.repo_id)
    if ref.quant:
        return select_quant(quants, ref.quant, ref.repo_id)
    return None
