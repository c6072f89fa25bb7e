"""Speculative decoding: proposers guess the next tokens, the target model verifies them.

A proposer guesses up to k tokens that follow a slot's history; the scheduler puts the slot's
pending token plus those k guesses (outputs on all) into the same batch as the other slots'
tokens and prompt chunks, keeps the longest prefix the target model agrees with, removes the KV
cells of the rest and carries the target's own token after it (the "bonus" token). Greedy output
is unchanged; sampled output keeps the target distribution (see `verify`).

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
   are valid only until the next decode. A proposer that needs outputs for every prompt token
   (an MTP head reading the target's hidden states) sets `wants_prompt_outputs`; otherwise only a
   prompt's last token has an output.
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

from collections.abc import Sequence
from typing import Protocol

# llama-server's `--spec-type` names (common/speculative.cpp); the ones this engine runs.
SPEC_TYPES = ("none", "ngram-simple", "draft-simple", "draft-mtp")


class Proposer(Protocol):
    """Guesses the next tokens of a slot (see the module docstring for the call order)."""

    name: str  # the spec_type it implements, e.g. "ngram-simple"
    wants_prompt_outputs: bool  # outputs on every prompt token, for on_target_outputs

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
