"""Prefill pacing: how many prompt tokens one step may carry while other slots are decoding.

A step is one llama_decode call, and every decoding slot waits for the whole step before it gets
its next token. With a fixed chunk of n_ubatch (512) prompt tokens, a stream stalled 1.4 s on a
2-core CPU whenever another user sent a long prompt. The pacer sizes the chunk from the measured
step time instead, so that a step beside decoding slots takes about `target_s`.

A step costs about `fixed + per_token * n`: the fixed part (reading the weights once, the
scheduler's own work) is measured on steps that carried generated tokens only, the per-token part
on steps with prompt tokens, each as an online average (EWMA) that follows a loaded machine and
the cost growing with the prompt's position. The chunk is what fits into the target, but never so
small that the fixed part (paid once per step, the decoding slots' tokens in it) slows the
prompt by more than TTFT_SLACK: the long prompt's time to first token stays within about 10% of
fixed n_ubatch chunks, and where both cannot hold (a slow or loaded machine, whose fixed part
alone is near the target) the stall grows past the target rather than the prompt crawling.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_CHUNK = 16  # prompt tokens per step whatever the estimate: the prompt always progresses
SEED_CHUNK = 64  # the first paced chunk, before a prompt step was measured
ALPHA = 0.3  # EWMA weight of the newest step: follows a change within a few steps
TTFT_SLACK = 0.1  # the fixed part may add at most this share to the prompt's own time


@dataclass
class PrefillPacer:
    """`budget()` before a step, `observe()` after it; owned by the scheduler thread."""

    target_s: float  # wanted step time beside decoding slots; 0 turns pacing off
    max_chunk: int  # never more than this beside decoding slots (n_ubatch, as before)
    fixed_s: float = 0.0  # seconds of a step without prompt tokens (0 until one was seen)
    token_s: float | None = None  # seconds per prompt token; None until a prompt step was seen

    def budget(self, n_decoding: int) -> int:
        """Prompt tokens the next step may carry beside `n_decoding` generated tokens."""
        if self.target_s <= 0:
            return self.max_chunk
        if self.token_s is None:
            return min(SEED_CHUNK, self.max_chunk)
        fit = (self.target_s - self.fixed_s) / self.token_s
        floor = self.fixed_s / (TTFT_SLACK * self.token_s)
        return max(min(MIN_CHUNK, self.max_chunk), min(self.max_chunk, int(max(fit, floor))))

    def observe(self, n_prompt: int, elapsed_s: float) -> None:
        """A step with `n_prompt` prompt tokens (and any generated ones) took `elapsed_s`."""
        if n_prompt <= 0:
            self.fixed_s = _ewma(self.fixed_s or None, elapsed_s)
            return
        # At least half the step is the prompt's, should the fixed part be overestimated.
        sample = max(elapsed_s - self.fixed_s, elapsed_s / 2) / n_prompt
        self.token_s = _ewma(self.token_s, sample)


def _ewma(average: float | None, sample: float) -> float:
    return sample if average is None else average + ALPHA * (sample - average)
