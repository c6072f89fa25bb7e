"""The only module that calls llama.cpp: a model, one context with n_parallel sequences, a batch.

Everything here runs on the scheduler thread except the vocabulary calls (tokenize, detokenize,
token pieces), which only read the vocabulary and are safe from any thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from localllm.engine import build, logs, mtp, rpc
from localllm.engine.config import EngineConfig
from localllm.engine.embed import POOLING_NONE, Embedder, pooling_for
from localllm.engine.media import MediaContext
from localllm.engine.types import SamplingParams
from localllm.errors import ModelLoadError, RequestError
from localllm.ggml import FLASH_ATTN_TYPE, LOAD_MODE_NONE, ggml_type_id

log = logging.getLogger(__name__)


def _llama() -> Any:
    # Imported lazily: importing llama_cpp loads the shared library; the HTTP layer and its tests
    # must not need it.
    import llama_cpp

    return llama_cpp


@dataclass(frozen=True)
class BatchItem:
    token: int
    pos: int
    seq_id: int
    logits: bool


class _TensorOverride(ctypes.Structure):
    # struct llama_model_tensor_buft_override { const char * pattern;
    #                                           ggml_backend_buffer_type_t buft; }
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    shifted = logits - np.float32(logits.max())
    return shifted - np.float32(np.log(np.exp(shifted).sum()))


class LlamaBackend:
    """A loaded model and its context. Not thread-safe beyond the vocabulary calls."""

    def __init__(self, config: EngineConfig) -> None:
        llama = _llama()
        self.config = config
        self._keepalive: list[Any] = []  # ctypes buffers the model params point into
        self.rpc: rpc.RpcAttachment | None = None
        self.model: Any = None
        self.ctx: Any = None
        self.batch: Any = None
        self._embedder: Embedder | None = None
        self.media: MediaContext | None = None  # the vision projector, when the config has one
        self.media_error = ""  # why a projector found beside the model did not load
        self._embedder_lock = threading.Lock()
        with logs.capture() as load_log:
            started = time.perf_counter()
            try:
                self._load(llama)
            except BaseException:
                self.close()
                raise
            self.load_seconds = time.perf_counter() - started
        self.load_log: list[str] = load_log
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab: int = llama.llama_vocab_n_tokens(self.vocab)
        self.architecture = self.meta("general.architecture") or "unknown"
        template = llama.llama_model_chat_template(self.model, None)
        self.chat_template: str | None = template.decode("utf-8", "replace") if template else None
        self.bos_id: int = llama.llama_vocab_bos(self.vocab)
        self.eos_id: int = llama.llama_vocab_eos(self.vocab)
        self.add_bos: bool = bool(llama.llama_vocab_get_add_bos(self.vocab))
        self._pieces: dict[int, bytes] = {}
        self._control: npt.NDArray[np.bool_] | None = None
        self.n_ctx_train: int = llama.llama_model_n_ctx_train(self.model)
        declared = self.meta(f"{self.architecture}.pooling_type")
        self.declared_pooling: int | None = int(declared) if declared else None

    @property
    def embedding_only(self) -> bool:
        """The GGUF declares a pooling layer: an embedding model (BERT-style), not a chat model."""
        return self.declared_pooling not in (None, POOLING_NONE)

    def embedder(self) -> Embedder:
        """The embedding context, created on first use (any thread)."""
        with self._embedder_lock:
            if self._embedder is None:
                config = self.config
                # A whole input must be one micro-batch (llama.cpp pools per micro-batch), so
                # an input may be n_ubatch tokens: the compute buffer then matches the
                # generation context's, which the fitter planned (the logits of n_ubatch rows
                # dominate it for large vocabularies).
                max_tokens = max(16, min(config.n_ctx_slot, config.n_ubatch, self.n_ctx_train))
                with logs.capture() as embed_log:
                    self._embedder = Embedder(
                        _llama(),
                        self.model,
                        pooling_for(self.declared_pooling),
                        max_tokens=max_tokens,
                        max_sequences=16,
                        n_threads=config.n_threads or os.cpu_count() or 1,
                    )
                self.load_log.extend(embed_log)
            return self._embedder

    def _load(self, llama: Any) -> None:
        config = self.config
        if not Path(config.model_path).is_file():
            raise ModelLoadError(f"model file {config.model_path} does not exist")
        llama.llama_backend_init()
        mparams = llama.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers
        if config.rpc_servers:
            self.rpc = rpc.attach(config.rpc_servers, config.rpc_allow_public)
            mparams.devices = ctypes.addressof(self.rpc.model_devices)
        use_extra_bufts = config.use_extra_bufts
        if use_extra_bufts is None:  # not planned by `loading`: ask the machine's probe here
            probe = build.repack_supported()
            build.report_repack(probe)
            use_extra_bufts = probe.supported
        mparams.use_extra_bufts = use_extra_bufts
        if not config.use_mmap:
            mparams.load_mode = LOAD_MODE_NONE
        draft_mtp = config.spec_type == "draft-mtp"
        if draft_mtp:
            mtp.check_mtp_file(Path(config.model_path))
        mparams.load_mtp = draft_mtp  # the MTP (nextn) block, skipped otherwise
        if config.tensor_split:
            n_devices = llama.llama_max_devices()
            split = (ctypes.c_float * n_devices)(*config.tensor_split[:n_devices])
            self._keepalive.append(split)
            mparams.tensor_split = split
        if config.tensor_overrides:
            self._set_tensor_overrides(mparams)
        model = llama.llama_model_load_from_file(str(config.model_path).encode(), mparams)
        if not model:
            raise ModelLoadError(
                f"llama.cpp could not load {config.model_path}: see the log above "
                "(a damaged file, an unsupported architecture, or not enough memory)"
            )
        self.model = model

        cparams = llama.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_seq_max = config.n_parallel
        cparams.n_batch = config.n_batch
        cparams.n_ubatch = min(config.n_ubatch, config.n_batch)
        threads = config.n_threads or os.cpu_count() or 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.type_k = ggml_type_id(config.type_k)
        cparams.type_v = ggml_type_id(config.type_v)
        cparams.flash_attn_type = FLASH_ATTN_TYPE[config.flash_attn]
        cparams.swa_full = config.swa_full
        # One KV stream per slot: a slot's context is its own, like llama-server's default.
        cparams.kv_unified = False
        cparams.no_perf = True
        # draft-mtp on a hybrid model (Qwen3.5): snapshots of the recurrent state to roll
        # rejected guesses back (llama.cpp's need_n_rs_seq; 0 where the architecture has none)
        cparams.n_rs_seq = config.spec_draft_n_max if draft_mtp else 0
        ctx = llama.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {config.n_ctx} tokens for "
                f"{config.model_path}: try a smaller n_ctx or a quantized KV cache"
            )
        self.ctx = ctx
        self.memory = llama.llama_get_memory(ctx)
        self.batch = llama.llama_batch_init(config.n_batch, 0, 1)
        self.n_ctx: int = llama.llama_n_ctx(ctx)
        self.n_swa: int = llama.llama_model_n_swa(model)
        self.recurrent: bool = bool(
            llama.llama_model_is_recurrent(model) or llama.llama_model_is_hybrid(model)
        )
        if config.mmproj_path is not None:
            try:
                self.media = MediaContext(
                    model,
                    config.mmproj_path,
                    use_gpu=config.mmproj_offload,
                    n_threads=threads,
                    flash_attn=config.flash_attn,
                    n_ubatch=cparams.n_ubatch,
                    n_batch=cparams.n_batch,
                )
            except ModelLoadError as exc:
                if config.mmproj_required:
                    raise
                log.warning("serving %s without images: %s", config.model_path.name, exc)
                self.media_error = str(exc)
        self.n_rs_seq: int = llama.llama_n_rs_seq(ctx)  # guesses a recurrent state can undo

    def _set_tensor_overrides(self, mparams: Any) -> None:
        entries: list[tuple[bytes, int]] = []
        for pattern, device in self.config.tensor_overrides:
            buft = build.buffer_type(device)
            if buft is None:
                log.warning("tensor override %r -> %s ignored: no such device", pattern, device)
                continue
            entries.append((pattern.encode(), buft))
        if not entries:
            return
        array = (_TensorOverride * (len(entries) + 1))()
        for i, (pattern_bytes, buft) in enumerate(entries):
            array[i].pattern = pattern_bytes
            array[i].buft = buft
        array[len(entries)].pattern = None  # NULL-terminated
        self._keepalive.append(array)
        mparams.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p)

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = _llama().llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    # Vocabulary (any thread).
    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        llama = _llama()
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(
            self.vocab, data, len(data), buf, capacity, add_special, parse_special
        )
        if n < 0:
            capacity = -n
            buf = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(
                self.vocab, data, len(data), buf, capacity, add_special, parse_special
            )
        return list(buf[:n])

    def control_tokens(self) -> npt.NDArray[np.bool_]:
        """Which token ids llama.cpp reads from text only when parsing specials (control and
        unknown tokens); computed once, on first use (a pass over the vocabulary)."""
        if self._control is None:
            llama = _llama()
            flags = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_UNKNOWN
            self._control = np.array(
                [
                    bool(llama.llama_vocab_get_attr(self.vocab, t) & flags)
                    for t in range(self.n_vocab)
                ]
            )
        return self._control

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """A token's bytes; control tokens are empty unless special."""
        key = token if not special else -1 - token
        cached = self._pieces.get(key)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = _llama().llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = _llama().llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        piece = buf.raw[:n]
        self._pieces[key] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        if not tokens:
            return ""
        if any(t < 0 or t >= self.n_vocab for t in tokens):
            raise RequestError(f"token ids must be in [0, {self.n_vocab})", param="tokens")
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(_llama().llama_vocab_is_eog(self.vocab, token))

    # Context (scheduler thread only).
    def decode(self, items: Sequence[BatchItem]) -> int:
        """Decode one batch; returns llama_decode's status (0 is success)."""
        batch = self.batch
        for i, item in enumerate(items):
            batch.token[i] = item.token
            batch.pos[i] = item.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = item.seq_id
            batch.logits[i] = 1 if item.logits else 0
        batch.n_tokens = len(items)
        status: int = _llama().llama_decode(self.ctx, batch)
        return status

    def logprobs(self, batch_index: int) -> npt.NDArray[np.float32]:
        """Log-softmax of the raw logits of one output of the last decode."""
        return log_softmax(self.logits_row(batch_index))

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        return bool(_llama().llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def seq_pos_min(self, seq_id: int) -> int:
        """The smallest position a sequence still holds (-1: none). With a small sliding-window
        cache it climbs as old cells are overwritten; a recurrent state holds only its last."""
        return int(_llama().llama_memory_seq_pos_min(self.memory, seq_id))

    def partial_state(self, seq_id: int) -> bytes:
        """The part of a sequence's memory that cannot be cut back (the sliding-window cache,
        the recurrent state; llama.cpp's PARTIAL_ONLY flag), copied to host memory."""
        llama = _llama()
        flags = llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = llama.llama_state_seq_get_size_ext(self.ctx, seq_id, flags)
        buffer = (ctypes.c_uint8 * size)()
        written = llama.llama_state_seq_get_data_ext(self.ctx, buffer, size, seq_id, flags)
        return bytes(memoryview(buffer)[:written])

    def restore_partial_state(self, seq_id: int, data: bytes) -> bool:
        """Put back what `partial_state` copied; the full-attention cells are left as they are."""
        llama = _llama()
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        flags = llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        return bool(llama.llama_state_seq_set_data_ext(self.ctx, buffer, len(data), seq_id, flags))

    def new_sampler(
        self, params: SamplingParams, seed: int, grammar: Grammar | None = None
    ) -> Sampler:
        return Sampler(self, params, seed, grammar)

    def compile_grammar(self, text: str) -> Grammar:
        """Any thread: llama.cpp only reads the vocabulary while compiling."""
        return Grammar(self, text)

    def logits_row(self, batch_index: int) -> npt.NDArray[np.float32]:
        """A copy of one output's raw logits of the last decode."""
        pointer = _llama().llama_get_logits_ith(self.ctx, batch_index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float32)

    def close(self) -> None:
        llama = _llama()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self.media is not None:
            self.media.close()
            self.media = None
        if self.batch is not None:
            llama.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            llama.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            llama.llama_model_free(self.model)
            self.model = None
        self._keepalive.clear()


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class Grammar:
    """A GBNF grammar compiled by llama.cpp into a sampler. Compiling a big grammar takes seconds,
    so it happens on the submitting thread, never on the scheduler; free() it unless a Sampler
    took it over."""

    def __init__(self, backend: LlamaBackend, text: str) -> None:
        self.handle: Any = _llama().llama_sampler_init_grammar(
            backend.vocab, text.encode("utf-8"), b"root"
        )
        if not self.handle:
            raise RequestError("the grammar does not parse", param="response_format")

    def free(self) -> None:
        if self.handle is not None:
            _llama().llama_sampler_free(self.handle)
            self.handle = None


class Sampler:
    """One request's llama.cpp sampler chain (and grammar); free() it exactly once.

    Without a grammar, `sample()` samples straight from the context's logits. With one, the
    scheduler copies the logits row and `sample_row()` runs on a worker thread: a grammar can cost
    seconds a token over a 262k vocabulary, and the other slots must not wait for it.
    """

    def __init__(
        self,
        backend: LlamaBackend,
        params: SamplingParams,
        seed: int,
        grammar: Grammar | None = None,
    ) -> None:
        llama = _llama()
        self._backend = backend
        self.grammar: Any = None
        self.chain: Any = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        add = llama.llama_sampler_chain_add
        try:
            if grammar is not None:
                self.grammar, grammar.handle = grammar.handle, None
            if params.logit_bias:
                biases = (llama.llama_logit_bias * len(params.logit_bias))()
                for i, (token, bias) in enumerate(params.logit_bias):
                    biases[i].token = token
                    biases[i].bias = bias
                add(
                    self.chain,
                    llama.llama_sampler_init_logit_bias(
                        backend.n_vocab, len(params.logit_bias), biases
                    ),
                )
            if (
                params.repeat_penalty != 1.0
                or params.presence_penalty != 0.0
                or params.frequency_penalty != 0.0
            ):
                add(
                    self.chain,
                    llama.llama_sampler_init_penalties(
                        backend.n_vocab,
                        params.penalty_last_n,
                        params.repeat_penalty,
                        params.frequency_penalty,
                        params.presence_penalty,
                    ),
                )
            if params.grammar and self.grammar is None:
                self.grammar = Grammar(backend, params.grammar).handle
            if params.temperature <= 0:
                add(self.chain, llama.llama_sampler_init_greedy())
            else:
                if params.top_k > 0:
                    add(self.chain, llama.llama_sampler_init_top_k(params.top_k))
                if params.top_p < 1.0:
                    add(self.chain, llama.llama_sampler_init_top_p(params.top_p, 1))
                if params.min_p > 0.0:
                    add(self.chain, llama.llama_sampler_init_min_p(params.min_p, 1))
                add(self.chain, llama.llama_sampler_init_temp(params.temperature))
                add(self.chain, llama.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        except BaseException:
            self.free()
            raise

    @property
    def needs_row(self) -> bool:
        """Sample with `sample_row` from a copy of the logits (off the scheduler thread)."""
        return self.grammar is not None

    def sample(self, batch_index: int) -> int:
        """Sample from one output of the last decode and accept the token into the chain."""
        token: int = _llama().llama_sampler_sample(self.chain, self._backend.ctx, batch_index)
        return token

    def sample_row(self, logits: npt.NDArray[np.float32]) -> int:
        """Sample from a copied logits row under the grammar, as llama.cpp's common sampler does:
        sample freely, keep the token if the grammar accepts it (one check), else constrain
        every candidate and sample again. Any thread; one call at a time."""
        llama = _llama()
        candidates, array = self._candidates(logits)
        llama.llama_sampler_apply(self.chain, ctypes.byref(array))
        token = int(candidates["id"][array.selected])
        single = np.array([(token, 0.0, 0.0)], dtype=_TOKEN_DATA)
        one = llama.llama_token_data_array(
            data=single.ctypes.data_as(llama.llama_token_data_p), size=1, selected=-1, sorted=False
        )
        llama.llama_sampler_apply(self.grammar, ctypes.byref(one))
        if not np.isfinite(single["logit"][0]):
            candidates, array = self._candidates(logits)
            llama.llama_sampler_apply(self.grammar, ctypes.byref(array))
            llama.llama_sampler_apply(self.chain, ctypes.byref(array))
            token = int(candidates["id"][array.selected])
        llama.llama_sampler_accept(self.grammar, token)
        llama.llama_sampler_accept(self.chain, token)
        return token

    def _candidates(self, logits: npt.NDArray[np.float32]) -> tuple[Any, Any]:
        llama = _llama()
        candidates = np.empty(len(logits), dtype=_TOKEN_DATA)
        candidates["id"] = np.arange(len(logits), dtype=np.int32)
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = llama.llama_token_data_array(
            data=candidates.ctypes.data_as(llama.llama_token_data_p),
            size=len(logits),
            selected=-1,
            sorted=False,
        )
        return candidates, array

    def free(self) -> None:
        llama = _llama()
        if self.chain is not None:
            llama.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar is not None:
            llama.llama_sampler_free(self.grammar)
            self.grammar = None
