"""Prefill pacing: how many prompt tokens one step may carry while other slots are decoding.

A step is one llama_decode call, and every decoding slot waits for the whole step before it gets
its next token. With a fixed chunk of n_ubatch (512) prompt tokens, a stream stalled 1.4 s on a
2-core CPU whenever another user sent a long prompt. The pacer sizes the chunk from the measured
step time instead, so that a decoding slot gets its next token about `target_s` after its last.

Cost model, fitted from the last WINDOW steps while serving: a step carrying n prompt tokens
costs `fixed + per_token * n`. Measured on a loaded 2-core CPU (docs/scheduling.md), single steps
scatter by a factor of two, some take ten times their usual time and the load drifts within a
minute, so every estimate is a median, never an average that one spike drags along:
- The fixed part: with llama.cpp's threads oversubscribed, a step with prompt tokens cost about
  100 ms more than a decode-only step whatever its size. A model that took the decode-only time
  as the fixed part blamed that on the tokens, shrank the chunk, blamed more and spiralled down
  to a few tokens per step (the long prompt took 1.5-2.5x its time). So the fixed part comes
  from a Theil-Sen line: the median of the slopes between consecutive steps of clearly
  different chunk sizes (consecutive, since steps a minute apart ran under different loads);
  the chunks alternate between two sizes (DITHER) so that such pairs exist. It is never below
  the median decode-only step (a step with prompt tokens does all that one does) nor above the
  cheapest step seen (a load growing while the prompt is read makes the line's fixed part
  absurd).
- The cost per token: the median of what the steps took beyond the fixed part.
- The medians size the chunk for the stall; the 10% bound on the long prompt also counts the
  mean of what the steps took beyond the median line (on a 2-core machine with 2 busy threads,
  one step in four took 2-8 s whatever its size, and the prompt waits for all of them) and the
  time between two steps.

The chunk is what fits into the time left before the decoding slots' deadline (`target_s` after
the end of the previous step, which gave them their last token), but never so small that the
fixed part and the time between two steps, paid once per step, make the prompt slower than
TTFT_SLACK beyond fixed max_chunk chunks: the long prompt's time to first token stays within
about 10% of what it was without pacing, and where both cannot hold (a slow or loaded machine,
whose fixed part alone is near the target) the stall grows past the target rather than the
prompt crawling.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_CHUNK = 16  # prompt tokens per step whatever the estimate: the prompt always progresses
SEED_CHUNK = 64  # the first paced chunk, before a prompt step was measured
WINDOW = 32  # steps of each kind the estimates are taken from: follows a change within ~16
TTFT_SLACK = 0.1  # the steps' fixed parts may make the prompt at most this much slower
DITHER = 0.7  # every other chunk is this much smaller (or PAIR_RATIO larger at the floor)
PAIR_RATIO = 1.25  # chunk sizes of a pair differ at least this much, so its slope means something
MIN_PAIRS = 3  # pairs of steps with different chunk sizes needed to fit the fixed part


@dataclass
class PrefillPacer:
    """`budget()` before a step, `observe()` after it; owned by the scheduler thread."""

    target_s: float  # wanted gap between a decoding slot's tokens; 0 turns pacing off
    max_chunk: int  # never more than this beside decoding slots (n_ubatch, as before)
    clock: Callable[[], float] = time.perf_counter
    _decode_s: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    _prompt: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    _last_end: float | None = None  # when the last step ended
    # Seconds from the end of one step to the start of the next beside decoding slots: the
    # scheduler's own work, and on a busy server the HTTP side's turn at the interpreter.
    _between_s: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    _alternate: bool = False
    _cost: tuple[float, float] | None = None  # cost() as of the last observe()
    _excess_s: float = 0.0  # what prompt steps took beyond cost() on average: the spikes

    @property
    def fixed_s(self) -> float:
        """The median decode-only step: 0 until one was seen."""
        return statistics.median(self._decode_s) if self._decode_s else 0.0

    @property
    def token_s(self) -> float | None:
        """Seconds per prompt token beside decoding slots; None until a prompt step was seen."""
        cost = self.cost()
        return None if cost is None else cost[1]

    def cost(self) -> tuple[float, float] | None:
        """(fixed, per_token) of a step with prompt tokens; None before one was measured."""
        return self._cost

    def _fit(self) -> tuple[float, float] | None:
        if not self._prompt:
            return None
        # A step with prompt tokens does all a decode-only step does: its fixed part is at least
        # that; more where the Theil-Sen line says so (threads oversubscribed). A line fitted
        # from noisy steps alone often put it near 0, which made the chunks too small.
        fixed = max(self.fixed_s, _theil_sen_intercept(self._prompt))
        # Nor more than the cheapest step seen: under a load that grows while the prompt is
        # read, the line's slope comes out too flat and its fixed part too large.
        fixed = min(fixed, min(t for _, t in self._prompt))
        # At least half of a step is the prompt's, should the fixed part be overestimated.
        per_token = statistics.median(max(t - fixed, t / 2) / n for n, t in self._prompt)
        return fixed, per_token

    def predict(self, n_prompt: int) -> float:
        """Predicted seconds of a step carrying `n_prompt` prompt tokens (0: unknown)."""
        cost = self.cost()
        if cost is None:
            return 0.0
        fixed, per_token = cost
        return fixed + per_token * n_prompt if n_prompt else self.fixed_s

    def floor(self) -> int:
        """The smallest chunk that keeps the prompt within TTFT_SLACK of max_chunk chunks."""
        cost = self.cost()
        low = min(MIN_CHUNK, self.max_chunk)
        if cost is None:
            return low
        fixed, per_token = cost
        # Every extra step costs the prompt its fixed part, the time between two steps, and
        # the spikes the medians leave out: the prompt waits for every one of them. (Spikes
        # that come with the time a step takes rather than per step make this too large,
        # which only errs towards larger chunks.)
        fixed += statistics.median(self._between_s) if self._between_s else 0.0
        fixed += self._excess_s
        # (fixed / c + per_token) <= (1 + slack) * (fixed / max_chunk + per_token)
        room = TTFT_SLACK * per_token + (1 + TTFT_SLACK) * fixed / self.max_chunk
        need = fixed / room if room > 0 else self.max_chunk
        return max(low, min(self.max_chunk, _ceil(need)))

    def budget(self, n_decoding: int) -> int:
        """Prompt tokens the next step may carry beside `n_decoding` generated tokens."""
        if self.target_s <= 0:
            return self.max_chunk
        cost = self.cost()
        if cost is None:
            return min(SEED_CHUNK, self.max_chunk)
        fixed, per_token = cost
        left = self.target_s
        if n_decoding and self._last_end is not None:
            # The deadline runs from the decoding slots' last token, the end of the last step.
            waited = max(self.clock() - self._last_end, 0.0)
            self._between_s.append(waited)
            left -= min(waited, self.target_s)
        floor = self.floor()
        fit = int((left - fixed) / per_token) if per_token > 0 else self.max_chunk
        chunk = max(floor, min(self.max_chunk, fit))
        self._alternate = not self._alternate
        if not self._alternate or chunk >= self.max_chunk:
            return chunk
        smaller = max(floor, int(chunk * DITHER))
        if smaller < chunk or fixed + per_token * chunk <= left:
            return smaller
        # At the floor, and the target out of reach already: a larger chunk instead, so that the
        # fixed part can still be told from the cost per token (and the prompt gains).
        return min(self.max_chunk, _ceil(chunk * PAIR_RATIO))

    def observe(self, n_prompt: int, elapsed_s: float) -> None:
        """A step with `n_prompt` prompt tokens (and any generated ones) took `elapsed_s`."""
        self._last_end = self.clock()  # every decoding slot got its last token from this step
        if n_prompt <= 0:
            self._decode_s.append(elapsed_s)
        elif n_prompt >= MIN_CHUNK:
            # Not the few tokens of a chat turn or a prompt's tail: the fixed part is most of
            # such a step, and what it says per token is mostly noise.
            self._prompt.append((n_prompt, elapsed_s))
        self._cost = self._fit()
        if self._cost is not None and n_prompt >= MIN_CHUNK:
            fixed, per_token = self._cost
            excess = statistics.fmean(t - fixed - per_token * n for n, t in self._prompt)
            self._excess_s = max(excess, 0.0)


def _ceil(x: float) -> int:
    return -int(-x // 1)


def _theil_sen_intercept(steps: deque[tuple[int, float]]) -> float:
    """The fixed part of the median line through (chunk, seconds): 0 without enough pairs of
    clearly different chunk sizes, or where the line is no cost (slope <= 0). Slopes come from
    consecutive steps only: the load of a busy machine changes over seconds, and two steps
    taken a minute apart under different loads give a slope that means nothing."""
    points = list(steps)
    slopes = [
        (t2 - t1) / (n2 - n1)
        for (n1, t1), (n2, t2) in zip(points, points[1:], strict=False)
        if n2 >= n1 * PAIR_RATIO or n1 >= n2 * PAIR_RATIO
    ]
    if len(slopes) < MIN_PAIRS:
        return 0.0
    slope = statistics.median(slopes)
    if slope <= 0:
        return 0.0
    return max(statistics.median(t - slope * n for n, t in points), 0.0)
