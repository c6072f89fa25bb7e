"""The engine: one llama.cpp context, n_parallel slots, one scheduler thread.

Continuous batching, as llama-server does it: every step the scheduler builds ONE batch holding
the next token of every generating slot plus a chunk of pending prompt tokens, calls llama_decode
once, and samples every slot that has an output. Prompt prefill is chunked so a long prompt does
not stall the running streams: while other slots are generating, a step carries as many prompt
tokens as fit in EngineConfig.max_decode_stall_ms by the measured cost per token (at most n_ubatch;
`localllm.engine.pacing`), and n_batch otherwise.

Slots keep their KV cells after a request ends. A new request goes to the free slot whose cached
tokens share the longest prefix with its prompt (the next turn of a chat), and only the rest of
the prompt is decoded. A cancelled request keeps what it computed for the same reason. Where the
memory cannot be cut back to that prefix (recurrent and hybrid models, sliding-window layers with
the small cache), context checkpoints saved while decoding earlier prompts stand in for it
(`localllm.engine.checkpoints`).

Limits (checked in `submit`, before anything is queued):
- the prompt must leave room for at least one generated token in a slot (n_ctx // n_parallel);
- an explicit max_tokens must fit too: prompt + max_tokens <= slot context, else
  ContextLengthExceededError (OpenAI's behaviour, rather than silently truncating);
- without max_tokens a request may generate up to the end of the slot's context (capped by
  EngineConfig.max_tokens_default), finishing with "length" there;
- at most queue_size requests wait for a slot beyond the free ones, else QueueFullError;
- a request with `timeout_s` that is still queued or running after it fails with
  RequestTimeoutError, and its slot is free for the next.

What can take long happens off the scheduler thread, so that one request never delays the
others: tokenizing and compiling a grammar run on the thread that calls `submit`, and sampling
under a grammar (a full pass over the vocabulary per token when the grammar refuses the model's
choice) runs on a worker thread while the other slots keep decoding.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from localllm.engine import logs
from localllm.engine.backend import BatchItem, Grammar, LlamaBackend, Sampler, log_softmax
from localllm.engine.chat import ChatTemplate
from localllm.engine.checkpoints import (
    Checkpoint,
    SlotCheckpoints,
    checkpoint_positions,
    cut_to_prefix,
    needs_checkpoints,
    next_stop,
)
from localllm.engine.config import EngineConfig
from localllm.engine.embed import Embedder, EmbeddingResult
from localllm.engine.handle import RequestHandle
from localllm.engine.media import ImageSpan, MediaContext, MediaPrompt, ShiftedMemory
from localllm.engine.pacing import PrefillPacer
from localllm.engine.speculative import Proposer, make_proposer
from localllm.engine.text import StopMatcher, Utf8Stream, common_prefix
from localllm.engine.types import (
    Completion,
    EngineStats,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TextEvent,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from localllm.errors import (
    CancelledError,
    ContextLengthExceededError,
    GenerationNotSupportedError,
    LocalLLMError,
    QueueFullError,
    RequestError,
    RequestTimeoutError,
)
from localllm.tools.formats import ToolSyntax, tool_syntax
from localllm.tools.reasoning import prompt_opens_reasoning
from localllm.units import MIB
from localllm.vision.images import MEDIA_MARKER

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the scheduler needs from llama.cpp (LlamaBackend; a fake in tests)."""

    n_vocab: int
    bos_id: int
    eos_id: int
    load_log: list[str]
    architecture: str
    chat_template: str | None
    n_swa: int  # sliding window of the model's SWA layers (0: none)
    recurrent: bool  # recurrent or hybrid memory (a state per sequence, not cells per token)

    @property
    def embedding_only(self) -> bool: ...

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]: ...
    def control_tokens(self) -> Any: ...
    def token_bytes(self, token: int, special: bool = False) -> bytes: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def is_eog(self, token: int) -> bool: ...
    def decode(self, items: Sequence[BatchItem]) -> int: ...
    def logprobs(self, batch_index: int) -> Any: ...
    def logits_row(self, batch_index: int) -> Any: ...
    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool: ...
    def seq_pos_min(self, seq_id: int) -> int: ...
    def partial_state(self, seq_id: int) -> bytes: ...
    def restore_partial_state(self, seq_id: int, data: bytes) -> bool: ...
    def compile_grammar(self, text: str) -> Grammar: ...
    def new_sampler(
        self, params: SamplingParams, seed: int, grammar: Grammar | None = None
    ) -> Sampler: ...
    def embedder(self) -> Embedder: ...
    def close(self) -> None: ...


@dataclass(eq=False)
class _Job:
    """A request from submit to finish (scheduler-side state)."""

    handle: RequestHandle
    request: GenerationRequest
    prompt: list[int]
    max_new_tokens: int
    submitted_at: float
    deadline: float | None = None  # time.perf_counter() after which the request fails
    grammar: Grammar | None = None  # compiled by submit(); the sampler takes it over
    sampler: Sampler | None = None
    pending: Future[int] | None = None  # a sample under a grammar, on the sampling worker
    pending_row: Any = None  # the logits that sample is drawn from
    n_prompt_done: int = 0  # prompt tokens in the slot's KV cells (cached + decoded)
    n_cached: int = 0
    n_generated: int = 0
    next_token: int | None = None  # sampled, not yet decoded
    batch_index: int = -1  # where this job's logits are in the current batch
    started_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    utf8: Utf8Stream = field(default_factory=Utf8Stream)
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    keep_special: frozenset[int] = frozenset()  # token ids printed with their control text
    checkpoint_at: tuple[int, ...] = ()  # prompt positions to save a context checkpoint at
    media: MediaPrompt | None = None  # the prompt's images (`engine.media`)
    shift: int = 0  # positions below token indices here (M-RoPE images: `engine.media`)


@dataclass(eq=False)
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells this sequence holds
    job: _Job | None = None
    last_used: float = 0.0
    checkpoints: SlotCheckpoints | None = None  # None: the memory can be cut anywhere


class Engine:
    """Load with `Engine.load(config)`; `submit()` from any thread; `close()` when done."""

    def __init__(
        self, config: EngineConfig, backend: Backend, proposer: Proposer | None = None
    ) -> None:
        self.config = config
        self.backend = backend
        self.n_ctx_slot = config.n_ctx_slot
        self.load_log: list[str] = list(backend.load_log)
        self.memory: dict[str, float] = memory_summary(self.load_log)
        # Speculative decoding (engine.speculative): None when spec_type is "none" or the
        # model's memory cannot be cut back after a rejected guess.
        self._proposer = proposer if proposer is not None else make_proposer(config, backend)
        draft_log = getattr(self._proposer, "load_log", None)
        if draft_log:
            self.load_log.extend(draft_log)
            self.memory.update({f"draft_{k}": v for k, v in memory_summary(draft_log).items()})
        self._spec_drafted = self._spec_accepted = self._spec_steps = 0
        # A prompt longer than this cannot fit: no text averages 64 characters a token. Checked
        # before tokenizing, which takes about a second per MB.
        self.max_prompt_chars = max(1 << 20, 64 * config.n_ctx)
        self.chat_template = ChatTemplate.for_model(
            backend.chat_template,
            backend.architecture,
            bos_token=self._special_text(backend.bos_id),
            eos_token=self._special_text(backend.eos_id),
            max_chars=self.max_prompt_chars,
        )
        self._tool_syntax: ToolSyntax | None = None
        # The vision projector (`engine.media`): None serves text only.
        self.media: MediaContext | None = getattr(backend, "media", None)
        partial = needs_checkpoints(backend, config.swa_full)
        self._slots = [
            _Slot(i, checkpoints=SlotCheckpoints(config.ctx_checkpoints) if partial else None)
            for i in range(config.n_parallel)
        ]
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._failure: LocalLLMError | None = None  # set when the engine cannot go on
        self._wake = False  # something changed (submit, cancel, close): re-check before waiting
        self._ids = itertools.count(1)
        self._rng = random.Random(config.seed)
        # Counters, written by the scheduler thread only.
        self._requests_total = 0
        self._prompt_tokens_total = 0
        self._cached_tokens_total = 0
        self._generated_tokens_total = 0
        self._prompt_seconds = 0.0
        self._decode_seconds = 0.0
        self._last_ttft: float | None = None
        self._checkpoints_saved = 0
        self._checkpoints_restored = 0
        self._shared_steps = 0
        self._pacer = PrefillPacer(config.max_decode_stall_ms / 1000, config.n_ubatch)
        # The last steps as (generated tokens, prompt tokens, seconds): what the pacer did.
        self.recent_steps: deque[tuple[int, int, float]] = deque(maxlen=1024)
        # One worker: grammar samples queue behind each other, never in front of the batch.
        self._sampling = ThreadPoolExecutor(1, thread_name_prefix="localllm-grammar")
        self._thread = threading.Thread(target=self._run, name="localllm-scheduler", daemon=True)
        self._thread.start()
        attachment = getattr(backend, "rpc", None)
        if attachment is not None:
            attachment.on_host_lost(self._host_lost)

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Load the model (blocking, about a second for the embedded one) and start scheduling."""
        backend = LlamaBackend(config)
        log.info(
            "loaded %s in %.1f s: %d slots of %d tokens; %s",
            config.model_path.name,
            backend.load_seconds,
            config.n_parallel,
            config.n_ctx_slot,
            logs.placement(backend.load_log) or "placement not logged by llama.cpp",
        )
        try:
            return cls(config, backend)  # loads a draft model too (spec_type draft-simple)
        except BaseException:
            backend.close()
            raise

    def _special_text(self, token: int) -> str:
        if token < 0:  # LLAMA_TOKEN_NULL: the model has none
            return ""
        return self.backend.token_bytes(token, True).decode("utf-8", "replace")

    # ---------------------------------------------------------------- public API (any thread)

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        return self.backend.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.backend.detokenize(tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        return self.chat_template.render(messages, add_generation_prompt=True, tools=tools)

    def tool_syntax(self) -> ToolSyntax:
        """How this model calls tools and what its template shows of them (probed once)."""
        if self._tool_syntax is None:
            self._tool_syntax = tool_syntax(self.chat_template)
        return self._tool_syntax

    def chat_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[int, ...]:
        """The chat's prompt tokens: the template's markers as control tokens, the messages'
        text as plain text, so a user writing "<start_of_turn>" cannot open a turn. `tools`
        are OpenAI tool objects for templates that show them (`localllm.tools` prepares both).

        Blocking (render and tokenize): call it from a worker thread.
        """
        prompt = self.chat_render(messages, tools)[0]
        if isinstance(prompt, str):  # marker text without images: the text as it is written
            return tuple(self.backend.tokenize(prompt, False, True))
        return prompt

    def chat_render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[tuple[int, ...] | str, bool]:
        """`chat_prompt` with more template variables (`template_kwargs`: a request's
        chat_template_kwargs and reasoning_effort), and whether the prompt ends inside the
        model's reasoning (a template that opens `<think>` for the answer). With images (their
        MEDIA_MARKERs in the contents, a model with a projector) the prompt is the rendered text,
        which `submit` tokenizes with the images."""
        chars = sum(
            len(m.get("content") or "")
            for m in messages
            if isinstance(m, Mapping) and isinstance(m.get("content"), str)
        )
        if chars > self.max_prompt_chars:  # before rendering and tokenizing (seconds per MB)
            raise ContextLengthExceededError(
                f"the messages are {chars} characters, more than a context of "
                f"{self.config.n_ctx} tokens can hold; shorten them",
                param="messages",
            )
        text = self.chat_template.render(
            messages, add_generation_prompt=True, tools=tools, extra=template_kwargs
        )
        opened = prompt_opens_reasoning(text, self.tool_syntax().reasoning)
        # Tool definitions, calls and names are written by the template outside any message
        # content, where render_parts cannot keep them plain text: refuse control text there.
        extras = [json.dumps(tools, ensure_ascii=False)] if tools else []
        extras += [
            json.dumps([m.get("tool_calls"), m.get("name")], ensure_ascii=False)
            for m in messages
            if m.get("tool_calls") or m.get("name")
        ]
        # So are earlier turns' reasoning and the request's template variables.
        extras += [
            str(m.get("reasoning_content") or m.get("thinking") or "")
            for m in messages
            if m.get("reasoning_content") or m.get("thinking")
        ]
        if template_kwargs:
            extras.append(json.dumps(template_kwargs, ensure_ascii=False))
        if any(self._has_control_text(extra) for extra in extras):
            raise RequestError(
                "a tool definition, tool call, message name, reasoning_content or "
                "chat_template_kwargs value holds the text of one of the model's control "
                "tokens; remove it (only message contents may)",
                param="tools",
            )
        contents = [m.get("content") for m in messages]
        if self.media is not None and MEDIA_MARKER in text:
            # Images: mtmd tokenizes the text around them (`submit` with the images).
            if any(isinstance(c, str) and self._has_control_text(c) for c in contents):
                raise RequestError(
                    "a message holds the text of one of the model's control tokens, which a "
                    "request with images cannot keep plain text; remove it",
                    param="messages",
                )
            return text, opened
        if not any(isinstance(c, str) and self._has_control_text(c) for c in contents):
            return tuple(self.backend.tokenize(text, False, True)), opened
        parts = self.chat_template.render_parts(messages, tools, template_kwargs)
        if parts is None:
            raise RequestError(
                "a message holds the text of one of the model's control tokens, and this "
                "model's chat template reshapes messages too much to keep it plain text; "
                "remove the control-token text from the message",
                param="messages",
            )
        tokens: list[int] = []
        for part, is_content in parts:
            tokens.extend(self.backend.tokenize(part, False, not is_content))
        return tuple(tokens), opened

    def _has_control_text(self, text: str) -> bool:
        if not text:
            return False
        tokens = self.backend.tokenize(text, False, True)
        control = self.backend.control_tokens()
        return bool(tokens) and bool(control[np.asarray(tokens)].any())

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises ContextLengthExceededError, QueueFullError, CancelledError."""
        if self.backend.embedding_only:
            raise GenerationNotSupportedError(
                f"{self.config.model_path.name} is an embedding model: it has no text to "
                "generate; use /v1/embeddings, or a chat model for chat and completions",
                param="model",
            )
        media: MediaPrompt | None = None
        if request.images:
            media = self._media_prompt(request)
            prompt = media.tokens
        elif isinstance(request.prompt, str):
            if len(request.prompt) > self.max_prompt_chars:
                raise ContextLengthExceededError(
                    f"the prompt is {len(request.prompt)} characters, more than a context of "
                    f"{self.config.n_ctx} tokens can hold; shorten it",
                    param="prompt",
                )
            prompt = self.backend.tokenize(
                request.prompt, request.add_special, request.parse_special
            )
        else:
            prompt = list(request.prompt)
            bad = [t for t in prompt if not 0 <= t < self.backend.n_vocab]
            if bad:
                raise RequestError(f"token id {bad[0]} is not in the vocabulary", param="prompt")
        try:
            return self._queue_job(request, prompt, media)
        except BaseException:
            if media is not None:
                media.free()
            raise

    def _media_prompt(self, request: GenerationRequest) -> MediaPrompt:
        """A prompt with images, tokenized by the projector (images and marker text checked)."""
        if self.media is None:
            refused = getattr(self.backend, "media_error", "")
            raise RequestError(
                f"{self.config.model_path.name} has no vision projector, so it cannot read "
                "images: serve it with --mmproj FILE (the mmproj-*.gguf made for it), or send "
                "text only" + (f" (the projector beside it did not load: {refused})" if refused
                               else ""),
                param="messages",
            )
        if not isinstance(request.prompt, str):
            raise RequestError("images need a text prompt, not token ids", param="prompt")
        if len(request.prompt) > self.max_prompt_chars:
            raise ContextLengthExceededError(
                f"the prompt is {len(request.prompt)} characters, more than a context of "
                f"{self.config.n_ctx} tokens can hold; shorten it",
                param="prompt",
            )
        return self.media.prompt(
            request.prompt, request.images, request.add_special, request.parse_special
        )

    def _queue_job(
        self, request: GenerationRequest, prompt: list[int], media: MediaPrompt | None
    ) -> RequestHandle:
        if not prompt:
            raise RequestError("the prompt is empty", param="prompt")
        for token, _ in request.sampling.logit_bias:
            if not 0 <= token < self.backend.n_vocab:
                raise RequestError(
                    f"logit_bias names token {token}; this model's ids are 0 to "
                    f"{self.backend.n_vocab - 1}",
                    param="logit_bias",
                )
        max_new = self._max_new_tokens(len(prompt), request.max_tokens)
        self._check_admission()  # before compiling a grammar for a request that cannot wait
        grammar = (
            self.backend.compile_grammar(request.sampling.grammar)
            if request.sampling.grammar
            else None
        )
        request_id = f"{next(self._ids):x}-{uuid.uuid4().hex[:12]}"
        handle = RequestHandle(request_id, len(prompt), self._notify)
        now = time.perf_counter()
        job = _Job(
            handle=handle,
            request=request,
            prompt=prompt,
            max_new_tokens=max_new,
            submitted_at=now,
            deadline=now + request.timeout_s if request.timeout_s else None,
            grammar=grammar,
            stops=StopMatcher(request.stop),
            keep_special=self._special_ids(request.keep_special),
            media=media,
        )
        try:
            with self._cond:
                self._check_admission()
                self._queue.append(job)
                self._wake = True
                self._cond.notify_all()
        except BaseException:
            if grammar is not None:
                grammar.free()
            raise
        return handle

    def _check_admission(self) -> None:
        with self._cond:
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise CancelledError("the server is shutting down; retry on another instance")
            free = sum(1 for slot in self._slots if slot.job is None)
            if len(self._queue) - free >= self.config.queue_size:
                raise QueueFullError(
                    f"all {len(self._slots)} slots are busy and {self.config.queue_size} "
                    "requests are already waiting; retry shortly",
                    retry_after_s=1,
                )

    def embed(self, inputs: Sequence[str | Sequence[int]]) -> EmbeddingResult:
        """One L2-normalised vector per input (text, or token ids); blocking, any thread.

        Runs on the model's embedding context (see `localllm.engine.embed`), beside any
        generation in progress.
        """
        if not inputs:
            raise RequestError("input must not be empty", param="input")
        # The embedding context's limit per input (as the backend sizes it), and in characters
        # 64 per token, checked before tokenizing: a 200 KB text would take seconds to tokenize
        # only to be refused for its token count.
        max_tokens = max(16, min(self.config.n_ctx_slot, self.config.n_ubatch))
        for index, item in enumerate(inputs):
            if isinstance(item, str) and len(item) > 64 * max_tokens:
                raise ContextLengthExceededError(
                    f"input {index} is {len(item)} characters; this model embeds at most "
                    f"{max_tokens} tokens per input: split the text",
                    param="input",
                )
        token_lists: list[list[int]] = []
        for item in inputs:
            if isinstance(item, str):
                # text, not markup: a user cannot write control tokens (BOS is added)
                token_lists.append(self.backend.tokenize(item, True, False))
            else:
                tokens = list(item)
                bad = [t for t in tokens if not 0 <= t < self.backend.n_vocab]
                if bad:
                    raise RequestError(f"token id {bad[0]} is not in the vocabulary", param="input")
                token_lists.append(tokens)
        vectors = self.backend.embedder().embed(token_lists)
        return EmbeddingResult(
            vectors=tuple(tuple(float(x) for x in v) for v in vectors),
            prompt_tokens=sum(len(t) for t in token_lists),
        )

    def _special_ids(self, texts: Sequence[str]) -> frozenset[int]:
        """The ids of control tokens named by their text (texts that are not one token in
        this vocabulary are skipped: the model does not have that marker)."""
        ids = set()
        for text in texts:
            tokens = self.backend.tokenize(text, False, True)
            if len(tokens) == 1:
                ids.add(tokens[0])
        return frozenset(ids)

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        **sampling: Any,
    ) -> Completion:
        """Blocking convenience for scripts: one completion."""
        request = GenerationRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            stop=tuple(stop),
            sampling=SamplingParams(**sampling),
        )
        return self.submit(request).result()

    def stats(self) -> EngineStats:
        with self._cond:
            queue_length = len(self._queue)
        slots = list(self._slots)
        return EngineStats(
            n_slots=len(slots),
            busy_slots=sum(1 for s in slots if s.job is not None),
            queue_length=queue_length,
            kv_cells_used=sum(len(s.cached) for s in slots),
            kv_cells_total=self.config.n_ctx,
            requests_total=self._requests_total,
            prompt_tokens_total=self._prompt_tokens_total,
            cached_tokens_total=self._cached_tokens_total,
            generated_tokens_total=self._generated_tokens_total,
            prompt_seconds_total=self._prompt_seconds,
            decode_seconds_total=self._decode_seconds,
            last_time_to_first_token_s=self._last_ttft,
            checkpoints_saved_total=self._checkpoints_saved,
            checkpoints_restored_total=self._checkpoints_restored,
            checkpoint_bytes=sum(s.checkpoints.n_bytes for s in slots if s.checkpoints),
            shared_steps_total=self._shared_steps,
            images_encoded_total=self.media.encodes if self.media is not None else 0,
            prefill_ms_per_token=(
                None if self._pacer.token_s is None else round(self._pacer.token_s * 1000, 3)
            ),
            spec_type=self._proposer.name if self._proposer is not None else "none",
            spec_draft_tokens_total=self._spec_drafted,
            spec_accepted_tokens_total=self._spec_accepted,
            spec_drafts_total=self._spec_steps,
        )

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request runs or waits; False on timeout (for graceful shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = self.stats()
            if stats.busy_slots == 0 and stats.queue_length == 0:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        """Cancel everything still running, stop the scheduler, free the model."""
        self.cancel_all()
        self._thread.join()
        self._sampling.shutdown(wait=True)  # a grammar sample reads the vocabulary
        if self._proposer is not None:
            self._proposer.close()
        self.backend.close()

    def cancel_all(self) -> None:
        """Fail every queued and running request with CancelledError ("shutting down") and
        refuse new ones; the model stays loaded until close()."""
        with self._cond:
            self._closing = True
            self._wake = True
            self._cond.notify_all()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- scheduler thread

    def _notify(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def _max_new_tokens(self, n_prompt: int, max_tokens: int | None) -> int:
        room = self.n_ctx_slot - n_prompt
        if room < 1:
            raise ContextLengthExceededError(
                f"the prompt is {n_prompt} tokens but a slot holds {self.n_ctx_slot} "
                f"(n_ctx {self.config.n_ctx} split over {self.config.n_parallel} slots); "
                "shorten the prompt, or serve with a larger n_ctx or fewer parallel slots",
                param="messages",
            )
        if max_tokens is None:
            cap = self.config.max_tokens_default
            return min(room, cap) if cap else room
        if max_tokens < 1:
            raise RequestError("max_tokens must be at least 1", param="max_tokens")
        if max_tokens > room:
            raise ContextLengthExceededError(
                f"this slot's context is {self.n_ctx_slot} tokens, but {n_prompt + max_tokens} "
                f"were requested ({n_prompt} in the prompt, {max_tokens} for the completion); "
                "lower max_tokens or shorten the prompt",
                param="max_tokens",
            )
        return max_tokens

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._wake and not self._has_work():
                        # Poll while requests exist: their deadlines pass without a wake-up.
                        self._cond.wait(0.1 if self._queue or self._busy() else None)
                        if self._expired():
                            break
                    self._wake = False
                    closing = self._closing
                    now = time.perf_counter()
                    dropped = [
                        (j, self._queued_error(j, now))
                        for j in self._queue
                        if closing or j.handle.cancelled or self._past(j, now)
                    ]
                    for job, _ in dropped:
                        self._queue.remove(job)
                    assign = self._take_assignable() if not closing else []
                for job, error in dropped:
                    if job.grammar is not None:
                        job.grammar.free()
                    if job.media is not None:
                        job.media.free()
                    job.handle._fail(error)
                if closing:
                    for slot in self._slots:
                        if slot.job is not None:
                            self._release(slot, CancelledError("the server is shutting down"))
                    return
                for slot, job in assign:
                    self._start(slot, job)
                now = time.perf_counter()
                for slot in self._slots:
                    running = slot.job
                    if running is None:
                        continue
                    if running.handle.cancelled:
                        self._release(slot, CancelledError("cancelled by the client"))
                    elif self._past(running, now):
                        self._release(slot, self._timeout_error(running))
                    elif running.pending is not None and running.pending.done():
                        self._sampled(slot)
                if any(s.job is not None and self._ready(s.job) for s in self._slots):
                    self._step()
        except BaseException as exc:  # a bug: fail every request rather than hang them
            log.exception("scheduler thread died")
            self._fail_all(LocalLLMError(f"engine failure: {exc}"))

    def _fail_all(self, error: LocalLLMError) -> None:
        """Fail every running and queued request and refuse new ones (the engine is done)."""
        for slot in self._slots:
            job = slot.job
            if job is not None:
                job.handle._fail(error)
                slot.job = None
        with self._cond:
            self._closing = True
            for job in self._queue:
                job.handle._fail(error)
            self._queue.clear()

    def _host_lost(self, error: LocalLLMError) -> None:
        # Called from llama.cpp's RPC thread while the scheduler is stuck in llama_decode.
        with self._cond:
            self._failure = error
        self._fail_all(error)

    def _has_work(self) -> bool:
        return (
            self._closing
            or any(
                s.job is not None and (self._ready(s.job) or self._sample_done(s.job))
                for s in self._slots
            )
            or bool(self._queue and any(s.job is None for s in self._slots))
        )

    @staticmethod
    def _ready(job: _Job) -> bool:
        """The job can go into the next step: no sample on the worker, no image encoding."""
        if job.pending is not None:
            return False
        if job.media is None or job.next_token is not None:
            return True
        span = job.media.at(job.n_prompt_done)
        return span is None or span.ready()

    @staticmethod
    def _sample_done(job: _Job) -> bool:
        return job.pending is not None and job.pending.done()

    def _busy(self) -> bool:
        return any(s.job is not None for s in self._slots)

    @staticmethod
    def _past(job: _Job, now: float) -> bool:
        return job.deadline is not None and now > job.deadline

    def _expired(self) -> bool:
        now = time.perf_counter()
        return any(self._past(j, now) for j in self._queue) or any(
            s.job is not None and self._past(s.job, now) for s in self._slots
        )

    def _queued_error(self, job: _Job, now: float) -> RequestError:
        if self._closing:
            return CancelledError("the server is shutting down")
        if job.handle.cancelled:
            return CancelledError("cancelled before it started")
        return self._timeout_error(job)

    @staticmethod
    def _timeout_error(job: _Job) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"the request ran longer than this server's limit of "
            f"{job.request.timeout_s:g} s (request_timeout_s) and was stopped; ask for fewer "
            "tokens, or retry when the server is less busy"
        )

    def _take_assignable(self) -> list[tuple[_Slot, _Job]]:
        """Pair queued jobs (FIFO) with free slots: longest cached prefix first, then LRU."""
        pairs: list[tuple[_Slot, _Job]] = []
        free = [s for s in self._slots if s.job is None]
        while self._queue and free:
            job = self._queue.popleft()
            best = max(free, key=lambda s: (common_prefix(s.cached, job.prompt), -s.last_used))
            free.remove(best)
            best.job = job  # reserve now so stats and admission see it busy
            pairs.append((best, job))
        return pairs

    def _start(self, slot: _Slot, job: _Job) -> None:
        job.started_at = time.perf_counter()
        reuse = common_prefix(slot.cached, job.prompt)
        reuse = min(reuse, len(job.prompt) - 1)  # decode at least one token to get logits
        media = job.media
        memory: Any = self.backend
        if media is not None:
            reuse = media.align(reuse)
            memory = ShiftedMemory(self.backend, media) if media.shifts else memory
        reuse, restored = cut_to_prefix(
            memory, slot.seq_id, len(slot.cached), reuse, slot.checkpoints
        )
        if media is not None and media.align(reuse) != reuse:  # a checkpoint inside an image
            reuse, again = cut_to_prefix(
                memory, slot.seq_id, reuse, media.align(reuse), slot.checkpoints
            )
            restored = restored or again
        job.shift = media.shift_before(reuse) if media is not None else 0
        self._checkpoints_restored += restored
        del slot.cached[reuse:]
        job.n_cached = job.n_prompt_done = reuse
        if slot.checkpoints is not None and slot.checkpoints.limit > 0:
            job.checkpoint_at = checkpoint_positions(
                len(job.prompt),
                reuse,
                self.config.n_ubatch,
                self.config.checkpoint_every_n_tokens,
            )
            if media is not None:
                moved = media.checkpoints(job.checkpoint_at)
                job.checkpoint_at = tuple(p for p in moved if p > reuse)
        if media is not None and self.media is not None:
            for span in media.spans:
                if span.start >= reuse:  # the ones before are in the slot's cells already
                    self.media.encode_later(span, lambda _: self._notify())
        seed = job.request.sampling.seed
        if seed is None:
            seed = self._rng.getrandbits(32)
        grammar, job.grammar = job.grammar, None
        try:
            job.sampler = self.backend.new_sampler(job.request.sampling, seed, grammar)
        except RequestError as exc:
            slot.job = None
            if job.media is not None:
                job.media.free()
            job.handle._fail(exc)
            return
        slot.job = job

    def _step(self) -> None:
        items: list[BatchItem] = []
        generating = [s for s in self._slots if s.job is not None and s.job.next_token is not None]
        drafts: dict[int, list[int]] = {}  # seq_id -> guesses verified in this step
        for n, slot in enumerate(generating):
            job = slot.job
            assert job is not None and job.next_token is not None
            job.batch_index = len(items)
            pos = len(slot.cached) - job.shift
            items.append(BatchItem(job.next_token, pos, slot.seq_id, True))
            # Room for guesses: the batch (the other slots' pending tokens still to come).
            guesses = self._draft(
                slot, len(generating), self.config.n_batch - len(items) - (len(generating) - n - 1)
            )
            if guesses:
                drafts[slot.seq_id] = guesses
                items.extend(
                    BatchItem(t, pos + 1 + i, slot.seq_id, True) for i, t in enumerate(guesses)
                )
        budget = self.config.n_batch - len(items)
        # Every decoding slot waits for this whole step (one with a grammar sample on the worker
        # too, when pacing is on): cap the prompt chunk so the step stays near the stall target.
        sampling = any(s.job is not None and s.job.pending is not None for s in self._slots)
        if generating or (sampling and self._pacer.target_s > 0):
            budget = min(budget, self._pacer.budget(len(generating)))
        prefilling: list[tuple[_Slot, int]] = []
        image: tuple[_Slot, ImageSpan] | None = None  # at most one image a step
        for slot in self._slots:
            job = slot.job
            if job is None or job.next_token is not None or job.pending is not None or budget <= 0:
                continue
            take = min(len(job.prompt) - job.n_prompt_done, budget)
            start = job.n_prompt_done
            stop = next_stop(job.checkpoint_at, start)
            if job.media is not None:
                span = job.media.at(start)
                if span is not None:  # its tokens go in whole, in a batch of their own
                    if image is None and span.ready():
                        image = (slot, span)
                        budget -= span.n_tokens
                    continue
                image_at = job.media.next_start(start)
                if image_at is not None:
                    stop = image_at if stop is None else min(stop, image_at)
            if stop is not None:
                take = min(take, stop - start)  # end the chunk where a checkpoint is due
            for i in range(take):
                last = start + i == len(job.prompt) - 1
                if last:
                    job.batch_index = len(items)
                pos = start + i - job.shift
                items.append(BatchItem(job.prompt[start + i], pos, slot.seq_id, last))
            budget -= take
            prefilling.append((slot, take))
        step_started = time.perf_counter()
        n_image = self._decode_image(*image) if image is not None else 0
        if not items:
            if n_image:
                self._pacer.observe(n_image, time.perf_counter() - step_started)
            return

        started = time.perf_counter()
        status = self.backend.decode(items)
        elapsed = time.perf_counter() - started
        if status != 0:
            self._decode_failed(status, generating + [s for s, _ in prefilling])
            return
        if generating:
            self._decode_seconds += elapsed
        if prefilling:
            self._prompt_seconds += elapsed
            self._shared_steps += bool(generating)
        if self._proposer is not None:
            self._target_outputs(items)

        now = time.perf_counter()
        for slot in generating:
            job = slot.job
            assert job is not None and job.next_token is not None
            slot.cached.append(job.next_token)
            job.next_token = None
            verified = drafts.get(slot.seq_id)
            if verified:
                self._verify(slot, verified, now)
            else:
                self._sample(slot, now)
        for slot, take in prefilling:
            job = slot.job
            assert job is not None
            slot.cached.extend(job.prompt[job.n_prompt_done : job.n_prompt_done + take])
            job.n_prompt_done += take
            self._prompt_tokens_total += take
            self._checkpoint(slot, job)
            if job.n_prompt_done == len(job.prompt):
                self._sample(slot, now)
        # The pacer times the whole step, sampling included: a stream waits for all of it.
        n_prompt = len(items) - len(generating) + n_image
        step_s = time.perf_counter() - step_started
        self._pacer.observe(n_prompt, step_s)
        self.recent_steps.append((len(generating), n_prompt, step_s))

    def _checkpoint(self, slot: _Slot, job: _Job) -> None:
        if job.n_prompt_done in job.checkpoint_at and slot.checkpoints is not None:
            data = self.backend.partial_state(slot.seq_id)
            slot.checkpoints.add(Checkpoint(job.n_prompt_done, data))
            self._checkpoints_saved += 1

    def _decode_image(self, slot: _Slot, span: ImageSpan) -> int:
        """Decode an encoded image into the slot's sequence; the tokens it added."""
        job = slot.job
        assert job is not None and self.media is not None and span.embd is not None
        error = span.embd.exception()
        if error is not None:
            log.error("encoding an image failed: %s", error)
            failure = error if isinstance(error, LocalLLMError) else LocalLLMError(str(error))
            self._release(slot, failure)
            return 0
        started = time.perf_counter()
        pos = span.start - job.shift
        status = self.media.decode_image(self.backend, span, pos, slot.seq_id)
        self._prompt_seconds += time.perf_counter() - started
        if status != 0:
            self._decode_failed(status, [slot])
            return 0
        slot.cached.extend([span.key] * span.n_tokens)
        job.shift += span.n_tokens - span.n_pos
        job.n_prompt_done += span.n_tokens
        self._prompt_tokens_total += span.n_tokens
        self._checkpoint(slot, job)
        return span.n_tokens

    def _draft(self, slot: _Slot, n_generating: int, room: int) -> list[int]:
        """The proposer's guesses after the slot's pending token (none for a request with a
        grammar or with images, past spec_max_busy_slots generating slots, or below
        spec_draft_n_min)."""
        job = slot.job
        assert job is not None and job.next_token is not None and job.sampler is not None
        config = self.config
        # An image's cells are no tokens a proposer could continue (nor a draft model decode).
        if self._proposer is None or job.sampler.needs_row or job.media is not None:
            return []
        if config.spec_max_busy_slots and n_generating > config.spec_max_busy_slots:
            return []
        request = job.request
        n_min = config.spec_draft_n_min
        if request.spec_draft_n_min is not None:
            n_min = request.spec_draft_n_min
        n_max = min(
            config.spec_draft_n_max
            if request.spec_draft_n_max is None
            else request.spec_draft_n_max,
            room,
            job.max_new_tokens - job.n_generated - 1,  # the bonus token counts too
            self.n_ctx_slot - len(slot.cached) - 1,  # positions stay inside the slot
        )
        if n_max < max(1, n_min):
            return []
        try:
            guesses = self._proposer.draft(slot.seq_id, [*slot.cached, job.next_token], n_max)
        except Exception:  # a proposer's failure costs the guesses, never the request
            log.exception("the %s proposer failed; decoding without guesses", self._proposer.name)
            return []
        guesses = guesses[:n_max]
        # A draft model's vocabulary may be larger by a few ids the model does not have.
        for i, token in enumerate(guesses):
            if not 0 <= token < self.backend.n_vocab:
                del guesses[i:]
                break
        return guesses if len(guesses) >= n_min else []

    def _target_outputs(self, items: Sequence[BatchItem]) -> None:
        """Tell the proposer where each slot's outputs are in the batch just decoded."""
        assert self._proposer is not None
        every = self._proposer.wants_prompt_outputs  # hidden states exist for every token
        where: dict[int, tuple[list[int], list[int]]] = {}
        for index, item in enumerate(items):
            if item.logits or every:
                positions, indices = where.setdefault(item.seq_id, ([], []))
                positions.append(item.pos)
                indices.append(index)
        for seq_id, (positions, indices) in where.items():
            self._proposer.on_target_outputs(seq_id, positions, indices)

    def _verify(self, slot: _Slot, guesses: list[int], now: float) -> None:
        """Keep the longest prefix of guesses the request's sampler agrees with, then the
        sampler's own token after it (the correction, or the bonus when all were right); cut
        the rest's KV cells. Exact rejection sampling for deterministic guesses (see
        engine.speculative); every emitted token goes through _accept (stops, EOG, limits)."""
        job = slot.job
        assert job is not None and job.sampler is not None and self._proposer is not None
        accepted = 0
        for i in range(len(guesses) + 1):
            index = job.batch_index + i
            row = self.backend.logprobs(index) if job.request.logprobs is not None else None
            token = job.sampler.sample(index)
            self._accept(slot, token, row, now)
            if slot.job is not job:  # finished: its last token is not kept in the cells
                break
            if i < len(guesses) and token == guesses[i]:
                accepted += 1
                slot.cached.append(token)  # decoded in this batch already
                job.next_token = None
                continue
            break
        self.backend.seq_rm(slot.seq_id, len(slot.cached), -1)
        self._spec_steps += 1
        self._spec_drafted += len(guesses)
        self._spec_accepted += accepted
        if slot.job is job:
            self._proposer.on_verified(slot.seq_id, len(slot.cached))

    def _decode_failed(self, status: int, slots: list[_Slot]) -> None:
        # 1: no KV slot (should not happen, sizes are checked); <0: llama.cpp error.
        error = LocalLLMError(f"llama_decode failed with status {status}; the request was dropped")
        log.error("llama_decode returned %d for a batch of %d slots", status, len(slots))
        for slot in slots:
            self.backend.seq_rm(slot.seq_id, -1, -1)
            slot.cached.clear()
            if slot.checkpoints is not None:
                slot.checkpoints.clear()
            self._release(slot, error)

    def _sample(self, slot: _Slot, now: float) -> None:
        job = slot.job
        assert job is not None and job.sampler is not None
        if job.sampler.needs_row:
            row = self.backend.logits_row(job.batch_index)
            job.pending_row = row
            job.pending = self._sampling.submit(job.sampler.sample_row, row)
            job.pending.add_done_callback(lambda _: self._notify())
            return
        logprob_row = None
        if job.request.logprobs is not None:
            logprob_row = self.backend.logprobs(job.batch_index)
        self._accept(slot, job.sampler.sample(job.batch_index), logprob_row, now)

    def _sampled(self, slot: _Slot) -> None:
        """A grammar sample came back from the worker."""
        job = slot.job
        assert job is not None and job.pending is not None
        future, row = job.pending, job.pending_row
        job.pending = job.pending_row = None
        try:
            token = future.result()
        except Exception as exc:  # llama.cpp refused the grammar state: fail this one only
            log.exception("grammar sampling failed")
            self._release(slot, LocalLLMError(f"sampling under the grammar failed: {exc}"))
            return
        logprob_row = log_softmax(row) if job.request.logprobs is not None else None
        self._accept(slot, token, logprob_row, time.perf_counter())

    def _accept(self, slot: _Slot, token: int, logprob_row: Any, now: float) -> None:
        job = slot.job
        assert job is not None
        logprob = None
        if logprob_row is not None and job.request.logprobs is not None:
            logprob = self._token_logprob(logprob_row, token, job.request.logprobs)
        job.n_generated += 1
        self._generated_tokens_total += 1
        if job.n_generated == 1:
            job.first_token_at = now
        job.last_token_at = now
        logprobs = (logprob,) if logprob is not None else ()

        if self.backend.is_eog(token):
            self._finish(slot, "stop", logprobs)
            return
        piece = self.backend.token_bytes(token, token in job.keep_special)
        text, stopped = job.stops.push(job.utf8.feed(piece))
        if stopped:
            self._finish(slot, "stop", logprobs, text)
        elif job.n_generated >= job.max_new_tokens:
            self._finish(slot, "length", logprobs, text)
        else:
            job.next_token = token
            if text or logprobs:
                job.handle._push(TextEvent(text, logprobs))

    def _token_logprob(self, row: Any, token: int, top_n: int) -> TokenLogprob:
        def piece(t: int) -> tuple[str, bytes]:
            data = self.backend.token_bytes(t, True)
            return data.decode("utf-8", "replace"), data

        text, data = piece(token)
        top: list[TopLogprob] = []
        if top_n > 0:
            best = np.argpartition(row, -top_n)[-top_n:]
            for t in sorted(best.tolist(), key=lambda t: -float(row[t])):
                t_text, t_data = piece(int(t))
                top.append(TopLogprob(t_text, t_data, float(row[t])))
        return TokenLogprob(text, data, float(row[token]), tuple(top))

    def _finish(
        self,
        slot: _Slot,
        reason: FinishReason,
        logprobs: tuple[TokenLogprob, ...],
        text: str = "",
    ) -> None:
        job = slot.job
        assert job is not None
        if not job.stops.stopped:
            text += job.stops.push(job.utf8.flush())[0]
            text += job.stops.flush()
        if text or logprobs:
            job.handle._push(TextEvent(text, logprobs))
        ttft = job.first_token_at - job.submitted_at
        prefill_s = job.first_token_at - job.started_at
        decode_s = job.last_token_at - job.first_token_at
        n_computed = len(job.prompt) - job.n_cached
        finish = FinishEvent(
            finish_reason=reason,
            usage=Usage(len(job.prompt), job.n_generated, job.n_cached),
            time_to_first_token_s=ttft,
            prompt_tokens_per_s=n_computed / prefill_s if prefill_s > 0 else 0.0,
            decode_tokens_per_s=(job.n_generated - 1) / decode_s if decode_s > 0 else 0.0,
        )
        self._last_ttft = ttft
        self._cached_tokens_total += job.n_cached
        self._release(slot, None)
        job.handle._push(finish)

    def _release(self, slot: _Slot, error: BaseException | None) -> None:
        """Free the slot; its KV cells stay (slot.cached says which) for prefix reuse."""
        job = slot.job
        if job is None:
            return
        sampler, job.sampler = job.sampler, None
        if sampler is not None and job.pending is not None:
            # The worker may be inside it: free it when the sample is done.
            job.pending.add_done_callback(lambda _: sampler.free())
            job.pending = job.pending_row = None
        elif sampler is not None:
            sampler.free()
        if job.media is not None:
            job.media.free()
        slot.job = None
        slot.last_used = time.perf_counter()
        self._requests_total += 1
        if self._proposer is not None:
            self._proposer.release(slot.seq_id)
        if error is not None:
            job.handle._fail(error)


def memory_summary(load_log: Sequence[str]) -> dict[str, float]:
    """MiB per buffer from llama.cpp's load log: model, KV cache, compute, output."""
    names = {"model": "model_mib", "output": "output_mib", "compute": "compute_mib"}
    summary: dict[str, float] = {}
    for buffer in logs.buffer_lines(load_log):
        if buffer.kind in names:  # KV buffers are counted from the cache's own size lines
            key = names[buffer.kind]
            summary[key] = round(summary.get(key, 0.0) + buffer.bytes / MIB, 2)
    for line in load_log:
        if "llama_kv_cache: size" in line:
            mib = float(line.split("=", 1)[1].split("MiB", 1)[0])
            summary["kv_cache_mib"] = summary.get("kv_cache_mib", 0.0) + mib
    return summary
