"""The fitter's records: what is asked (`FitRequest`) and what is proposed (`Plan`)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from localllm.ggml import CACHE_TYPES
from localllm.units import MIB
from localllm.vision.projector import Projector

Objective = Literal["balanced", "quality", "speed"]
OBJECTIVES: tuple[str, ...] = ("balanced", "quality", "speed")

# Tokens per conversation the fitter plans for when none is asked: the model's training context,
# capped here. With a GPU: 32768 (Ollama's default on cards of 23 GiB and more; a desktop
# conversation with documents pasted in); on the CPU alone 8192 (prompt processing is slow there).
DEFAULT_CTX_CAP = 32768
CPU_CTX_CAP = 8192
# The desktop order (fit_ladder): shrink the context down to this before trying a smaller quant.
DESKTOP_MIN_CTX = 8192
# ... trying quants of at least this many bits per weight first (Q4_0 4.5, Q4_K_M ~4.8, IQ4_XS
# 4.25); below it (Q3_K_M and smaller) answers degrade visibly, so a long context does not buy them.
DESKTOP_MIN_BITS = 4.2
# Parallel slots tried, most first, when --parallel is not given: as many conversations at once as
# fit beside the full context each (llama-server's default is 4 slots).
AUTO_SLOTS = (4, 2, 1)
# When the wanted context keeps layers off the GPU, the fitter tries halving it down to this.
MIN_SHRUNK_CTX = 4096
# Host memory beyond the buffers: the process, the CUDA runtime's host side, Python.
HOST_OVERHEAD_BYTES = 512 * MIB
# What the CUDA context costs on each GPU (gguf-parser counts 250 MiB, Ollama 457 MiB).
GPU_CONTEXT_OVERHEAD_BYTES = 300 * MIB


@dataclass(frozen=True)
class FitRequest:
    """What the user asks of a fit; None lets the fitter choose."""

    n_ctx: int | None = None  # tokens per conversation; None: up to DEFAULT_CTX_CAP; 0: trained
    n_parallel: int | None = 1  # conversations at once; None: the most of AUTO_SLOTS that fit
    n_gpu_layers: int | None = None  # given: explicit mode; -1 means all
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool | None = None  # None: llama.cpp's auto, which enables it on CPU and CUDA
    # Direct callers keep the full-size cache; settings (`fit`, `serve`) pass their own default,
    # llama-server's off.
    swa_full: bool = True
    ctx_checkpoints: int = 4  # the engine's context checkpoints per slot (host memory)
    kv_unified: bool = False  # localllm's engine: one KV stream per slot
    n_ubatch: int = 512
    n_batch: int = 2048
    gpu_margin_bytes: int = 1024 * MIB  # llama.cpp's own fit leaves 1 GiB per GPU
    min_speed_tok_s: float = 10.0
    objective: Objective = "balanced"
    cpu_moe: bool | None = None  # None: weigh keeping MoE experts in host memory; False: never
    # Reject quants whose measured loss (mean KL divergence vs a reference, from `localllm eval`)
    # exceeds this; quants never measured are kept.
    max_quality_loss: float | None = None
    # The vision projector the model loads with (`localllm.vision.projector_for`), counted on the
    # first GPU (llama.cpp's --mmproj-offload) or, with mmproj_offload False or no GPU, the host.
    projector: Projector | None = None
    mmproj_offload: bool = True
    mmproj: str = "auto"  # how `fit` finds the projector: "auto" (beside the model), "off", a path
    # Per model file (a hub repo's quants: each with the projector `pull` fetches with it), by
    # str(header.path); `for_model` puts the file's own in `projector`.
    model_projectors: tuple[tuple[str, Projector], ...] = ()
    # spec_type draft-mtp: the file's MTP block is loaded and an MTP draft context runs beside
    # the target's (its KV cache layer, compute and output buffers); no effect without a block
    mtp: bool = False
    # llama.cpp's n_rs_seq: recurrent-state snapshots per sequence, so that a hybrid model
    # (Qwen3.5) can roll back rejected guesses; each multiplies the recurrent state
    n_rs_seq: int = 0

    def __post_init__(self) -> None:
        if self.type_k not in CACHE_TYPES or self.type_v not in CACHE_TYPES:
            raise ValueError(f"cache types must be one of {', '.join(CACHE_TYPES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
        if (self.n_parallel is not None and self.n_parallel < 1) or self.n_ubatch < 1 or (
            self.n_batch < 1
        ):
            raise ValueError("n_parallel, n_ubatch and n_batch must be positive")

    def for_model(self, model: Path) -> FitRequest:
        """The request for one model file: its own projector when `model_projectors` names one."""
        for path, projector in self.model_projectors:
            if path == str(model):
                return replace(self, projector=projector)
        return self

    @classmethod
    def from_settings(cls, settings: Any, **changes: Any) -> FitRequest:
        """From a `localllm.settings.Settings`; keyword arguments override (e.g. objective)."""
        values: dict[str, Any] = {
            "n_ctx": settings.n_ctx,
            "n_parallel": settings.parallel,
            "n_gpu_layers": settings.n_gpu_layers,
            "type_k": settings.type_k,
            "type_v": settings.type_v,
            "flash_attn": settings.flash_attn,
            "n_ubatch": settings.n_ubatch,
            "n_batch": settings.n_batch,
            "swa_full": settings.swa_full,
            "ctx_checkpoints": settings.ctx_checkpoints,
            "gpu_margin_bytes": settings.gpu_margin_mib * MIB,
            "min_speed_tok_s": settings.min_speed,
            "max_quality_loss": getattr(settings, "max_quality_loss", None),
            "mmproj_offload": getattr(settings, "mmproj_offload", True),
            "mmproj": getattr(settings, "mmproj", "auto"),
            "mtp": getattr(settings, "spec_type", "none") == "draft-mtp",
            "n_rs_seq": getattr(settings, "spec_draft_n_max", 0)
            if getattr(settings, "spec_type", "none") == "draft-mtp" else 0,
        }
        values.update(changes)
        return cls(**values)


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device (a GPU or the host) holds under a plan."""

    name: str  # "CUDA0", ..., "RPC0" (a remote device), ..., "host"
    description: str  # the card's name (after "host:port" for a remote one), or "host RAM"
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    output_bytes: int
    overhead_bytes: int  # CUDA context, or host process overhead
    margin_bytes: int  # kept free on purpose (GPUs)
    capacity_bytes: int  # free GPU memory / available RAM before loading
    n_layers: int = 0  # repeating layers whose weights live here
    assumed: bool = False  # a card named by --gpu / --vram, not one detected on this machine
    checkpoint_bytes: int = 0  # the engine's context checkpoints, at most (host only)
    projector_bytes: int = 0  # the vision projector's weights and image-encoder compute buffer

    @property
    def total_bytes(self) -> int:
        return (
            self.projector_bytes
            + self.weights_bytes
            + self.kv_bytes
            + self.compute_bytes
            + self.output_bytes
            + self.overhead_bytes
            + self.checkpoint_bytes
        )

    @property
    def free_bytes(self) -> int:
        """What is left after loading (negative when it does not fit), before the margin."""
        return self.capacity_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes + self.margin_bytes <= self.capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "compute_bytes": self.compute_bytes,
            "output_bytes": self.output_bytes,
            "overhead_bytes": self.overhead_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "projector_bytes": self.projector_bytes,
            "margin_bytes": self.margin_bytes,
            "total_bytes": self.total_bytes,
            "capacity_bytes": self.capacity_bytes,
            "free_bytes": self.free_bytes,
            "n_layers": self.n_layers,
            "fits": self.fits,
            "assumed": self.assumed,
        }


@dataclass(frozen=True)
class Plan:
    """One configuration of one model file on one machine, with its predicted cost and speed."""

    files: tuple[Path, ...]
    quant: str
    n_layer: int
    n_gpu_layers: int  # as llama.cpp counts: n_layer + 1 puts the output layer on the GPU too
    n_ctx: int  # as llama.cpp will build it (padded)
    n_parallel: int
    type_k: str
    type_v: str
    flash_attn: bool
    swa_full: bool
    kv_unified: bool
    n_ubatch: int
    n_batch: int
    tensor_split: tuple[float, ...] | None
    tensor_overrides: tuple[tuple[str, str], ...]  # (regex, buffer type), e.g. experts -> CPU
    n_cpu_moe: int  # MoE layers whose experts stay in host memory
    devices: tuple[DeviceMemory, ...]  # one per GPU, then the host
    decode_tok_s: float
    prompt_tok_s: float
    fits: bool
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()  # (quant, reason) for the other ladder entries
    ladder: tuple[str, ...] = ()  # every quant considered (distinct labels), best quality first
    ladder_files: tuple[str, ...] = ()  # the file of each ladder entry
    has_swa: bool = False  # the model has sliding-window layers (swa_full matters)
    link_transfers: int = 0  # network transfers per token to and from RPC hosts
    link_seconds: float = 0.0  # their share of a token's time
    rpc_servers: tuple[str, ...] = ()  # "host:port" of each rpc-server, in llama.cpp's order
    projector: Projector | None = None  # the vision projector, counted in `projector_device`
    projector_device: str = ""  # "CUDA0", ... or "host"
    # Seconds one more token adds to a decode step of a few tokens (a speculative verification):
    # its compute, since the weights are read once for the whole step (0: not modelled).
    batch_token_s: float = 0.0

    @property
    def projector_dict(self) -> dict[str, Any] | None:
        if self.projector is None:
            return None
        return {**self.projector.to_dict(self.flash_attn), "device": self.projector_device}

    @property
    def file(self) -> Path:
        return self.files[0]

    @property
    def full_offload(self) -> bool:
        return self.n_gpu_layers > self.n_layer and self.n_cpu_moe == 0

    @property
    def gpus(self) -> tuple[DeviceMemory, ...]:
        return tuple(d for d in self.devices if d.name != "host")

    @property
    def host(self) -> DeviceMemory:
        return self.devices[-1]

    @property
    def n_ctx_slot(self) -> int:
        """Tokens one conversation may hold (prompt and answer)."""
        return self.n_ctx if self.kv_unified else self.n_ctx // self.n_parallel

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "files": [str(f) for f in self.files],
            "quant": self.quant,
            "n_layer": self.n_layer,
            "n_gpu_layers": self.n_gpu_layers,
            "n_ctx": self.n_ctx,
            "n_ctx_slot": self.n_ctx_slot,
            "n_parallel": self.n_parallel,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "flash_attn": self.flash_attn,
            "swa_full": self.swa_full,
            "kv_unified": self.kv_unified,
            "n_ubatch": self.n_ubatch,
            "n_batch": self.n_batch,
            "tensor_split": list(self.tensor_split) if self.tensor_split else None,
            "tensor_overrides": [list(o) for o in self.tensor_overrides],
            "n_cpu_moe": self.n_cpu_moe,
            "devices": [d.to_dict() for d in self.devices],
            "decode_tok_s": round(self.decode_tok_s, 2),
            "prompt_tok_s": round(self.prompt_tok_s, 1),
            "fits": self.fits,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            # by file: two files may carry the same declared type
            "rejected": {
                file: {"quant": quant, "reason": reasons[quant]}
                for quant, file in zip(self.ladder, self.ladder_files, strict=True)
                if quant in (reasons := dict(self.rejected))
            },
            "ladder": list(self.ladder),
            "link_transfers_per_token": self.link_transfers,
            "link_ms_per_token": round(self.link_seconds * 1000, 3),
            "rpc_servers": list(self.rpc_servers),
            "projector": self.projector_dict,
        }

    def llama_params(self) -> dict[str, Any]:
        """The load parameters localllm's engine (and llama.cpp) take, named as EngineConfig names
        them: n_gpu_layers, n_ctx, n_parallel (= n_seq_max), type_k/v, flash_attn, swa_full,
        kv_unified, n_batch, n_ubatch, tensor_split, tensor_overrides."""
        return {
            "model_path": self.file,
            "n_gpu_layers": self.n_gpu_layers,
            "n_ctx": self.n_ctx,
            "n_parallel": self.n_parallel,
            "n_seq_max": self.n_parallel,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "flash_attn": self.flash_attn,
            "swa_full": self.swa_full,
            "kv_unified": self.kv_unified,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "tensor_split": self.tensor_split,
            "tensor_overrides": self.tensor_overrides,
        }

    def llama_server_command(self) -> str:
        """The equivalent `llama-server` command line."""
        args = [
            "llama-server",
            "-m",
            str(self.file),
            "-ngl",
            str(self.n_gpu_layers),
            "-c",
            str(self.n_ctx),
            "-np",
            str(self.n_parallel),
            "-fa",
            "on" if self.flash_attn else "off",
            "-b",
            str(self.n_batch),
            "-ub",
            str(self.n_ubatch),
        ]
        if self.type_k != "f16":
            args += ["-ctk", self.type_k]
        if self.type_v != "f16":
            args += ["-ctv", self.type_v]
        if self.swa_full and self.has_swa:
            args.append("--swa-full")
        if self.kv_unified:
            args.append("--kv-unified")
        else:
            args.append("--no-kv-unified")
        if self.rpc_servers:
            args += ["--rpc", ",".join(self.rpc_servers)]
        if self.projector is not None:
            args += ["--mmproj", str(self.projector.path)]
            if self.projector_device == "host" and self.gpus:
                args.append("--no-mmproj-offload")
        if self.tensor_split:
            args += ["-ts", ",".join(f"{x:g}" for x in self.tensor_split)]
        if self.n_cpu_moe:
            args += ["--n-cpu-moe", str(self.n_cpu_moe)]
        else:
            for pattern, buffer in self.tensor_overrides:
                args += ["-ot", f"{pattern}={buffer}"]
        return shlex.join(args)
