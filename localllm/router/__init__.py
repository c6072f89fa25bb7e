"""Serve a models folder: one worker process per loaded model, placed by the fitter's plans."""

from localllm.router.registry import ModelEntry, Registry
from localllm.router.router import (
    UNSET,
    Lease,
    LoadedModel,
    ModelCounters,
    Router,
    parse_keep_alive,
)
from localllm.router.worker import WorkerClient

__all__ = [
    "UNSET",
    "Lease",
    "LoadedModel",
    "ModelCounters",
    "ModelEntry",
    "Registry",
    "Router",
    "WorkerClient",
    "parse_keep_alive",
]
