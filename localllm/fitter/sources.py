"""The fitter's edge: reading headers and stored quality measurements, then fitting.

Everything else in this package is pure; this module touches the disk (GGUF headers, the quality
sidecars `localllm eval` writes) and, when no hardware is given, asks `localllm.hardware`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from localllm.errors import DoesNotFitError, GGUFError, SettingsError
from localllm.fitter.records import FitRequest, Plan
from localllm.fitter.search import fit_header, fit_ladder
from localllm.gguf_header import ModelHeader, read_header
from localllm.hardware import Hardware, hardware_for
from localllm.models import ladder_labels, model_files, quality_sidecar_path
from localllm.vision import projector_for

log = logging.getLogger(__name__)


def read_headers(model: Path | str) -> list[ModelHeader]:
    """Headers of a file, a split set (any part), a folder of quants, or a glob."""
    text = str(model)
    path = Path(text).expanduser()
    if any(ch in text for ch in "*?["):
        paths = sorted(p for p in path.parent.glob(path.name) if p.suffix == ".gguf")
        paths = [p for p in paths if "-of-" not in p.name or "-00001-of-" in p.name]
    elif path.is_dir():
        paths = model_files(path)
    else:
        paths = [path]
    if not paths:
        raise DoesNotFitError(f"no GGUF files match {text}")
    return [read_header(p) for p in paths]


def fit(
    model: Path | str | ModelHeader | Sequence[ModelHeader],
    hardware: Hardware | None = None,
    request: FitRequest | None = None,
    settings: Any = None,
) -> Plan:
    """Plan a model: a path (file, folder or glob of quants -> ladder) or header(s).

    `hardware` defaults to `localllm.hardware.hardware_for(settings)` (NVML, the host probe,
    --gpu / --vram); `request` to `FitRequest.from_settings(settings)` or the defaults.
    """
    if isinstance(model, ModelHeader):
        headers: list[ModelHeader] = [model]
    elif isinstance(model, (str, Path)):
        headers = read_headers(model)
    else:
        headers = list(model)
    if hardware is None:
        hardware = hardware_for(settings)
    if request is None:
        request = FitRequest.from_settings(settings) if settings is not None else FitRequest()
    request = with_projector(request, headers[0].path)
    if len(headers) == 1 and request.max_quality_loss is None:
        return fit_header(headers[0], hardware, request)
    if request.n_gpu_layers is not None and len(headers) > 1:
        raise SettingsError("--n-gpu-layers plans one file; name a file, not a folder of quants")
    losses = measured_quality_losses(headers)
    return fit_ladder(headers, hardware, request, losses, ladder_labels(headers))


def load_quality_loss(model: Path) -> float | None:
    """The largest measured quality loss (mean KLD) stored for a model, over the texts measured."""
    path = quality_sidecar_path(model)
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except ValueError:
        log.warning("ignoring unreadable %s", path)
        return None
    if not isinstance(stored, dict):
        return None
    losses = [entry.get("mean_kld") for entry in stored.values() if isinstance(entry, dict)]
    measured = [float(x) for x in losses if x is not None]
    return max(measured) if measured else None


def measured_quality_losses(headers: Sequence[ModelHeader]) -> dict[Path, float]:
    """Quality losses `localllm eval` stored beside local model files (none for hub headers)."""
    losses = {}
    for header in headers:
        if header.path.is_file():
            loss = load_quality_loss(header.path)
            if loss is not None:
                losses[header.path] = loss
    return losses


def with_projector(request: FitRequest, model: Path) -> FitRequest:
    """The request with the vision projector the model loads with (the `mmproj` setting): one
    found beside the model is skipped with a warning when unreadable; a named one must read."""
    if request.projector is not None or request.mmproj == "off":
        return request
    try:
        projector = projector_for(model, request.mmproj)
    except GGUFError as exc:
        if request.mmproj != "auto":
            raise
        log.warning("ignoring the vision projector beside %s: %s", model.name, exc)
        return request
    return replace(request, projector=projector) if projector is not None else request
