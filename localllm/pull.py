"""The models folder as a user sees it: pull from a hub, list with a fit verdict, serve by name.

This is where the hub client, the fitter and the models folder meet; each stays ignorant of the
others. `ensure_local` is what `serve ORG/REPO[:QUANT]` calls: a local name resolves as before, a
hub reference is pulled first (the quantization the fitter recommends unless one is named).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from localllm.errors import LocalLLMError
from localllm.gguf_header import ModelHeader, read_header
from localllm.hub import HubClient, RemoteQuant, RepoRef, looks_like_repo, select
from localllm.models import (
    EMBEDDED_MODELS,
    embedded_bytes,
    embedded_model,
    gguf_stem,
    ladder_labels,
    model_files,
    quant_label,
    resolve_model,
)
from localllm.settings import Settings
from localllm.units import gib
from localllm.vision import local_projector_name

log = logging.getLogger(__name__)


def _fit_choice(headers: list[ModelHeader], settings: Settings) -> Any:
    """The fitter's plan over a ladder of headers for the configured hardware."""
    from localllm.fitter import FitRequest, fit_ladder, measured_quality_losses
    from localllm.loading import planning_hardware

    request = FitRequest.from_settings(settings)
    hardware, _ = planning_hardware(settings)
    losses = measured_quality_losses(headers)
    return fit_ladder(headers, hardware, request, losses, ladder_labels(headers))


def recommend(
    ref: RepoRef, settings: Settings, client: HubClient | None = None
) -> tuple[RemoteQuant, Any]:
    """The quantization of a repo to download: the one named, else the fitter's choice."""
    client = client or HubClient()
    pairs = client.read_headers(ref)
    named = select([quant for quant, _ in pairs], ref)
    if named is not None:
        return named, None
    plan = _fit_choice([header for _, header in pairs], settings)
    chosen = str(plan.file)
    for quant, header in pairs:
        if str(header.path) == chosen:
            return quant, plan
    raise LocalLLMError(f"the fitter chose {chosen}, which is not among {ref.repo_id}'s files")


def pull(
    repo: str,
    settings: Settings,
    revision: str | None = None,
    progress: bool = True,
    client: HubClient | None = None,
) -> Path:
    """Download the recommended (or named) quantization of a repo into the models folder."""
    ref = RepoRef.parse(repo, revision)
    client = client or HubClient()
    quant, plan = recommend(ref, settings, client)
    if plan is not None:
        log.info("fitter's choice for this machine: %s", quant.label)
    path = _download(ref, quant, settings, client, progress)
    _pull_projector(ref, quant, settings, client)
    return path


def _pull_projector(
    ref: RepoRef, quant: RemoteQuant, settings: Settings, client: HubClient
) -> Path | None:
    """The repo's vision projector for this quant, beside it, as `llama-server -hf` fetches it
    (unless `mmproj` is off or a path); named after the model in the flat models folder."""
    if settings.mmproj != "auto":
        return None
    remote = client.projector_file(ref, quant)
    if remote is None:
        return None
    name = local_projector_name(remote.filename, quant.files[0].filename)
    target = settings.models_dir / name
    if target.is_file() and target.stat().st_size == remote.size:
        return target
    log.info("%s: fetching its vision projector %s", ref.repo_id, remote.filename)
    return client.download(ref, RemoteQuant("mmproj", (remote,)), settings.models_dir,
                           names=(name,))


def _download(
    ref: RepoRef, quant: RemoteQuant, settings: Settings, client: HubClient, progress: bool
) -> Path:
    if not progress:
        return client.download(ref, quant, settings.models_dir)

    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(f"{ref.repo_id} {quant.label}", *columns, transient=False) as bar:
        task = bar.add_task("download", total=quant.size)
        return client.download(
            ref, quant, settings.models_dir, lambda done, total: bar.update(task, completed=done)
        )


def ensure_local(name: str | None, settings: Settings) -> Path:
    """A local model file for `serve`: resolve a name (None: the default model), or pull a hub
    reference when needed."""
    name = name or settings.default_model
    if not looks_like_repo(name):
        return resolve_model(name, settings.models_dir)
    ref = RepoRef.parse(name)
    client = HubClient()
    quant, _ = recommend(ref, settings, client)
    local = [settings.models_dir / Path(remote.filename).name for remote in quant.files]
    if not all(
        path.is_file() and path.stat().st_size == remote.size
        for path, remote in zip(local, quant.files, strict=True)
    ):
        _download(ref, quant, settings, client, progress=False)  # the quant chosen above
    _pull_projector(ref, quant, settings, client)
    return local[0]


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: str
    size_bytes: int
    quant: str | None
    n_ctx_train: int
    fits: str  # the fitter's one-line verdict for this machine
    error: str | None = None
    embedded: str | None = None  # why it is embedded, for the two models that ship inside
    default: bool = False  # the model used where none is named (`default_model`)


def list_models(settings: Settings) -> list[LocalModel]:
    """Every model in the models folder with the fitter's verdict for this machine, and the
    embedded models not written there yet (they are, the first time they are named)."""
    folder = settings.models_dir
    paths = model_files(folder) if folder.is_dir() else []
    entries = [_local_model(path, settings) for path in paths]
    present = {path.name.lower() for path in paths}
    for model in EMBEDDED_MODELS:
        if model.file not in present:
            size = embedded_bytes(model) or 0
            fits = "embedded: written here from its package on first use"
            entries.append(
                LocalModel(model.name, str(folder / model.file), size, quant_label(model.file),
                           0, fits)
            )  # fmt: skip
    default = _default_name(settings)
    return [
        replace(entry, default=entry.name.lower() == default, embedded=_role(entry))
        for entry in entries
    ]


def _local_model(path: Path, settings: Settings) -> LocalModel:
    try:
        header = read_header(path)
    except LocalLLMError as exc:
        return LocalModel(path.stem, str(path), path.stat().st_size, None, 0, "-", str(exc))
    return LocalModel(
        name=path.stem,
        path=str(path),
        size_bytes=sum(p.stat().st_size for p in header.paths),
        quant=_quant_name(path, header),
        n_ctx_train=header.n_ctx_train,
        fits=_verdict(header, settings),
    )


def _default_name(settings: Settings) -> str:
    """The folder name of the default model, as `localllm models` lists it."""
    name = settings.default_model
    embedded = embedded_model(name)
    if embedded is not None:
        return embedded.name
    return gguf_stem(Path(name).name).lower()


def _role(entry: LocalModel) -> str | None:
    embedded = embedded_model(entry.name)
    return embedded.role if embedded is not None and entry.name.lower() == embedded.name else None


def _quant_name(path: Path, header: ModelHeader) -> str | None:
    """The quantization as the file name gives it (UD-Q4_K_XL, i1-IQ4_XS), else as the GGUF
    declares it (unsloth's UD-Q4_K_XL declares Q4_K_M)."""
    label = quant_label(path.name)
    return header.file_type if label == gguf_stem(path.name) else label


def _verdict(header: ModelHeader, settings: Settings) -> str:
    try:
        plan = _fit_choice([header], settings)
    except LocalLLMError as exc:
        return f"does not fit: {exc}"
    layers = f"{plan.n_gpu_layers}/{plan.n_layer + 1} layers on GPU"
    where = "all on GPU" if plan.full_offload else layers
    slow = " (below interactive speed)" if plan.decode_tok_s < settings.min_speed else ""
    return f"{where}, ~{plan.decode_tok_s:.0f} tok/s at {plan.n_ctx} ctx{slow}"


def format_models(entries: list[LocalModel], folder: Path) -> str:
    if not entries:
        return f"no models in {folder} (pull one with `localllm pull ORG/REPO`)"
    width = max(len(e.name) for e in entries)
    lines = [f"{'model':<{width}}  {'size':>8}  {'quant':<7}  {'context':>7}  fit on this machine"]
    for e in entries:
        lines.append(
            f"{e.name:<{width}}  {gib(e.size_bytes, 2, unit=False):>6}Gi  {e.quant or '?':<7}  "
            f"{e.n_ctx_train:>7}  {e.error or e.fits}"
        )
    return "\n".join(lines)
