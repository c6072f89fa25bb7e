"""Predicted decode speed with speculative decoding, and the choice (pure arithmetic).

A verification step decodes the pending token plus k guesses in one batch. With a per-guess
acceptance rate alpha (each guess is kept only if all before it were), a step yields on average

    E(alpha, k) = (1 - alpha^(k+1)) / (1 - alpha)      tokens (k + 1 when alpha = 1).

A batch of b tokens costs the plan's single-token time plus, per extra token, its compute
(`Plan.batch_token_s`; the weights are read once for the whole step). On a GPU a decode step is
bound by reading the weights and extra tokens are nearly free; on a few CPU cores a decode step
is mostly compute, and an extra token costs most of a step: measured on 2 cores with
SmolLM2-135M, 9 ms of a 12.4 ms step, far more than a token of a long prompt (about 1 ms), so
n-gram guesses at 0.9 acceptance gained only x1.08-1.10 there (scripts/bench_spec.py):

    T(b) = 1 / decode_tok_s + (b - 1) * batch_token_s

(without a modelled batch_token_s, the prompt time per token stands in for it).

A draft model adds k of its own single-token steps (its plan's decode time) plus catching up on
the E tokens the target accepted (its prompt time per token). n-gram guesses cost nothing. With
s slots decoding together a step carries s pending tokens without speculation and s (k + 1) with
it, so the speed-up is

    speedup(s) = E T(s) / (T(s (k + 1)) + s D)

which falls as s grows: the extra tokens that were nearly free beside one stream fill the batch.
The break-even occupancy is the largest s with speedup(s) > 1; the engine stops guessing when more
slots decode than that (EngineConfig.spec_max_busy_slots).

The acceptance rate is a parameter: the engine measures it (`/metrics`
`localllm_spec_decode_acceptance_rate`), and these defaults are what it typically is on the kind
of text each proposer is for (n-gram guesses happen only where the history repeats, on code edits
and quoting; a same-family draft model agrees with its target on most easy tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

ASSUMED_ACCEPTANCE = {"ngram-simple": 0.6, "draft-simple": 0.7, "draft-mtp": 0.7}


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """Tokens one verification of k guesses yields, each kept with probability alpha (given
    the ones before it were): the bonus or correction token included."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def batch_seconds(
    n_tokens: int, decode_tok_s: float, prompt_tok_s: float, batch_token_s: float = 0.0
) -> float:
    """T(b): one decode step of n_tokens tokens. An extra token never costs more than a step
    of its own (a prompt prediction slower than decoding would say so)."""
    extra = batch_token_s if batch_token_s > 0 else 1.0 / max(prompt_tok_s, decode_tok_s)
    extra = min(extra, 1.0 / decode_tok_s)
    return 1.0 / decode_tok_s + max(0, n_tokens - 1) * extra


@dataclass(frozen=True)
class SpecPrediction:
    """What speculation does for one plan: speeds, the best draft length, the break-even."""

    spec_type: str
    acceptance: float
    draft_n_max: int  # the k that predicts the most tokens per second
    tokens_per_step: float
    decode_tok_s: float  # one stream, with speculation
    plain_decode_tok_s: float  # one stream, without
    break_even_slots: int  # it pays while at most this many slots decode (0: never)

    @property
    def speedup(self) -> float:
        return self.decode_tok_s / self.plain_decode_tok_s if self.plain_decode_tok_s else 0.0

    @property
    def gain(self) -> bool:
        return self.speedup > 1.0 and self.break_even_slots >= 1

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "spec_type": self.spec_type,
            "acceptance_assumed": self.acceptance,
            "draft_n_max": self.draft_n_max,
            "tokens_per_step": round(self.tokens_per_step, 2),
            "decode_tok_s": round(self.decode_tok_s, 1),
            "plain_decode_tok_s": round(self.plain_decode_tok_s, 1),
            "speedup": round(self.speedup, 2),
            "break_even_slots": self.break_even_slots,
        }


def speedup(
    slots: int,
    k: int,
    alpha: float,
    decode_tok_s: float,
    prompt_tok_s: float,
    draft_seconds: float = 0.0,
    batch_token_s: float = 0.0,
) -> float:
    """speedup(s) of the module docstring; draft_seconds is D, one slot's drafting per step."""
    plain = batch_seconds(slots, decode_tok_s, prompt_tok_s, batch_token_s)
    spec = (
        batch_seconds(slots * (k + 1), decode_tok_s, prompt_tok_s, batch_token_s)
        + slots * draft_seconds
    )
    return expected_tokens_per_step(alpha, k) * plain / spec


def predict(
    spec_type: str,
    decode_tok_s: float,
    prompt_tok_s: float,
    *,
    n_max: int,
    n_parallel: int,
    acceptance: float | None = None,
    draft_decode_tok_s: float | None = None,
    draft_prompt_tok_s: float | None = None,
    batch_token_s: float = 0.0,
) -> SpecPrediction:
    """The best draft length up to n_max for one stream, its speed, and the break-even
    occupancy (at most n_parallel). A draft model's speeds come from its own plan."""
    alpha = ASSUMED_ACCEPTANCE.get(spec_type, 0.5) if acceptance is None else acceptance
    alpha = min(max(alpha, 0.0), 1.0)
    if decode_tok_s <= 0 or prompt_tok_s <= 0:
        return SpecPrediction(spec_type, alpha, 0, 1.0, decode_tok_s, decode_tok_s, 0)

    def draft_seconds(k: int) -> float:
        if draft_decode_tok_s is None:
            return 0.0
        catch_up = expected_tokens_per_step(alpha, k) / (draft_prompt_tok_s or draft_decode_tok_s)
        return k / draft_decode_tok_s + catch_up

    best_k, best = 0, 1.0
    for k in range(1, max(1, n_max) + 1):
        gain = speedup(1, k, alpha, decode_tok_s, prompt_tok_s, draft_seconds(k), batch_token_s)
        if gain > best:
            best_k, best = k, gain
    if best_k == 0:
        return SpecPrediction(spec_type, alpha, 0, 1.0, decode_tok_s, decode_tok_s, 0)
    d = draft_seconds(best_k)
    break_even = 0
    for s in range(1, n_parallel + 1):
        if speedup(s, best_k, alpha, decode_tok_s, prompt_tok_s, d, batch_token_s) <= 1.0:
            break
        break_even = s
    return SpecPrediction(
        spec_type=spec_type,
        acceptance=alpha,
        draft_n_max=best_k,
        tokens_per_step=expected_tokens_per_step(alpha, best_k),
        decode_tok_s=decode_tok_s * best,
        plain_decode_tok_s=decode_tok_s,
        break_even_slots=break_even,
    )


def describe(prediction: SpecPrediction) -> str:
    """One line for `localllm fit` and the serve log."""
    p = prediction
    if not p.gain:
        return (
            f"speculative decoding ({p.spec_type}, acceptance {p.acceptance:.0%} assumed): "
            f"no gain predicted, off"
        )
    return (
        f"speculative decoding {p.spec_type}: {p.decode_tok_s:.1f} tok/s for one stream "
        f"(x{p.speedup:.2f}) with up to {p.draft_n_max} guesses at {p.acceptance:.0%} "
        f"acceptance ({p.tokens_per_step:.2f} tokens a step); pays while at most "
        f"{p.break_even_slots} slot{'s' if p.break_even_slots != 1 else ''} decode"
    )
