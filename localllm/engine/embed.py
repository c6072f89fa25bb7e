"""Embeddings: a second llama.cpp context on the loaded model, with embeddings on and pooling.

Why a second context rather than llama-server's per-batch `llama_set_embeddings` on the one
context: the generation context's slots hold their KV cells for prompt-cache reuse, and an
embedding batch needs sequences of its own whose cells are cleared after every batch. A context
of its own (created on the first embedding request, so chat-only use pays nothing) keeps the two
apart and lets embeddings run beside decoding, each from its own thread; llama.cpp's model is
read-only and may be shared by several contexts.

Pooling follows the GGUF's `<arch>.pooling_type` (BERT-style models declare MEAN or CLS, some
decoder embedders LAST); a model that declares none (a chat model) gets MEAN pooling, which is
what llama-server's `--pooling mean` gives. Vectors are L2-normalised, llama-server's default
(`embd_normalize = 2`). Rerankers (RANK pooling) output a score, not a vector, and are refused.

Several inputs are packed into one batch as separate sequences (at most `max_sequences`, at most
`max_tokens` tokens in all) and pooled per sequence by llama.cpp.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from localllm.errors import (
    ContextLengthExceededError,
    EmbeddingsNotSupportedError,
    LocalLLMError,
    ModelLoadError,
    RequestError,
)

# enum llama_pooling_type
POOLING_NONE = 0
POOLING_MEAN = 1
POOLING_CLS = 2
POOLING_LAST = 3
POOLING_RANK = 4
POOLING_NAMES = {POOLING_NONE: "none", POOLING_MEAN: "mean", POOLING_CLS: "cls", 3: "last"}


def pooling_for(declared: int | None) -> int:
    """The pooling the embedding context uses for a model that declares `declared` (or none)."""
    if declared == POOLING_RANK:
        raise EmbeddingsNotSupportedError(
            "this model is a reranker (pooling type rank): it scores pairs and has no embedding "
            "vector; use an embedding model for /v1/embeddings"
        )
    if declared in (None, POOLING_NONE):
        return POOLING_MEAN
    return declared


def l2_normalize(vector: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """llama.cpp's common_embd_normalize with p = 2: a zero vector stays zero."""
    norm = float(np.sqrt(np.sum(vector.astype(np.float64) ** 2)))
    scale = 1.0 / norm if norm > 0.0 else 0.0
    return (vector * np.float32(scale)).astype(np.float32)


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: tuple[tuple[float, ...], ...]  # one per input, in input order
    prompt_tokens: int  # tokens over all inputs


class Embedder:
    """The embedding context of one loaded model. Thread-safe: one batch at a time."""

    def __init__(
        self,
        llama: Any,
        model: Any,
        pooling: int,
        max_tokens: int,
        max_sequences: int,
        n_threads: int,
    ) -> None:
        self._llama = llama
        self.pooling = pooling
        self.max_tokens = max_tokens
        self.max_sequences = max_sequences
        self.n_embd: int = llama.llama_model_n_embd_out(model)
        self._lock = threading.Lock()
        cparams = llama.llama_context_default_params()
        cparams.embeddings = True
        cparams.pooling_type = pooling
        # A non-causal (BERT) model must see a whole input in one micro-batch.
        cparams.n_ctx = max_tokens
        cparams.n_batch = max_tokens
        cparams.n_ubatch = max_tokens
        cparams.n_seq_max = max_sequences
        cparams.kv_unified = True  # the packed sequences share the cells; cleared every batch
        # Flash attention off: with it, llama.cpp's F16 accumulation makes a vector depend on
        # what it was batched with (0.5% per component measured on Gemma 3); without it a
        # batched vector equals the one computed alone. An embedding batch's KV is small.
        cparams.flash_attn_type = 0
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        self.ctx: Any = llama.llama_init_from_model(model, cparams)
        if not self.ctx:
            raise ModelLoadError(
                f"llama.cpp could not create an embedding context of {max_tokens} tokens"
            )
        self.memory: Any = llama.llama_get_memory(self.ctx)
        self.batch: Any = llama.llama_batch_init(max_tokens, 0, 1)

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[npt.NDArray[np.float32]]:
        """One L2-normalised vector per token list, in order."""
        for index, tokens in enumerate(inputs):
            if not tokens:
                raise RequestError(f"input {index} is empty", param="input")
            if len(tokens) > self.max_tokens:
                raise ContextLengthExceededError(
                    f"input {index} is {len(tokens)} tokens; this model embeds at most "
                    f"{self.max_tokens} tokens per input: split the text",
                    param="input",
                )
        vectors: list[npt.NDArray[np.float32]] = []
        group: list[Sequence[int]] = []
        used = 0
        with self._lock:
            for tokens in inputs:
                if group and (
                    used + len(tokens) > self.max_tokens or len(group) == self.max_sequences
                ):
                    vectors += self._run(group)
                    group, used = [], 0
                group.append(tokens)
                used += len(tokens)
            if group:
                vectors += self._run(group)
        return vectors

    def _run(self, group: Sequence[Sequence[int]]) -> list[npt.NDArray[np.float32]]:
        llama, batch = self._llama, self.batch
        if self.memory:  # encoder-only models (BERT) have no KV cache
            llama.llama_memory_clear(self.memory, True)
        i = 0
        for seq_id, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                # Every token is an output in embedding mode, else llama.cpp overrides and warns.
                batch.logits[i] = 1
                i += 1
        batch.n_tokens = i
        status = llama.llama_decode(self.ctx, batch)
        if status != 0:
            raise LocalLLMError(f"llama_decode failed with status {status} on an embedding batch")
        out = []
        for seq_id in range(len(group)):
            pointer = llama.llama_get_embeddings_seq(self.ctx, seq_id)
            if not pointer:
                raise LocalLLMError(f"llama.cpp gave no pooled embedding for sequence {seq_id}")
            raw = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_embd,)
            )
            out.append(l2_normalize(raw.copy()))
        return out

    def close(self) -> None:
        if self.batch is not None:
            self._llama.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self._llama.llama_free(self.ctx)
            self.ctx = None
