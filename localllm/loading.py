"""Settings -> plan -> engine configuration: the ONE place that decides how a model is loaded.

The fitter plans the model for the hardware this process can actually use: the GPUs NVML sees
when the llama.cpp build can offload, else the CPU alone. Settings given explicitly (n_ctx,
n_gpu_layers, cache types, --gpu/--vram) flow into the plan's request, so the plan and the engine
never disagree. A user asking for GPU layers on a CPU-only build is told loudly, with the fix.
`serve` loads with this plan, and `doctor` and `profile` report it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from localllm.engine.build import cuda_fix_command, gpu_offload, repack_supported
from localllm.engine.config import EngineConfig
from localllm.fitter import FitRequest, Plan, fit, plan_summary_line
from localllm.hardware import Hardware, detect_gpus, hardware_for, probe_host
from localllm.settings import Settings

log = logging.getLogger(__name__)


def serving_hardware(settings: Settings, gpu_build: bool) -> tuple[Hardware, list[str]]:
    """The hardware to plan a real load for, and warnings about a build/GPU mismatch."""
    warnings: list[str] = []
    gpus = detect_gpus()
    if not gpu_build:
        if gpus:
            warnings.append(
                f"this llama.cpp build is CPU-only but {gpus[0].name} is installed: everything "
                f"runs on the CPU; rebuild with CUDA: {cuda_fix_command(Path(sys.prefix))}"
            )
        if settings.n_gpu_layers not in (None, 0):
            warnings.append(
                f"n_gpu_layers={settings.n_gpu_layers} asked for, but this llama.cpp build has no "
                "GPU backend: the model runs on the CPU (see `localllm doctor`)"
            )
        # Plan for the CPU alone: --gpu/--vram describe hardware this build cannot use.
        host = probe_host()
        threads = settings.threads or host.logical_cores
        note = "CPU-only llama.cpp build: planning for the CPU alone"
        hardware = Hardware(gpus=(), host=host, threads=threads, notes=(note,))
    else:
        hardware = hardware_for(settings, gpus=gpus or None)
    # The engine repacks host weights exactly when the machine's probe allows it.
    return replace(hardware, cpu_repack=repack_supported().supported), warnings


def plan_for_serving(model_path: Path, settings: Settings) -> tuple[Plan, EngineConfig, list[str]]:
    """The fitter's plan for this machine, the engine config that follows it, and warnings."""
    gpu_build = gpu_offload()
    hardware, warnings = serving_hardware(settings, gpu_build)
    request = FitRequest.from_settings(settings)
    if not gpu_build and request.n_gpu_layers:
        request = replace(request, n_gpu_layers=0)
    plan = fit(model_path, hardware, request)
    params = plan.llama_params()
    config = EngineConfig(
        model_path=model_path,
        n_ctx=params["n_ctx"],
        n_parallel=params["n_parallel"],
        n_gpu_layers=params["n_gpu_layers"],
        type_k=params["type_k"],
        type_v=params["type_v"],
        flash_attn=settings.flash_attn,  # None lets llama.cpp decide, as the plan assumed
        swa_full=params["swa_full"],
        n_batch=params["n_batch"],
        n_ubatch=params["n_ubatch"],
        n_threads=settings.threads,
        queue_size=settings.queue_size,
        tensor_split=params["tensor_split"],
        tensor_overrides=tuple(params["tensor_overrides"]),
        max_tokens_default=settings.max_tokens_limit,
    )
    return plan, config, warnings + list(plan.warnings)


def plan_engine_config(
    model_path: Path, settings: Settings
) -> tuple[EngineConfig, dict[str, Any], list[str]]:
    """The engine config to load model_path with, a plan summary, and warnings for users."""
    plan, config, warnings = plan_for_serving(model_path, settings)
    summary: dict[str, Any] = {
        "source": "fit",
        "model": model_path.name,
        "plan": plan_summary_line(plan),
        "n_ctx": config.n_ctx,
        "n_parallel": config.n_parallel,
        "n_ctx_per_slot": config.n_ctx_slot,
        "n_gpu_layers": config.n_gpu_layers,
        "n_layer": plan.n_layer,
        "type_k": config.type_k,
        "type_v": config.type_v,
        "swa_full": config.swa_full,
        "decode_tok_s_predicted": round(plan.decode_tok_s, 1),
        "prompt_tok_s_predicted": round(plan.prompt_tok_s, 1),
        "devices": [device.to_dict() for device in plan.devices],
        "gpu_build": gpu_offload(),
        "llama_server_command": plan.llama_server_command(),
    }
    log.info("plan: %s", summary["plan"])
    return config, summary, warnings
