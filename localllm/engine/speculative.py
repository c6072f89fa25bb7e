"""Speculative decoding: proposers guess the next tokens, the target model verifies them.

A proposer guesses up to k tokens that follow a slot's history; the scheduler puts the slot's
pending token plus those k guesses (outputs on all) into the same batch as the other slots'
tokens and prompt chunks, keeps the longest prefix the target model agrees with, removes the KV
cells of the rest and carries the target's own token after it (the "bonus" token). Greedy output
is unchanged; sampled output keeps the target distribution:

Sampling. Every proposer here guesses deterministically (n-gram copies, a draft model's argmax).
For a deterministic proposal d, rejection sampling accepts d with probability p(d) (p: the
target's sampling distribution after temperature, top-k/top-p/min-p, penalties and logit bias)
and otherwise samples from p with d removed and renormalized. Drawing t from p with the request's
own sampler chain and accepting d exactly when t == d is the same distribution: P(d) = p(d), and
for x != d, P(x) = (1 - p(d)) * p(x) / (1 - p(d)) = p(x). So the scheduler samples each verified
position with the request's sampler (as llama.cpp's `common_sampler_sample_and_accept_n` does),
keeps guesses while they equal the sample, and the first differing sample is the correction;
after k accepted guesses the sample at the last position is the bonus token. The sampler chain
sees exactly the emitted tokens (penalties stay right), and greedy output is token-identical.
Requests with a grammar are not speculated (their samples run on a worker thread, one at a
time, and a grammar state cannot be rolled back here); they decode one token a step.

The `Proposer` protocol is what the scheduler (`localllm.engine.core`) calls, per slot
(`seq_id` is the slot's llama.cpp sequence id, 0 .. n_parallel-1). Call order on the scheduler
thread, for one slot:

1. `draft(seq_id, history, n_max)` before a step that decodes the slot's pending token;
   `history` is every token of the slot in order (prompt, generated tokens, and last the sampled
   token that is not decoded yet). Return at most n_max guesses for the tokens after it (an empty
   list: no speculation this step).
2. The target decodes one batch. Right after it, `on_target_outputs(seq_id, positions,
   batch_indices)` for every slot that had tokens in that batch, prompt chunks included:
   `positions[i]` is the position of a token of this slot whose outputs (logits, and the
   embeddings where the target context makes them) are at `batch_indices[i]` of that batch. They
   are valid only until the next decode. A proposer that reads what the target context makes
   for every token of a batch (an MTP head reading the target's hidden states, which llama.cpp
   outputs for every token once asked) sets `wants_prompt_outputs`: every prompt token is then
   reported, though only a prompt's last token has logits.
3. `on_verified(seq_id, n_keep)` once the verification is decided: the slot's tokens at positions
   0 .. n_keep-1 are confirmed (they are in the target's KV cells); anything the proposer holds
   beyond them (its own KV cells, states) is stale.
4. `release(seq_id)` when the slot's request ends (finished, cancelled, failed). The slot may keep
   its target KV cells for prefix reuse; a proposer may too, but must then check the next
   history against what it holds (as `DraftModelProposer` does).
5. `close()` once, when the engine closes.

All calls come from the scheduler thread, so a proposer needs no locks of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from localllm.engine.backend import BatchItem, LlamaBackend, _llama
from localllm.engine.config import EngineConfig
from localllm.engine.text import common_prefix
from localllm.errors import ModelLoadError

log = logging.getLogger(__name__)

# llama-server's `--spec-type` names (common/speculative.cpp); the ones this engine runs.
SPEC_TYPES = ("none", "ngram-simple", "draft-simple", "draft-mtp")


class Proposer(Protocol):
    """Guesses the next tokens of a slot (see the module docstring for the call order)."""

    name: str  # the spec_type it implements, e.g. "ngram-simple"
    wants_prompt_outputs: bool  # every prompt token reported to on_target_outputs

    def draft(self, seq_id: int, history: Sequence[int], n_max: int) -> list[int]:
        """Up to n_max guesses for the tokens after `history` (prompt + generated tokens,
        ending with the sampled token not decoded yet)."""
        ...

    def on_target_outputs(
        self, seq_id: int, positions: Sequence[int], batch_indices: Sequence[int]
    ) -> None:
        """The target's last decode holds outputs of this slot's tokens at these positions at
        these batch indices (valid until the next decode)."""
        ...

    def on_verified(self, seq_id: int, n_keep: int) -> None:
        """The slot's first n_keep tokens are confirmed; drop anything held past them."""
        ...

    def release(self, seq_id: int) -> None:
        """The slot's request ended."""
        ...

    def close(self) -> None:
        """Free what the proposer holds (a draft model's context); called once."""
        ...


def ngram_simple_draft(history: Sequence[int], size_n: int, n_max: int) -> list[int]:
    """llama.cpp's `ngram-simple` (common/ngram-map.cpp, `common_ngram_simple_draft`): find the
    latest earlier occurrence of the history's last `size_n` tokens and propose what followed it
    there, at most n_max tokens and at least size_n of them (fewer: no guess). Deterministic."""
    n = len(history)
    if size_n < 1 or n_max < 1 or n <= 2 * size_n:
        return []
    tokens = np.asarray(history, dtype=np.int64)
    pattern = tokens[n - size_n :]
    # Starts j in [1, n - size_n - 1] (llama.cpp skips 0, its "no match"), whole windows
    # compared at once: n x size_n comparisons in numpy, not a Python loop per position.
    last = n - size_n - 1
    match = np.ones(last, dtype=bool)
    for k in range(size_n):
        match &= tokens[1 + k : last + 1 + k] == pattern[k]
    found = np.flatnonzero(match)
    if not len(found):
        return []
    j = int(found[-1]) + 1
    take = min(n_max, n - (j + size_n))
    if take < min(size_n, n_max):
        return []
    return [int(t) for t in tokens[j + size_n : j + size_n + take]]


class NgramProposer:
    """`ngram-simple`: guesses copied from the slot's own history (no memory, no model)."""

    name = "ngram-simple"
    wants_prompt_outputs = False

    def __init__(self, size_n: int = 12) -> None:
        self.size_n = size_n

    def draft(self, seq_id: int, history: Sequence[int], n_max: int) -> list[int]:
        return ngram_simple_draft(history, self.size_n, n_max)

    def on_target_outputs(
        self, seq_id: int, positions: Sequence[int], batch_indices: Sequence[int]
    ) -> None:
        pass

    def on_verified(self, seq_id: int, n_keep: int) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass

    def close(self) -> None:
        pass


# llama.cpp's draft-model vocabulary checks (common/speculative.cpp, SPEC_VOCAB_*).
SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128
SPEC_VOCAB_CHECK_START_TOKEN_ID = 5
CATCH_UP_TOKENS = 256  # draft-model prompt tokens decoded per scheduler step, at most


def vocab_mismatch(target: Any, draft: Any) -> str | None:
    """Why a draft model's vocabulary cannot stand in for the target's (None: it can), checked
    as llama.cpp does: same tokenizer type, BOS/EOS handling and ids, sizes within 128, the same
    text for every token id from 5 on."""
    llama = _llama()
    vt, vd = target.vocab, draft.vocab
    if llama.llama_vocab_type(vt) != llama.llama_vocab_type(vd):
        return "the tokenizer types differ"
    if llama.llama_vocab_get_add_bos(vt) != llama.llama_vocab_get_add_bos(vd) or (
        llama.llama_vocab_get_add_eos(vt) != llama.llama_vocab_get_add_eos(vd)
    ):
        return "they add BOS/EOS tokens differently"
    if llama.llama_vocab_bos(vt) != llama.llama_vocab_bos(vd) or (
        llama.llama_vocab_eos(vt) != llama.llama_vocab_eos(vd)
    ):
        return "their BOS/EOS token ids differ"
    n_t, n_d = llama.llama_vocab_n_tokens(vt), llama.llama_vocab_n_tokens(vd)
    if abs(n_t - n_d) > SPEC_VOCAB_MAX_SIZE_DIFFERENCE:
        return f"their vocabularies have {n_t} and {n_d} tokens"
    for token in range(SPEC_VOCAB_CHECK_START_TOKEN_ID, min(n_t, n_d)):
        if llama.llama_vocab_get_text(vt, token) != llama.llama_vocab_get_text(vd, token):
            return f"token {token} differs"
    return None


class DraftModelProposer:
    """`draft-simple`: a small model of the same tokenizer guesses greedily.

    Its own llama.cpp context has one sequence per slot (same slot size as the target). Before
    guessing it catches up on the slot's history, reusing the prefix its cells already hold
    (a new request in the slot, and guesses the target rejected, are cut off), CATCH_UP_TOKENS
    a step, then decodes one token at a time for up to n_max guesses. Greedy guesses are
    deterministic proposals, which is what the scheduler's verification assumes (see the
    module docstring).
    """

    name = "draft-simple"
    wants_prompt_outputs = False

    def __init__(self, backend: LlamaBackend, n_parallel: int) -> None:
        self.backend = backend
        self._held: list[list[int]] = [[] for _ in range(n_parallel)]
        self.catch_up = min(CATCH_UP_TOKENS, backend.config.n_batch)
        self.n_ctx_slot: int = backend.config.n_ctx_slot

    @classmethod
    def load(cls, config: EngineConfig, target: Any) -> DraftModelProposer:
        """Load `config.spec_draft_model` beside the target; ModelLoadError if it cannot guess
        for it (another vocabulary, recurrent memory that cannot be cut back)."""
        path = config.spec_draft_model
        if path is None:
            raise ModelLoadError(
                "spec_type draft-simple needs a draft model: set spec_draft_model "
                "(--spec-draft-model FILE), a small GGUF with the same tokenizer"
            )
        draft_config = replace(
            config,
            model_path=Path(path),
            spec_type="none",
            spec_draft_model=None,
            rpc_servers=(),
            tensor_split=None,
            tensor_overrides=(),
            ctx_checkpoints=0,
        )
        backend = LlamaBackend(draft_config)
        try:
            why = vocab_mismatch(target, backend)
            if why is not None:
                raise ModelLoadError(
                    f"the draft model {Path(path).name} cannot guess for "
                    f"{config.model_path.name}: {why}; choose a draft model of the same family "
                    "(same tokenizer)"
                )
            if backend.recurrent:
                raise ModelLoadError(
                    f"the draft model {Path(path).name} has recurrent memory, which cannot be "
                    "cut back after a rejected guess; choose a transformer draft model"
                )
        except BaseException:
            backend.close()
            raise
        log.info("draft model %s loaded in %.1f s", Path(path).name, backend.load_seconds)
        return cls(backend, config.n_parallel)

    @property
    def load_log(self) -> list[str]:
        return self.backend.load_log

    def draft(self, seq_id: int, history: Sequence[int], n_max: int) -> list[int]:
        held = self._held[seq_id]
        keep = min(common_prefix(held, history), len(history) - 1)
        if keep < len(held):
            if not self.backend.seq_rm(seq_id, keep, -1):
                self.backend.seq_rm(seq_id, -1, -1)
                keep = 0
            del held[keep:]
        # Room in the slot: the guesses' positions stay inside the draft's slot too.
        n_max = min(n_max, self.n_ctx_slot - len(history))
        if n_max < 1:
            return []
        # Catch up at most CATCH_UP_TOKENS a step, so that a long new prompt delays the step
        # (every slot waits for it) by one chunk at a time; no guesses until caught up.
        chunk = list(history[keep : keep + self.catch_up])
        last = keep + len(chunk) == len(history)
        items = [
            BatchItem(t, keep + i, seq_id, last and i == len(chunk) - 1)
            for i, t in enumerate(chunk)
        ]
        if self.backend.decode(items) != 0:
            self._reset(seq_id)
            return []
        held.extend(chunk)
        if not last:
            return []
        index = len(chunk) - 1  # the last decode's one output
        guesses: list[int] = []
        while True:
            token = int(np.argmax(self.backend.logits_row(index)))
            guesses.append(token)
            if len(guesses) >= n_max or self.backend.is_eog(token):
                return guesses
            if self.backend.decode([BatchItem(token, len(held), seq_id, True)]) != 0:
                self._reset(seq_id)
                return guesses
            held.append(token)
            index = 0

    def _reset(self, seq_id: int) -> None:
        self.backend.seq_rm(seq_id, -1, -1)
        self._held[seq_id].clear()

    def on_target_outputs(
        self, seq_id: int, positions: Sequence[int], batch_indices: Sequence[int]
    ) -> None:
        pass

    def on_verified(self, seq_id: int, n_keep: int) -> None:
        held = self._held[seq_id]
        if n_keep < len(held):
            self.backend.seq_rm(seq_id, n_keep, -1)
            del held[n_keep:]

    def release(self, seq_id: int) -> None:
        pass  # the cells stay for the slot's next request (prefix reuse, as the target's)

    def close(self) -> None:
        self.backend.close()


def make_proposer(config: EngineConfig, target: Any) -> Proposer | None:
    """The proposer `config.spec_type` names, or None ("none", or a model whose memory cannot
    be cut back after a rejected guess: recurrent and hybrid models, logged; draft-mtp runs on
    a hybrid model whose context keeps n_rs_seq recurrent snapshots, as the backend makes it)."""
    kind = config.spec_type
    if kind == "none":
        return None
    if kind not in SPEC_TYPES:
        raise ModelLoadError(
            f"spec_type {kind!r} is not one of {', '.join(SPEC_TYPES)}; pick one of those"
        )
    recurrent = getattr(target, "recurrent", False)
    if kind == "draft-mtp" and (
        not recurrent or getattr(target, "n_rs_seq", 0) >= config.spec_draft_n_max
    ):  # a hybrid target (Qwen3.5) rolls rejected guesses back through its n_rs_seq snapshots
        from localllm.engine.mtp import MtpProposer

        return MtpProposer.load(config, target)
    if recurrent:
        log.warning(
            "speculative decoding (%s) is off for %s: its recurrent memory cannot be cut back "
            "after a rejected guess",
            kind,
            config.model_path.name,
        )
        return None
    if kind == "ngram-simple":
        return NgramProposer(config.spec_ngram_simple_size_n)
    if kind == "draft-simple":
        return DraftModelProposer.load(config, target)
    raise ModelLoadError(
        f"spec_type {kind} is not available in this build; use ngram-simple or draft-simple"
    )
