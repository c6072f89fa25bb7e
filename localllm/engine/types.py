"""The engine's request, event and statistics records (frozen; no llama.cpp in here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampler chain. temperature <= 0 means greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None  # None: the engine's default seed, else random
    grammar: str | None = None  # GBNF with a `root` rule
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt (text or token ids) and how to continue it."""

    prompt: str | tuple[int, ...]
    max_tokens: int | None = None  # None: up to the end of the slot's context
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs: int | None = None  # None: off; k: the chosen token's logprob plus the top k
    add_special: bool = True  # BOS etc. as the model wants; False when a chat template wrote it
    parse_special: bool = True  # "<start_of_turn>" in the text becomes the control token
    timeout_s: float | None = None  # fail with RequestTimeoutError when still running after
    # Control tokens whose text stays in the output (tool-call markers such as Mistral's
    # "[TOOL_CALLS]"); every other control token still prints as nothing.
    keep_special: tuple[str, ...] = ()
    # llama-server's per-request "speculative.n_max" / "speculative.n_min" (None: the server's
    # spec_draft_n_max / spec_draft_n_min); no effect without speculation.
    spec_draft_n_max: int | None = None
    spec_draft_n_min: int | None = None


@dataclass(frozen=True)
class TopLogprob:
    token: str
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the raw model distribution, plus alternatives."""

    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextEvent:
    """New text (may be empty when a token's bytes are held back) and its tokens' logprobs."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cells were reused, not recomputed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a request that was not cancelled or failed."""

    finish_reason: FinishReason
    usage: Usage
    time_to_first_token_s: float
    prompt_tokens_per_s: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class Completion:
    """Everything a request produced, for the blocking API."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: tuple[TokenLogprob, ...]
    time_to_first_token_s: float
    decode_tokens_per_s: float


Event = TextEvent | FinishEvent


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics and /health."""

    n_slots: int
    busy_slots: int
    queue_length: int
    kv_cells_used: int  # tokens held in the KV cache over all slots, idle caches included
    kv_cells_total: int
    requests_total: int  # finished, any reason
    prompt_tokens_total: int  # prompt tokens computed (cached ones not counted)
    cached_tokens_total: int
    generated_tokens_total: int
    prompt_seconds_total: float  # wall time of decode steps that carried prompt tokens
    decode_seconds_total: float  # wall time of decode steps that carried generated tokens
    last_time_to_first_token_s: float | None
    # Context checkpoints (recurrent / hybrid / small sliding-window caches; engine.checkpoints).
    checkpoints_saved_total: int = 0
    checkpoints_restored_total: int = 0
    checkpoint_bytes: int = 0  # host memory the slots' checkpoints hold now
    # Prefill pacing (engine.pacing): steps that carried prompt tokens beside generated ones, and
    # the measured ms per prompt token the chunks are sized from (None: none measured).
    shared_steps_total: int = 0
    prefill_ms_per_token: float | None = None
    # Speculative decoding (engine.speculative), as llama-server's spec_decode_* counters.
    spec_type: str = "none"
    spec_draft_tokens_total: int = 0  # guesses verified
    spec_accepted_tokens_total: int = 0  # guesses the model agreed with
    spec_drafts_total: int = 0  # verification steps

    @property
    def spec_acceptance_rate(self) -> float | None:
        """Share of verified guesses accepted (None before any)."""
        if not self.spec_draft_tokens_total:
            return None
        return self.spec_accepted_tokens_total / self.spec_draft_tokens_total

    @property
    def prompt_tokens_per_s(self) -> float:
        return (
            self.prompt_tokens_total / self.prompt_seconds_total
            if self.prompt_seconds_total
            else 0.0
        )

    @property
    def decode_tokens_per_s(self) -> float:
        return (
            self.generated_tokens_total / self.decode_seconds_total
            if self.decode_seconds_total
            else 0.0
        )
