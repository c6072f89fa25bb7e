"""Context checkpoints: prompt reuse for memory that cannot be cut back to a shorter prefix.

A slot keeps the KV cells of its last conversation, and the next turn decodes only what follows
the common prefix (see `core`). Cutting a sequence back to that prefix (`llama_memory_seq_rm`)
works for full-attention caches only:

- a recurrent or hybrid model (Mamba, Gated DeltaNet: qwen35, nemotron_h, ...) keeps one state per
  sequence, the state after its last token; it cannot be rewound, and the cut fails;
- a sliding-window layer with the small cache (`swa_full` off, llama-server's default) overwrites
  cells that slid out of the window, so after a cut the window before the cut point is gone
  (`llama_memory_seq_pos_min` says how far back the sequence still reaches).

Like llama-server's context checkpoints, the engine copies that part of a sequence's memory
(llama.cpp's PARTIAL_ONLY state: the sliding-window cells, the recurrent state) to host memory at
a few positions while it decodes a prompt, and restores the latest one at or before the common
prefix of the next request; only the full-attention cells are then cut. The positions: a few
tokens before the prompt's end (the next turn of a chat repeats the whole prompt; templates may
rewrite its last tokens, e.g. the generation prompt), one micro-batch before that, and every
`checkpoint_every_n_tokens` of a long prompt (a pasted document followed by different questions).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

# Checkpoints this many tokens before the end of a prompt (llama-server: 4 and 4 + n_ubatch).
END_OFFSET = 4


class PartialMemory(Protocol):
    """What checkpoints need from the backend (LlamaBackend)."""

    n_swa: int
    recurrent: bool

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool: ...
    def seq_pos_min(self, seq_id: int) -> int: ...
    def partial_state(self, seq_id: int) -> bytes: ...
    def restore_partial_state(self, seq_id: int, data: bytes) -> bool: ...


@dataclass(frozen=True)
class Checkpoint:
    n_tokens: int  # the state after this many tokens of the slot's cached sequence
    data: bytes


@dataclass
class SlotCheckpoints:
    """One slot's checkpoints, oldest first; at most `limit`, the oldest dropped first."""

    limit: int
    items: list[Checkpoint] = field(default_factory=list)

    @property
    def n_bytes(self) -> int:
        return sum(len(c.data) for c in self.items)

    def add(self, checkpoint: Checkpoint) -> None:
        self.items = [c for c in self.items if c.n_tokens != checkpoint.n_tokens]
        self.items.append(checkpoint)
        self.items.sort(key=lambda c: c.n_tokens)
        while len(self.items) > self.limit:
            # Keep the newest: the next turn of a chat restores one near the end.
            self.items.pop(0)

    def latest_at_or_before(self, n_tokens: int) -> Checkpoint | None:
        found = [c for c in self.items if 0 < c.n_tokens <= n_tokens]
        return found[-1] if found else None

    def drop_after(self, n_tokens: int) -> None:
        """Forget checkpoints past the part of the sequence that is kept (another continuation
        replaces what followed it)."""
        self.items = [c for c in self.items if c.n_tokens <= n_tokens]

    def clear(self) -> None:
        self.items = []


def needs_checkpoints(backend: PartialMemory, swa_full: bool) -> bool:
    """Whether this model's memory loses its prefix when cut: recurrent state, or sliding-window
    layers with the small cache."""
    return backend.recurrent or (backend.n_swa > 0 and not swa_full)


def checkpoint_positions(
    n_prompt: int, n_done: int, n_ubatch: int, every_n_tokens: int
) -> tuple[int, ...]:
    """Where to checkpoint while decoding a prompt of n_prompt tokens of which n_done are in the
    cache already: positions p (the state after p tokens) with n_done < p < n_prompt."""
    wanted: set[int] = {n_prompt - END_OFFSET, n_prompt - END_OFFSET - n_ubatch}
    if every_n_tokens > 0:
        wanted.update(range(every_n_tokens, n_prompt, every_n_tokens))
    return tuple(sorted(p for p in wanted if n_done < p < n_prompt))


def next_stop(positions: Iterable[int], start: int) -> int | None:
    """The first checkpoint position after `start`: a prompt chunk must end there."""
    return next((p for p in positions if p > start), None)


def cut_to_prefix(
    backend: PartialMemory,
    seq_id: int,
    n_cached: int,
    n_keep: int,
    checkpoints: SlotCheckpoints | None,
) -> tuple[int, bool]:
    """Cut a sequence holding n_cached tokens back to at most n_keep of them; returns how many it
    keeps and whether a checkpoint was restored. Without checkpoints (a full-attention cache) the
    cut is exact; with them it lands on the latest checkpoint at or before n_keep, else 0."""
    if n_keep >= n_cached:
        return n_cached, False
    if checkpoints is None:
        if backend.seq_rm(seq_id, n_keep, -1):
            return n_keep, False
    elif _can_cut(backend, seq_id, n_keep) and backend.seq_rm(seq_id, n_keep, -1):
        checkpoints.drop_after(n_keep)
        return n_keep, False
    else:
        checkpoint = checkpoints.latest_at_or_before(n_keep)
        if (
            checkpoint is not None
            and backend.restore_partial_state(seq_id, checkpoint.data)
            and backend.seq_rm(seq_id, checkpoint.n_tokens, -1)
        ):
            checkpoints.drop_after(checkpoint.n_tokens)
            return checkpoint.n_tokens, True
        checkpoints.clear()
    backend.seq_rm(seq_id, -1, -1)
    return 0, False


def _can_cut(backend: PartialMemory, seq_id: int, n_keep: int) -> bool:
    """Whether the live memory still holds what position n_keep attends to."""
    if backend.recurrent:
        return False  # its state is that after the last token, past n_keep
    # The window of the token at n_keep reaches back n_swa positions; the cells before the
    # ones the cache still holds were overwritten.
    return backend.seq_pos_min(seq_id) <= max(0, n_keep - backend.n_swa)
