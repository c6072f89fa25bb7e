"""Ask llama.cpp itself what a configuration allocates, without allocating it.

`llama_model_params.no_alloc` with load mode NONE makes llama.cpp build the model and context
exactly as a real load would, read no tensor data and allocate nothing: the `... buffer size`
lines read 0, but the KV cache, output buffer and compute buffer lines carry the real figures
(llama.h `llama_model_params.no_alloc`; llama-model-loader.cpp skips the data reads). About a
second for any model size, so it is how the fitter's memory model is checked
(`scripts/bench_fit.py`, the tests) and how `localllm fit --check` checks a plan.

Like every llama.cpp caller it lives in the engine package; the fitter never imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localllm.engine import logs
from localllm.errors import ModelLoadError
from localllm.ggml import FLASH_ATTN_TYPE, LOAD_MODE_NONE, ggml_type_id
from localllm.units import MIB

_KV_RE = re.compile(
    r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\)"
)
_STATE_RE = re.compile(
    r"llama_memory_recurrent: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+) seqs"
)
_FLASH_RE = re.compile(r"Flash Attention (enabled|disabled)")
_FILE_SIZE_RE = re.compile(r"print_info: file size\s*=\s*([\d.]+) (MiB|GiB)")


@dataclass(frozen=True)
class KVCacheLine:
    bytes: int
    cells: int
    n_layers: int
    n_seqs: int


@dataclass(frozen=True)
class DryRunResult:
    """llama.cpp's own figures for one configuration (sizes logged in MiB with 2 decimals)."""

    kv_caches: tuple[KVCacheLine, ...]  # one per cache (two for sliding-window models)
    output_bytes: dict[str, int]  # by buffer name ("CPU", "CUDA_Host", ...)
    compute_bytes: dict[str, int]  # by buffer name ("CPU", "CUDA0", ...)
    flash_attn: bool | None
    weights_bytes: int  # llama.cpp's "file size" line: the bytes of every tensor in the file
    lines: tuple[str, ...]
    # recurrent-state caches (llama_memory_recurrent), one per model with recurrent layers
    state_caches: tuple[KVCacheLine, ...] = ()

    @property
    def state_bytes(self) -> int:
        return sum(state.bytes for state in self.state_caches)

    @property
    def kv_bytes(self) -> int:
        return sum(kv.bytes for kv in self.kv_caches)

    @property
    def total_output_bytes(self) -> int:
        return sum(self.output_bytes.values())

    @property
    def total_compute_bytes(self) -> int:
        return sum(self.compute_bytes.values())


def parse_load_log(lines: list[str] | tuple[str, ...]) -> DryRunResult:
    """Pull the allocation figures out of llama.cpp's model and context load log."""
    kv: list[KVCacheLine] = []
    state: list[KVCacheLine] = []
    output: dict[str, int] = {}
    compute: dict[str, int] = {}
    flash: bool | None = None
    weights = 0
    for line in lines:
        if m := _KV_RE.search(line):
            kv.append(KVCacheLine(round(float(m[1]) * MIB), int(m[2]), int(m[3]), int(m[5])))
        elif m := _STATE_RE.search(line):
            state.append(KVCacheLine(round(float(m[1]) * MIB), int(m[2]), int(m[3]), int(m[4])))
        elif m := _FLASH_RE.search(line):
            flash = m[1] == "enabled"
        elif m := _FILE_SIZE_RE.search(line):
            weights = round(float(m[1]) * (MIB if m[2] == "MiB" else 1024 * MIB))
    for buffer in logs.buffer_lines(lines):
        target = {"output": output, "compute": compute}.get(buffer.kind)
        if target is not None:
            target[buffer.buffer] = target.get(buffer.buffer, 0) + buffer.bytes
    return DryRunResult(tuple(kv), output, compute, flash, weights, tuple(lines), tuple(state))


def dry_run(
    path: Path,
    *,
    n_ctx: int,
    n_parallel: int = 1,
    n_ubatch: int = 512,
    n_batch: int = 2048,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool | None = None,
    swa_full: bool = True,
    kv_unified: bool = False,
    n_gpu_layers: int = -1,
    mtp: bool = False,
    n_rs_seq: int = 0,
) -> DryRunResult:
    """Load `path` with no_alloc and build a context; return what llama.cpp says it would use.
    With `mtp`, the model's MTP block is loaded too and an MTP draft context is built beside
    the target's (as `engine.mtp` does): its KV and compute lines follow the target's.
    `n_rs_seq`: recurrent-state snapshots per sequence (rollback of rejected guesses)."""
    import llama_cpp

    llama: Any = llama_cpp
    with logs.capture() as lines:
        llama.llama_backend_init()
        mparams = llama.llama_model_default_params()
        mparams.no_alloc = True
        mparams.load_mode = LOAD_MODE_NONE
        mparams.n_gpu_layers = n_gpu_layers
        mparams.load_mtp = mtp
        model = llama.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not read {path} (dry run)")
        try:
            cparams = llama.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_seq_max = n_parallel
            cparams.n_batch = n_batch
            cparams.n_ubatch = min(n_ubatch, n_batch)
            cparams.type_k = ggml_type_id(type_k)
            cparams.type_v = ggml_type_id(type_v)
            cparams.flash_attn_type = FLASH_ATTN_TYPE[flash_attn]
            cparams.swa_full = swa_full
            cparams.kv_unified = kv_unified
            cparams.n_rs_seq = n_rs_seq
            ctx = llama.llama_init_from_model(model, cparams)
            if not ctx:
                raise ModelLoadError(f"llama.cpp could not create the context for {path} (dry run)")
            if mtp:
                cparams.ctx_type = llama.LLAMA_CONTEXT_TYPE_MTP
                cparams.ctx_other = ctx
                cparams.n_rs_seq = 0
                draft = llama.llama_init_from_model(model, cparams)
                if draft:
                    llama.llama_free(draft)
            llama.llama_free(ctx)
            if mtp and not draft:
                raise ModelLoadError(f"llama.cpp could not create the MTP context for {path}")
        finally:
            llama.llama_model_free(model)
    return parse_load_log(lines)
