"""MTP (nextn) drafting: the model's own multi-token-prediction block proposes the next tokens.

Qwen3.5/3.6, GLM-4.x and DeepSeek GGUFs may carry extra decoder blocks after the trunk
(`{arch}.nextn_predict_layers`). llama.cpp loads them with `llama_model_params.load_mtp` and runs
them in a second context of type `LLAMA_CONTEXT_TYPE_MTP` created against the same model. This
module drives that context the way llama.cpp's `common_speculative_impl_draft_mtp` does
(`common/speculative.cpp`), for one block (qwen35, qwen35moe, GLM-4.x / DeepSeek's deepseek2
and glm4moe; step35's chained heads are not driven):

- The target context outputs its last hidden state for every token of a batch ("nextn
  embeddings", unmasked). The MTP context's entry at position p pairs token x_p with the
  target's hidden state h_{p-1}; its own KV cache (one layer) holds those entries.
- Before a draft, the MTP context catches up on the slot's confirmed tokens it has not seen
  (the prompt included), then decodes the last sampled token with h of the position before it
  and proposes the arg-max token; each further guess feeds the MTP block's own hidden state
  back in (`llama_get_embeddings_nextn_ith` on the MTP context). The guesses' cells are removed
  again at once: only confirmed tokens stay in the MTP cache.

Hidden states are copied out of the target right after each decode (`on_target_outputs`). Once
FEED_AT_ONCE_ROWS tokens wait (a prompt chunk, or steps without drafting) they are fed to the MTP
context at once, their tokens read from the target's batch; fewer wait for the next draft, which
feeds only the guesses the target kept. A position the target did not decode in this process (a
prefix reused from an earlier request) has no hidden state, and the MTP block sees zeros there,
as llama.cpp's driver does for its first token: drafts get worse, output does not change (the
target verifies).

A hybrid target (Qwen3.5) rolls rejected guesses back through llama.cpp's recurrent snapshots
(`n_rs_seq`, set by the backend for draft-mtp); guesses are capped at that many.

The staging calls (`llama_set_embeddings_nextn`, `llama_get_embeddings_nextn[_ith]`) are in
llama.cpp's `src/llama-ext.h`, exported from libllama only under C++ mangled names and not bound
by llama-cpp-python; `nextn_api` binds them in one place and says clearly when a build lacks them.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from localllm.engine import logs
from localllm.engine.config import EngineConfig
from localllm.errors import ModelLoadError
from localllm.ggml import FLASH_ATTN_TYPE, ggml_type_id
from localllm.gguf_header import read_header

log = logging.getLogger(__name__)

# llama-ext.h, as exported by this llama.cpp (check with `nm -D libllama.so`).
_MANGLED = {
    "set_embeddings_nextn": "_Z26llama_set_embeddings_nextnP13llama_contextbb",
    "get_embeddings_nextn": "_Z26llama_get_embeddings_nextnP13llama_context",
    "get_embeddings_nextn_ith": "_Z30llama_get_embeddings_nextn_ithP13llama_contexti",
}
_FLOAT_P = ctypes.POINTER(ctypes.c_float)
# Once the target has decoded this many tokens the MTP context has not seen (a prompt chunk, or
# steps without drafting), they are fed to it at once, so their hidden states are not held until
# the next draft. Fewer wait for the draft, which then feeds only the guesses that were kept.
FEED_AT_ONCE_ROWS = 32
_NO_MTP = (
    "spec_type draft-mtp needs a model with MTP (nextn) layers, and this one has none (no "
    "`nextn_predict_layers` in the GGUF, or the file was converted without its MTP block): use "
    "spec_type ngram-simple or draft-simple instead"
)


def _llama() -> Any:
    import llama_cpp

    return llama_cpp


@dataclass(frozen=True)
class NextnApi:
    """llama.cpp's staging calls for nextn embeddings, bound by their mangled names."""

    set_embeddings_nextn: Callable[[Any, bool, bool], None]
    get_embeddings_nextn: Callable[[Any], Any]
    get_embeddings_nextn_ith: Callable[[Any, int], Any]


def nextn_api(lib: ctypes.CDLL | None = None) -> NextnApi:
    """Bind the nextn calls of `lib` (default: llama-cpp-python's libllama); a library without
    them (another llama.cpp build) raises ModelLoadError naming what is missing."""
    if lib is None:
        lib = _llama().llama_cpp._lib
    missing = [name for name in _MANGLED.values() if not hasattr(lib, name)]
    if missing:
        raise ModelLoadError(
            "spec_type draft-mtp needs llama.cpp's nextn embedding calls (src/llama-ext.h), which "
            f"this libllama does not export ({', '.join(missing)}): use the llama-cpp-python "
            "0.3.36 build localllm installs, or another spec_type"
        )
    set_fn = getattr(lib, _MANGLED["set_embeddings_nextn"])
    set_fn.argtypes = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool]
    set_fn.restype = None
    get_fn = getattr(lib, _MANGLED["get_embeddings_nextn"])
    get_fn.argtypes = [ctypes.c_void_p]
    get_fn.restype = _FLOAT_P
    ith_fn = getattr(lib, _MANGLED["get_embeddings_nextn_ith"])
    ith_fn.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    ith_fn.restype = _FLOAT_P
    return NextnApi(set_fn, get_fn, ith_fn)


def check_mtp_file(path: Path) -> None:
    """Refuse, before loading, a file whose MTP block llama.cpp could not run: none announced,
    or announced without its tensors (a trunk-only conversion, which llama.cpp loads for some
    architectures and then aborts on when the MTP context builds its graph)."""
    header = read_header(path)
    n_nextn = header.metadata.get(f"{header.architecture}.nextn_predict_layers", 0)
    if not isinstance(n_nextn, int) or n_nextn <= 0:
        raise ModelLoadError(_NO_MTP)
    # what llama.cpp's own auto-detection looks for (common_speculative_get_types_from_model)
    name = f"blk.{header.n_layer - 1}.nextn.eh_proj.weight"
    if not any(tensor.name == name for tensor in header.tensors):
        raise ModelLoadError(
            f"spec_type draft-mtp: {path.name} announces an MTP block (nextn_predict_layers "
            f"{n_nextn}) but does not carry its tensors ({name} is missing; a trunk-only "
            "conversion): use a GGUF converted with its MTP block, or spec_type ngram-simple "
            "or draft-simple"
        )


def n_nextn_layers(model: Any) -> int:
    """MTP blocks llama.cpp loaded for this model (0 without `load_mtp` or without blocks)."""
    return int(_llama().llama_model_n_layer_nextn(model))


@dataclass
class _Slot:
    tokens: list[int] = field(default_factory=list)  # the MTP cache's entries, positions 0..
    hidden: dict[int, npt.NDArray[np.float32]] = field(default_factory=dict)  # target h by pos
    seen: dict[int, int] = field(default_factory=dict)  # tokens the target decoded, not fed yet


@dataclass
class MtpStats:
    drafts: int = 0  # draft calls that proposed at least one token
    drafted_tokens: int = 0
    missing_hidden: int = 0  # catch-up entries fed zeros (no target hidden state held)
    fed_at_once: int = 0  # prompt tokens fed to the MTP context as soon as the target decoded


class MtpProposer:
    """Drafts with the model's MTP block (the engine's `Proposer` protocol, `draft-mtp`).

    `model` must have been loaded with `load_mtp`; `ctx_tgt` is the target context whose
    decodes `on_target_outputs` reports. The MTP context gets the target's size and slots."""

    name = "draft-mtp"
    wants_prompt_outputs = True

    def __init__(
        self,
        model: Any,
        ctx_tgt: Any,
        *,
        n_seq: int,
        n_batch: int = 512,
        n_threads: int = 1,
        type_k: int | None = None,
        type_v: int | None = None,
        flash_attn_type: int | None = None,
        api: NextnApi | None = None,
        batch_tokens: Callable[[int], int] | None = None,
        max_guesses: int | None = None,
    ) -> None:
        llama = _llama()
        self.api = api or nextn_api()
        n_layers = n_nextn_layers(model)
        if n_layers == 0:
            raise ModelLoadError(_NO_MTP)
        if n_layers > 1:
            log.info("the model has %d MTP blocks; drafting uses the first only", n_layers)
        self.model = model
        self.ctx_tgt = ctx_tgt
        self.batch_tokens = batch_tokens  # token at an index of the target's last batch
        # a hybrid target rolls back at most n_rs_seq rejected guesses (a request may ask more)
        self.max_guesses = max_guesses
        self.n_embd: int = llama.llama_model_n_embd_out(model)
        self.n_vocab: int = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
        cparams = llama.llama_context_default_params()
        cparams.ctx_type = llama.LLAMA_CONTEXT_TYPE_MTP
        cparams.ctx_other = ctx_tgt
        cparams.n_ctx = llama.llama_n_ctx(ctx_tgt)
        cparams.n_seq_max = n_seq
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_rs_seq = 0
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.kv_unified = False
        cparams.no_perf = True
        if type_k is not None:
            cparams.type_k = type_k
        if type_v is not None:
            cparams.type_v = type_v
        if flash_attn_type is not None:
            cparams.flash_attn_type = flash_attn_type
        ctx = llama.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelLoadError(
                "llama.cpp could not create the MTP draft context (see the log above): try a "
                "smaller n_ctx, or spec_type none"
            )
        self.ctx = ctx
        self.memory = llama.llama_get_memory(ctx)
        self.n_batch = n_batch
        self.batch = llama.llama_batch_ext_init(ctx)
        self.api.set_embeddings_nextn(ctx_tgt, True, False)  # every token of a target batch
        self.api.set_embeddings_nextn(ctx, True, True)  # only the MTP context's outputs
        self.slots = [_Slot() for _ in range(n_seq)]
        self.stats = MtpStats()
        self.load_log: list[str] = []  # the MTP context's llama.cpp lines (`load`)
        self._pos = (ctypes.c_int32 * 4)()

    @classmethod
    def load(cls, config: EngineConfig, target: Any) -> MtpProposer:
        """The MTP context beside a loaded `engine.backend.LlamaBackend` (its model loaded with
        `load_mtp`): the target's context size, slots, cache types and threads; one micro-batch
        per MTP decode, as the fitter counts its compute buffer."""
        with logs.capture() as lines:
            proposer = cls(
                target.model,
                target.ctx,
                n_seq=config.n_parallel,
                n_batch=min(config.n_ubatch, config.n_batch),
                n_threads=config.n_threads or os.cpu_count() or 1,
                type_k=ggml_type_id(config.type_k),
                type_v=ggml_type_id(config.type_v),
                flash_attn_type=FLASH_ATTN_TYPE[config.flash_attn],
                batch_tokens=lambda index: int(target.batch.token[index]),
                max_guesses=target.n_rs_seq if target.recurrent else None,
            )
        proposer.load_log = lines
        return proposer

    # -- the Proposer protocol ------------------------------------------------------------

    def on_target_outputs(
        self, seq_id: int, positions: Sequence[int], batch_indices: Sequence[int]
    ) -> None:
        if not positions:
            return
        base = self.api.get_embeddings_nextn(self.ctx_tgt)
        if not base:
            return
        rows = np.ctypeslib.as_array(base, shape=(max(batch_indices) + 1, self.n_embd))
        slot = self.slots[seq_id]
        for pos, index in zip(positions, batch_indices, strict=True):
            slot.hidden[pos] = rows[index].copy()
        if self.batch_tokens is None:
            return
        for pos, index in zip(positions, batch_indices, strict=True):
            token = self.batch_tokens(index)
            if pos < len(slot.tokens) and slot.tokens[pos] != token:
                self._forget(seq_id, slot, pos)  # another text from here (a new request)
            slot.seen[pos] = token
        if len(slot.seen) >= FEED_AT_ONCE_ROWS:
            self._feed(seq_id, slot)

    def draft(self, seq_id: int, history: Sequence[int], n_max: int) -> list[int]:
        if self.max_guesses is not None:
            n_max = min(n_max, self.max_guesses)
        if n_max <= 0 or not history:
            return []
        slot = self.slots[seq_id]
        pos0 = len(history) - 1
        self._keep_common_prefix(seq_id, slot, history[:pos0])
        # catch up on the confirmed tokens, then the sampled one, in chunks of n_batch
        start = len(slot.tokens)
        zeros = np.zeros(self.n_embd, dtype=np.float32)
        for chunk in range(start, pos0 + 1, self.n_batch):
            end = min(pos0 + 1, chunk + self.n_batch)
            entries = []
            for pos in range(chunk, end):
                h = slot.hidden.get(pos - 1)
                if h is None:
                    if pos > 0:
                        self.stats.missing_hidden += 1
                    h = zeros
                entries.append((history[pos], pos, h, pos == pos0))
            if not self._process(seq_id, entries):
                return []
            slot.tokens = list(history[:end])  # what the MTP cache now holds
        slot.seen.clear()
        for pos in [p for p in slot.hidden if p < pos0]:
            del slot.hidden[pos]
        guesses: list[int] = []
        index = len(entries) - 1
        while True:
            token = self._argmax(index)
            guesses.append(token)
            if len(guesses) >= n_max:
                break
            h_row = self.api.get_embeddings_nextn_ith(self.ctx, index)
            if not h_row:
                break
            h = np.ctypeslib.as_array(h_row, shape=(self.n_embd,)).copy()
            if not self._process(seq_id, [(token, pos0 + len(guesses), h, True)]):
                break
            index = 0
        # only confirmed tokens stay in the MTP cache
        _llama().llama_memory_seq_rm(self.memory, seq_id, pos0 + 1, -1)
        self.stats.drafts += 1
        self.stats.drafted_tokens += len(guesses)
        return guesses

    def on_verified(self, seq_id: int, n_keep: int) -> None:
        slot = self.slots[seq_id]
        for pos in [p for p in slot.hidden if p >= n_keep]:
            del slot.hidden[pos]
        for pos in [p for p in slot.seen if p >= n_keep]:
            del slot.seen[pos]
        if len(slot.tokens) > n_keep:
            self._forget(seq_id, slot, n_keep)

    def release(self, seq_id: int) -> None:
        # The MTP cache stays, like the target's cells: the next request's draft keeps the
        # common prefix. Hidden states past the cache's end are not needed by anyone.
        slot = self.slots[seq_id]
        keep = len(slot.tokens) - 1
        for pos in [p for p in slot.hidden if p != keep]:
            del slot.hidden[pos]
        slot.seen.clear()

    def close(self) -> None:
        llama = _llama()
        if self.batch is not None:
            llama.llama_batch_ext_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.api.set_embeddings_nextn(self.ctx_tgt, False, False)
            llama.llama_free(self.ctx)
            self.ctx = None

    # -- internals ------------------------------------------------------------------------

    def _feed(self, seq_id: int, slot: _Slot) -> None:
        """Feed the tokens the target decoded since the MTP cache's end (a prompt's chunks) to
        the MTP context now, so that their hidden states are not held until the next draft."""
        start = end = len(slot.tokens)
        while end in slot.seen and (end == 0 or end - 1 in slot.hidden):
            end += 1
        zeros = np.zeros(self.n_embd, dtype=np.float32)
        for chunk in range(start, end, self.n_batch):
            stop = min(end, chunk + self.n_batch)
            entries = [
                (slot.seen[p], p, slot.hidden[p - 1] if p > 0 else zeros, False)
                for p in range(chunk, stop)
            ]
            if not self._process(seq_id, entries):
                break
            slot.tokens.extend(slot.seen[p] for p in range(chunk, stop))
            self.stats.fed_at_once += stop - chunk
        done = len(slot.tokens)
        for pos in [p for p in slot.seen if p < done]:
            del slot.seen[pos]
        for pos in [p for p in slot.hidden if p < done - 1]:
            del slot.hidden[pos]

    def _keep_common_prefix(self, seq_id: int, slot: _Slot, confirmed: Sequence[int]) -> None:
        common = 0
        for held, wanted in zip(slot.tokens, confirmed, strict=False):
            if held != wanted:
                break
            common += 1
        if common < len(slot.tokens):
            self._forget(seq_id, slot, common)

    def _forget(self, seq_id: int, slot: _Slot, keep: int) -> None:
        if not _llama().llama_memory_seq_rm(self.memory, seq_id, keep, -1):
            _llama().llama_memory_seq_rm(self.memory, seq_id, -1, -1)
            keep = 0
        del slot.tokens[keep:]

    def _process(
        self, seq_id: int, entries: Sequence[tuple[int, int, npt.NDArray[np.float32], bool]]
    ) -> bool:
        """One MTP decode of (token, position, target hidden state of the position before,
        output) entries; False (logged) when llama.cpp refuses it."""
        llama = _llama()
        batch = self.batch
        llama.llama_batch_ext_clear(batch)
        for token, pos, hidden, output in entries:
            index = llama.llama_batch_ext_add_token(batch, seq_id, token)
            if index < 0:
                log.warning("MTP batch refused token %d (error %d)", token, index)
                return False
            self._pos[0] = pos
            llama.llama_batch_ext_set_pos(batch, index, self._pos)
            embd = llama.llama_embd(hidden.ctypes.data_as(_FLOAT_P), 1, self.n_embd)
            if not llama.llama_batch_ext_set_embd_token(batch, index, embd):
                log.warning("MTP batch refused the hidden state of position %d", pos)
                return False
            llama.llama_batch_ext_set_output_logits(batch, index, output)
        status = llama.llama_process(self.ctx, llama.LLAMA_PROCESS_TYPE_DECODE, batch)
        if status != 0:
            log.warning("MTP decode failed (status %d); no draft this step", status)
            return False
        return True

    def _argmax(self, index: int) -> int:
        pointer = _llama().llama_get_logits_ith(self.ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        return int(np.argmax(logits))


class _Guesser(Protocol):
    """What `speculative_greedy` calls of a proposer (`engine.speculative.Proposer`)."""

    def draft(self, seq_id: int, history: Sequence[int], n_max: int) -> list[int]: ...

    def on_target_outputs(
        self, seq_id: int, positions: Sequence[int], batch_indices: Sequence[int]
    ) -> None: ...

    def on_verified(self, seq_id: int, n_keep: int) -> None: ...


@dataclass
class GreedyRun:
    tokens: list[int]  # the generated tokens (the prompt not included)
    steps: int = 0  # target decodes after the prompt
    drafted: int = 0  # guesses the target checked
    accepted: int = 0  # guesses it agreed with


def speculative_greedy(
    ctx: Any,
    proposer: _Guesser | None,
    prompt: Sequence[int],
    n_predict: int,
    n_max: int = 3,
    seq_id: int = 0,
    n_batch: int = 512,
) -> GreedyRun:
    """Generate greedily on one sequence of `ctx`, with `proposer` guessing (None: one token a
    step). The target checks each step's guesses in the same decode as the pending token and
    keeps the longest prefix it agrees with, so the tokens are those of plain greedy decoding.

    The engine's scheduler does this for many slots at once; this loop is the reference it is
    tested against. A recurrent or hybrid target needs `n_rs_seq >= n_max` on its context (the
    rejected guesses are rolled back with `llama_memory_seq_rm`)."""
    llama = _llama()
    model = llama.llama_get_model(ctx)
    vocab = llama.llama_model_get_vocab(model)
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    memory = llama.llama_get_memory(ctx)
    batch = llama.llama_batch_init(max(n_batch, n_max + 1), 0, 1)

    def decode(tokens: Sequence[int], pos0: int, all_logits: bool) -> list[int]:
        """Decode tokens at pos0..; the arg-max token of every output."""
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = all_logits or i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        status = llama.llama_decode(ctx, batch)
        if status != 0:
            raise ModelLoadError(f"llama_decode failed with status {status}")
        if proposer is not None:
            proposer.on_target_outputs(
                seq_id, range(pos0, pos0 + len(tokens)), range(len(tokens)))
        outputs = range(len(tokens)) if all_logits else [len(tokens) - 1]
        return [
            int(np.argmax(np.ctypeslib.as_array(
                llama.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))
            for i in outputs
        ]

    try:
        history = list(prompt)
        token = 0
        for start in range(0, len(history), n_batch):
            token = decode(history[start : start + n_batch], start, False)[-1]
        run = GreedyRun(tokens=[token])
        history.append(token)
        while len(run.tokens) < n_predict and not llama.llama_vocab_is_eog(vocab, token):
            room = n_predict - len(run.tokens)
            guesses = proposer.draft(seq_id, history, min(n_max, room)) if proposer else []
            pos0 = len(history) - 1
            targets = decode([history[-1], *guesses], pos0, True)
            run.steps += 1
            accepted = 0
            while accepted < len(guesses) and guesses[accepted] == targets[accepted]:
                accepted += 1
            run.drafted += len(guesses)
            run.accepted += accepted
            n_keep = len(history) + accepted
            if accepted < len(guesses):
                llama.llama_memory_seq_rm(memory, seq_id, n_keep, -1)
            if proposer is not None:
                proposer.on_verified(seq_id, n_keep)
            new = [*guesses[:accepted], targets[accepted]]
            for token in new:
                if len(run.tokens) >= n_predict:
                    break
                run.tokens.append(token)
                history.append(token)
                if llama.llama_vocab_is_eog(vocab, token):
                    break
        return run
    finally:
        llama.llama_batch_free(batch)
