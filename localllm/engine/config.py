"""How to load a model into the engine: one frozen record, built by `localllm.loading`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from localllm.ggml import CacheType
from localllm.rpc import RpcEndpoint


@dataclass(frozen=True)
class EngineConfig:
    """Everything llama.cpp needs to load a model and size its context.

    n_ctx is the total context, split evenly over the slots like llama-server does:
    each of the n_parallel slots holds `n_ctx // n_parallel` tokens.
    """

    model_path: Path
    n_ctx: int = 4096
    n_parallel: int = 4
    n_gpu_layers: int = 0  # -1 puts every layer on the GPU
    type_k: CacheType = "f16"
    type_v: CacheType = "f16"
    flash_attn: bool | None = None  # None lets llama.cpp decide
    # llama-server's default: the small sliding-window cache (n_swa + n_ubatch cells per slot);
    # context checkpoints keep prompt reuse working (llama-cpp-python's default is True).
    swa_full: bool = False
    # Context checkpoints per slot, for models whose memory cannot be cut back (recurrent,
    # hybrid, sliding-window with swa_full off); 0 turns them off. See `engine.checkpoints`.
    ctx_checkpoints: int = 4
    checkpoint_every_n_tokens: int = 0  # also checkpoint long prompts every N tokens (0: no)
    n_batch: int = 2048
    n_ubatch: int = 512
    n_threads: int | None = None  # None: every core
    # While slots are generating, a step carries only as many prompt tokens (at most n_ubatch)
    # as the measured cost per token fits into this many ms, so a stream waits about this long
    # behind another user's long prompt (engine.pacing); 0: fixed n_ubatch chunks.
    max_decode_stall_ms: float = 0.0  # 0: fixed n_ubatch chunks (localllm.engine.pacing)
    queue_size: int = 16
    tensor_split: tuple[float, ...] | None = None
    # (regex, buffer type) pairs, e.g. (r"\.ffn_.*_exps\.", "CPU") to keep MoE experts in RAM.
    tensor_overrides: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    # Repacked CPU weight buffers (CPU_REPACK, AMX). None: as the machine's probe says
    # (`engine.build.repack_supported`): some VMs advertise instructions they do not grant.
    use_extra_bufts: bool | None = None
    # llama.cpp rpc-server hosts whose devices take layers (before local GPUs, in this order).
    rpc_servers: tuple[RpcEndpoint, ...] = ()
    rpc_allow_public: bool = False  # RPC is unauthenticated: private addresses only by default
    # False reads the file into the buffers instead of mapping it. A sparse file (a header and a
    # hole, as the GPU check loads) then reads as zeros quickly, where a mapping would fault in
    # every page of the hole.
    use_mmap: bool = True
    seed: int | None = None  # default seed for requests that give none (None: random)
    max_tokens_default: int | None = None  # cap when a request gives no max_tokens
    # Speculative decoding (`localllm.engine.speculative`), named as llama-server's flags:
    # "none", "ngram-simple", "draft-simple" (spec_draft_model), "draft-mtp".
    spec_type: str = "none"
    spec_draft_model: Path | None = None
    spec_draft_n_max: int = 16  # guesses per verification step
    spec_draft_n_min: int = 0  # a shorter guess is not verified
    spec_ngram_simple_size_n: int = 12  # n-gram length looked up in the history
    spec_max_busy_slots: int = 0  # no guesses while more slots generate (0: no limit)

    def __post_init__(self) -> None:
        if self.n_parallel < 1:
            raise ValueError("n_parallel must be at least 1")
        if self.n_ctx < self.n_parallel * 16:
            raise ValueError(f"n_ctx {self.n_ctx} is too small for {self.n_parallel} slots")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise ValueError("n_batch and n_ubatch must be positive")
        if self.max_decode_stall_ms < 0:
            raise ValueError("max_decode_stall_ms must not be negative")
        if self.queue_size < 0:
            raise ValueError("queue_size must not be negative")
        if self.spec_draft_n_max < 0 or self.spec_draft_n_min < 0:
            raise ValueError("spec_draft_n_max and spec_draft_n_min must not be negative")
        if self.ctx_checkpoints < 0 or self.checkpoint_every_n_tokens < 0:
            raise ValueError("ctx_checkpoints and checkpoint_every_n_tokens must not be negative")

    @property
    def n_ctx_slot(self) -> int:
        """Tokens one slot (one request) may hold: prompt plus completion."""
        return self.n_ctx // self.n_parallel
