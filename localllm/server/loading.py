"""Settings -> engine configuration: the ONE place that decides how the model is loaded.

For now it maps the settings directly; the fitter (`localllm.fit`) will replace the body and
return its plan summary and warnings (e.g. "layers offloaded to the CPU: expect ~3 tok/s").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from localllm.engine.config import EngineConfig
from localllm.settings import Settings

DEFAULT_N_CTX = 4096


def plan_engine_config(
    model_path: Path, settings: Settings
) -> tuple[EngineConfig, dict[str, Any], list[str]]:
    """The engine config to load model_path with, a plan summary, and warnings for users."""
    n_ctx = settings.n_ctx if settings.n_ctx is not None else DEFAULT_N_CTX
    config = EngineConfig(
        model_path=model_path,
        n_ctx=n_ctx,
        n_parallel=settings.parallel,
        n_gpu_layers=settings.n_gpu_layers if settings.n_gpu_layers is not None else 0,
        type_k=settings.type_k,
        type_v=settings.type_v,
        flash_attn=settings.flash_attn,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
        n_threads=settings.threads,
        queue_size=settings.queue_size,
        max_tokens_default=settings.max_tokens_limit,
    )
    summary: dict[str, Any] = {
        "source": "settings",  # the fitter will say "fit"
        "model": model_path.name,
        "n_ctx": config.n_ctx,
        "n_parallel": config.n_parallel,
        "n_ctx_per_slot": config.n_ctx_slot,
        "n_gpu_layers": config.n_gpu_layers,
        "type_k": config.type_k,
        "type_v": config.type_v,
    }
    return config, summary, []
