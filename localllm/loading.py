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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from localllm.engine.build import (
    cuda_fix_command,
    gpu_offload,
    repack_planned,
    repack_supported,
    report_repack,
)
from localllm.engine.config import EngineConfig
from localllm.engine.dry_run import dry_run
from localllm.errors import SettingsError
from localllm.fitter import FitRequest, Plan, fit, plan_summary_line, read_headers
from localllm.fitter.speculative import SpecPrediction, describe, predict
from localllm.gguf_header import read_header
from localllm.hardware import Hardware, detect_gpus, hardware_for, probe_host
from localllm.rpc import hardware_for_settings, parse_rpc_servers
from localllm.settings import Settings

log = logging.getLogger(__name__)


def planning_hardware(
    settings: Settings, *, serving: bool = False
) -> tuple[Hardware, list[str]]:
    """The hardware every command plans for, and warnings about a build/GPU mismatch.

    What `serve` would load on this machine with this llama.cpp build: the GPUs NVML sees when
    the build can offload to them, else the CPU alone. `--cpu` (or `--vram 0`) plans for the CPU;
    `--gpu` / `--vram` name hardware to plan for instead (marked assumed), except when serving
    on a CPU-only build, which cannot use them.
    RPC hosts (`settings.rpc`) come first, as llama.cpp orders devices; serving needs them to
    answer, planning takes memory given by hand for a host that does not.
    """
    warnings: list[str] = []
    gpu_build = gpu_offload()
    named = bool(settings.gpu or settings.vram)
    if settings.cpu_only or (named and not serving) or (named and gpu_build):
        hardware = hardware_for(settings)
    else:
        gpus = detect_gpus()
        if not gpu_build and gpus:
            warnings.append(
                f"this llama.cpp build is CPU-only but {gpus[0].name} is installed: everything "
                f"runs on the CPU; rebuild with CUDA: {cuda_fix_command(Path(sys.prefix))}"
            )
        asked_layers = settings.n_gpu_layers not in (None, 0)
        if serving and not gpu_build and asked_layers and not settings.rpc:
            warnings.append(
                f"n_gpu_layers={settings.n_gpu_layers} asked for, but this llama.cpp build has no "
                "GPU backend: the model runs on the CPU (see `localllm doctor`)"
            )
        if gpu_build and gpus:
            hardware = hardware_for(settings, gpus=gpus)
        else:
            host = probe_host()
            note = (
                "CPU-only llama.cpp build: planning for the CPU alone"
                if not gpu_build
                else "no GPU detected (NVML): planning for the CPU alone"
            )
            hardware = Hardware(
                gpus=(), host=host, threads=settings.threads or host.logical_cores, notes=(note,)
            )
    hardware, _ = hardware_for_settings(hardware, settings, must_answer=serving)
    # Planning never starts the repack probe (a child process): the probe's cached answer, else
    # llama.cpp's default for this CPU. `plan_for_serving` probes, as an engine is about to load.
    return replace(hardware, cpu_repack=repack_planned().supported), warnings


def plan_for_serving(
    model_path: Path,
    settings: Settings,
    probed: tuple[Hardware, list[str]] | None = None,
) -> tuple[Plan, EngineConfig, list[str]]:
    """The fitter's plan for this machine, the engine config that follows it, and warnings.

    `probed` is `planning_hardware(settings, serving=True)` already called: the router plans
    many models against the machine as it was before any of them loaded."""
    hardware, warnings = probed or planning_hardware(settings, serving=True)
    warnings = list(warnings)
    request = FitRequest.from_settings(settings)
    if not hardware.gpus and request.n_gpu_layers:
        request = replace(request, n_gpu_layers=0)
    # A missing or damaged file fails here, before the repack probe. Then the probe (an engine
    # is about to load): the engine repacks host weights exactly when it allows, and so does
    # the plan.
    headers = read_headers(model_path)
    probe = repack_supported()
    report_repack(probe)
    repack = probe.supported
    hardware = replace(hardware, cpu_repack=repack)
    plan = fit(headers, hardware, request)
    params = plan.llama_params()
    draft_plan = plan_draft_model(settings, hardware, request)
    speculation = plan_speculation(plan, settings, draft_plan)
    spec_type, spec_max_busy = settings.spec_type, 0
    spec_n_max = settings.spec_draft_n_max
    if speculation is not None:
        log.info("%s", describe(speculation))
        if spec_type == "auto":
            spec_type = "ngram-simple" if speculation.gain else "none"
            spec_max_busy = speculation.break_even_slots
            # the draft length the prediction found best (longer guesses cost more than they
            # save on a compute-bound step), never past the setting
            spec_n_max = min(spec_n_max, speculation.draft_n_max or spec_n_max)
    if draft_plan is not None:
        warnings.extend(draft_memory_warnings(plan, draft_plan))
    config = EngineConfig(
        model_path=model_path,
        n_ctx=params["n_ctx"],
        n_parallel=params["n_parallel"],
        n_gpu_layers=params["n_gpu_layers"],
        type_k=params["type_k"],
        type_v=params["type_v"],
        flash_attn=settings.flash_attn,  # None lets llama.cpp decide, as the plan assumed
        swa_full=params["swa_full"],
        ctx_checkpoints=settings.ctx_checkpoints,
        n_batch=params["n_batch"],
        n_ubatch=params["n_ubatch"],
        n_threads=settings.threads,
        max_decode_stall_ms=settings.max_decode_stall_ms,
        use_extra_bufts=repack,
        queue_size=settings.queue_size,
        tensor_split=params["tensor_split"],
        tensor_overrides=tuple(params["tensor_overrides"]),
        max_tokens_default=settings.max_tokens_limit,
        rpc_servers=parse_rpc_servers(settings.rpc),
        rpc_allow_public=settings.rpc_allow_public,
        # the projector the plan counted, where it put it (`mmproj`, `mmproj_offload`)
        mmproj_path=plan.projector.path if plan.projector is not None else None,
        mmproj_offload=plan.projector_device not in ("", "host"),
        mmproj_required=settings.mmproj not in ("auto", "off"),
        spec_type=spec_type if spec_type != "auto" else "none",
        spec_draft_model=Path(settings.spec_draft_model) if settings.spec_draft_model else None,
        spec_draft_n_max=spec_n_max,
        spec_draft_n_min=settings.spec_draft_n_min,
        spec_ngram_simple_size_n=settings.spec_ngram_simple_size_n,
        spec_max_busy_slots=spec_max_busy,
    )
    return plan, config, warnings + list(plan.warnings)


def plan_draft_model(settings: Settings, hardware: Hardware, request: FitRequest) -> Plan | None:
    """The draft model's own plan (draft-simple): same slots and context as the target."""
    if settings.spec_type != "draft-simple" or not settings.spec_draft_model:
        return None
    return fit(read_headers(Path(settings.spec_draft_model)), hardware, request)


def draft_memory_warnings(plan: Plan, draft_plan: Plan) -> list[str]:
    """The draft model's weights, KV and compute come on top of the target's plan."""
    warnings = []
    for device in plan.devices:
        extra = sum(d.total_bytes for d in draft_plan.devices if d.name == device.name)
        if extra and device.total_bytes + extra > device.capacity_bytes:
            warnings.append(
                f"the draft model needs {extra / 2**30:.2f} GiB more on {device.name}, past "
                f"its {device.capacity_bytes / 2**30:.2f} GiB; use a smaller draft model, a "
                "smaller context, or spec_type ngram-simple"
            )
    return warnings


def plan_speculation(
    plan: Plan, settings: Settings, draft_plan: Plan | None = None
) -> SpecPrediction | None:
    """What speculation is predicted to do for this plan ("auto" asks about ngram-simple)."""
    kind = settings.spec_type
    if kind == "none":
        return None
    if kind == "auto":
        kind = "ngram-simple"
    draft_speeds = (draft_plan.decode_tok_s, draft_plan.prompt_tok_s) if draft_plan else None
    if kind == "draft-mtp":
        draft_speeds = mtp_speeds(plan)
    return predict(
        kind,
        plan.decode_tok_s,
        plan.prompt_tok_s,
        n_max=settings.spec_draft_n_max,
        n_parallel=plan.n_parallel,
        draft_decode_tok_s=draft_speeds[0] if draft_speeds else None,
        draft_prompt_tok_s=draft_speeds[1] if draft_speeds else None,
        batch_token_s=plan.batch_token_s,
    )


def mtp_speeds(plan: Plan) -> tuple[float, float] | None:
    """The MTP block's decode and prompt speeds: a step reads the block and the output head
    where the target reads every weight, so it is that share of a target step (None: the file
    has no MTP block)."""
    from localllm.fitter.memory import HeaderFacts

    facts = HeaderFacts(read_header(plan.files[0]), load_mtp=True)
    if not facts.mtp_bytes or not facts.total_bytes:
        return None
    share = (facts.mtp_bytes + facts.output_bytes) / facts.total_bytes
    return plan.decode_tok_s / share, plan.prompt_tok_s / share


def plan_engine_config(
    model_path: Path, settings: Settings
) -> tuple[EngineConfig, dict[str, Any], list[str]]:
    """The engine config to load model_path with, a plan summary, and warnings for users."""
    plan, config, warnings = plan_for_serving(model_path, settings)
    summary = plan_summary(model_path, plan, config)
    log.info("plan: %s", summary["plan"])
    log.info("repeating layers: %s", layer_placement(plan))
    return config, summary, warnings


def layer_placement(plan: Plan) -> str:
    """Where the plan puts the repeating layers, device by device, for the serve log:
    'CUDA0 (NVIDIA GeForce RTX 4090) 28, CUDA1 (NVIDIA GeForce RTX 3090) 20, host 0 of 48'."""
    parts = [
        f"{d.name} ({d.description}) {d.n_layers}" if d.name != "host" else f"host {d.n_layers}"
        for d in plan.devices
    ]
    return f"{', '.join(parts)} of {plan.n_layer}"


def plan_summary(model_path: Path, plan: Plan, config: EngineConfig) -> dict[str, Any]:
    """What /health and /v1/models say about a model's plan."""
    return {
        "source": "fit",
        "model": model_path.name,
        "plan": plan_summary_line(plan),
        "quant": plan.quant,
        "n_ctx": config.n_ctx,
        "n_parallel": config.n_parallel,
        "n_ctx_per_slot": config.n_ctx_slot,
        "tokens_per_conversation": config.n_ctx_slot,
        "n_gpu_layers": config.n_gpu_layers,
        "n_layer": plan.n_layer,
        "type_k": config.type_k,
        "type_v": config.type_v,
        "swa_full": config.swa_full,
        "ctx_checkpoints": config.ctx_checkpoints,
        "spec_type": config.spec_type,
        "spec_max_busy_slots": config.spec_max_busy_slots,
        "decode_tok_s_predicted": round(plan.decode_tok_s, 1),
        "prompt_tok_s_predicted": round(plan.prompt_tok_s, 1),
        "devices": [device.to_dict() for device in plan.devices],
        "gpu_build": gpu_offload(),
        "llama_server_command": plan.llama_server_command(),
        "warnings": list(plan.warnings),
    }


@dataclass(frozen=True)
class CheckRow:
    """One buffer: what the fitter predicted and what llama.cpp's dry run says it allocates."""

    what: str
    predicted_bytes: int
    llama_cpp_bytes: int

    @property
    def gap_percent(self) -> float:
        if not self.llama_cpp_bytes:
            return 0.0 if not self.predicted_bytes else 100.0
        return 100.0 * (self.predicted_bytes - self.llama_cpp_bytes) / self.llama_cpp_bytes


def check_plan(plan: Plan) -> list[CheckRow]:
    """Run llama.cpp's own dry run (no_alloc: nothing read or allocated) for exactly this plan."""
    if plan.gpus and not gpu_offload():
        raise SettingsError(
            "--check runs llama.cpp's dry run, and this llama.cpp build is CPU-only: it can check "
            "CPU plans here (add --cpu), or GPU plans on a machine with a GPU build"
        )
    measured = dry_run(
        plan.file,
        n_ctx=plan.n_ctx,
        n_parallel=plan.n_parallel,
        n_ubatch=plan.n_ubatch,
        n_batch=plan.n_batch,
        type_k=plan.type_k,
        type_v=plan.type_v,
        flash_attn=plan.flash_attn,
        swa_full=plan.swa_full,
        kv_unified=plan.kv_unified,
        n_gpu_layers=plan.n_gpu_layers,
    )
    # The dry run's weights are the file's tensors; the fitter's host figure adds the CPU_REPACK
    # copy and, with a GPU, the output layer's duplicate: compare like with like.
    rows = [
        CheckRow("weights (all tensors)", read_header(plan.file).total_bytes,
                 measured.weights_bytes),
        # the plan's KV column holds recurrent layers' state too (llama_memory_recurrent)
        CheckRow("KV cache", sum(d.kv_bytes for d in plan.devices),
                 measured.kv_bytes + measured.state_bytes),
        CheckRow("output buffer", sum(d.output_bytes for d in plan.devices),
                 measured.total_output_bytes),
    ]
    for device in plan.devices:
        # llama.cpp names the host's compute buffer CPU, or CUDA_Host (pinned) beside a GPU.
        names = ("CPU", "CUDA_Host") if device.name == "host" else (device.name,)
        actual = sum(measured.compute_bytes.get(name, 0) for name in names)
        rows.append(CheckRow(f"compute buffer {device.name}", device.compute_bytes, actual))
    return rows
