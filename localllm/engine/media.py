"""Images in prompts: the vision projector (llama.cpp's mtmd), loaded with the model.

A prompt with images becomes, through `mtmd_tokenize`, text tokens and image chunks. The engine
keeps one token list per prompt as before; an image's positions hold a placeholder id derived
from the image's sha256 (a negative number, never a vocabulary id), the same for every one of its
positions, as llama-server keys images by their hash. So the scheduler's prefix matching works
unchanged: a later turn that repeats the same image in its history shares those positions with
the slot's cache and reuses their KV cells, and the image is not encoded again. A cut never lands
inside an image (`MediaPrompt.align`): its tokens go into the sequence together.

Encoding an image (the vision tower: seconds on a CPU for a large one) runs on this module's own
worker thread, while the scheduler keeps decoding the other slots; the scheduler then decodes the
image's embeddings into the slot's sequence in one batch of their own (`decode_image`), with
non-causal attention where the model wants it (Gemma 3: an image's tokens see each other, so they
must be in one micro-batch). M-RoPE models (Qwen2-VL, Qwen2.5-VL) place an image's tokens on a 2D
grid of positions (mtmd's decoder positions) that advances by max(width, height) rather than by its
token count: the text after such an image sits `shift` positions below its index in the token
list (`MediaPrompt.shift_before`), and cuts of the memory go through `ShiftedMemory`.

Thread use: `prompt` (tokenizing, decoding the image file) runs on the submitting thread and
`encode` on the worker, one at a time under one lock (they share mtmd's context); `decode_image`
on the scheduler thread touches only the llama context.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from localllm.engine import logs
from localllm.errors import ModelLoadError, RequestError
from localllm.vision.images import MEDIA_MARKER

log = logging.getLogger(__name__)


def _mtmd() -> Any:
    import llama_cpp.mtmd_cpp as mtmd

    return mtmd


def image_key(data: bytes) -> int:
    """The placeholder id of an image's positions: negative, from its sha256."""
    return -1 - (int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 2)


@dataclass(eq=False)
class ImageSpan:
    """One image's positions in a prompt: [start, start + n_tokens)."""

    start: int
    n_tokens: int
    key: int
    chunk: Any  # the mtmd_input_chunk (owned by MediaPrompt's chunk list)
    non_causal: bool
    n_pos: int = 0  # positions it takes (M-RoPE: max(width, height) in tokens; else n_tokens)
    embd: Future[npt.NDArray[np.float32]] | None = None  # set when its encode is queued

    @property
    def end(self) -> int:
        return self.start + self.n_tokens

    def ready(self) -> bool:
        return self.embd is not None and self.embd.done()


@dataclass(eq=False)
class MediaPrompt:
    """A tokenized prompt with images; free() it once (its chunks may still be encoding)."""

    tokens: list[int]
    spans: list[ImageSpan]
    chunks: Any  # mtmd_input_chunks
    _freed: bool = field(default=False, init=False)

    def at(self, pos: int) -> ImageSpan | None:
        """The image that starts at prompt position `pos`."""
        return next((s for s in self.spans if s.start == pos), None)

    def next_start(self, pos: int) -> int | None:
        """The first image start at or after `pos`."""
        return next((s.start for s in self.spans if s.start >= pos), None)

    def align(self, n_keep: int) -> int:
        """n_keep, moved back to the start of an image it would cut."""
        for span in self.spans:
            if span.start < n_keep < span.end:
                return span.start
        return n_keep

    def shift_before(self, index: int) -> int:
        """How far the position of prompt index `index` lies below it: what the (M-RoPE) images
        before it take fewer positions than tokens."""
        return sum(s.n_tokens - s.n_pos for s in self.spans if s.end <= index)

    @property
    def shifts(self) -> bool:
        return any(s.n_pos != s.n_tokens for s in self.spans)

    def checkpoints(self, positions: Sequence[int]) -> tuple[int, ...]:
        """Checkpoint positions moved out of images (an image is decoded at once)."""
        return tuple(sorted({self.align(p) for p in positions}))

    def free(self) -> None:
        """Release the chunks once no encode uses them (cancelled ones never will)."""
        if self._freed:
            return
        self._freed = True
        running = [s.embd for s in self.spans if s.embd is not None and not s.embd.cancel()]
        running = [f for f in running if not f.done()]
        if not running:
            _mtmd().mtmd_input_chunks_free(self.chunks)
            return
        left = [len(running)]
        lock = threading.Lock()

        def done(_: object) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                _mtmd().mtmd_input_chunks_free(self.chunks)

        for future in running:
            future.add_done_callback(done)


class MediaContext:
    """A vision projector loaded beside a model (`mtmd_init_from_file`); close() it before the
    model is freed."""

    def __init__(
        self,
        model: Any,
        path: Path,
        *,
        use_gpu: bool,
        n_threads: int | None,
        flash_attn: bool | None,
        n_ubatch: int,
        n_batch: int | None = None,
    ) -> None:
        mtmd = _mtmd()
        self.path = Path(path)
        self.n_ubatch = n_ubatch
        self.n_batch = n_batch or n_ubatch  # the most embeddings one llama_decode takes
        if not self.path.is_file():
            raise ModelLoadError(
                f"vision projector {self.path} does not exist: give another with --mmproj, or "
                "--no-mmproj to serve the model without images"
            )
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads or os.cpu_count() or 1
        params.flash_attn_type = {None: -1, False: 0, True: 1}[flash_attn]
        params.print_timings = False
        params.warmup = True
        self._lock = threading.Lock()
        with logs.capture() as lines:
            # clip has its own logger: route it through the engine's capture like llama.cpp's
            mtmd.mtmd_log_set(logs._callback, ctypes.c_void_p(0))
            self.ctx = mtmd.mtmd_init_from_file(str(self.path).encode(), model, params)
        self.load_log: list[str] = lines
        if not self.ctx:
            raise ModelLoadError(
                f"llama.cpp could not load the vision projector {self.path} for this model "
                "(see the log above: a projector of another model, or a damaged file); give the "
                "right one with --mmproj, or --no-mmproj to serve without images"
            )
        if not mtmd.mtmd_support_vision(self.ctx):
            mtmd.mtmd_free(self.ctx)
            self.ctx = None
            raise ModelLoadError(
                f"{self.path} is not a vision projector (audio only?); serve with --no-mmproj"
            )
        marker = (mtmd.mtmd_default_marker() or b"").decode()
        if marker != MEDIA_MARKER:  # the HTTP layer writes MEDIA_MARKER into messages
            log.warning("mtmd's default media marker is %r, not %r", marker, MEDIA_MARKER)
        self.uses_mrope = bool(mtmd.mtmd_decode_use_mrope(self.ctx))
        self.n_embd = int(_llama().llama_model_n_embd_inp(model))
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="localllm-vision")
        self.encodes = 0  # images encoded, for stats (the worker writes it)

    # ------------------------------------------------------------------ submitting thread

    def prompt(
        self, text: str, images: Sequence[bytes], add_special: bool, parse_special: bool
    ) -> MediaPrompt:
        """Tokenize text holding one MEDIA_MARKER per image, in order."""
        mtmd = _mtmd()
        n_markers = text.count(MEDIA_MARKER)
        if n_markers != len(images):
            raise RequestError(
                f"the prompt has {n_markers} image markers ({MEDIA_MARKER}) for {len(images)} "
                "images; remove the marker text from the messages",
                param="messages",
            )
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(images)))()
        made: list[Any] = []
        chunks = None
        data = text.encode("utf-8")
        try:
            with self._lock:
                for i, image in enumerate(images):
                    buf = (ctypes.c_uint8 * len(image)).from_buffer_copy(image)
                    bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self.ctx, buf, len(image), False)
                    if not bitmap:
                        raise RequestError(
                            f"image {i} cannot be decoded (a truncated or damaged file)",
                            param="messages",
                        )
                    made.append(bitmap)
                    bitmaps[i] = bitmap
                chunks = mtmd.mtmd_input_chunks_init()
                text_in = mtmd.mtmd_input_text(
                    text=data, text_len=len(data), add_special=add_special,
                    parse_special=parse_special,
                )
                status = mtmd.mtmd_tokenize(
                    self.ctx, chunks, ctypes.byref(text_in), bitmaps, len(images)
                )
            if status != 0:
                raise RequestError(
                    f"llama.cpp could not tokenize the prompt with its images (status {status})",
                    param="messages",
                )
            return self._prompt_from_chunks(chunks, images)
        except BaseException:
            if chunks is not None:
                mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            for bitmap in made:
                mtmd.mtmd_bitmap_free(bitmap)

    def _prompt_from_chunks(self, chunks: Any, images: Sequence[bytes]) -> MediaPrompt:
        mtmd = _mtmd()
        tokens: list[int] = []
        spans: list[ImageSpan] = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens.extend(pointer[: n.value])
                continue
            if kind != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                raise RequestError("only images are served, not audio", param="messages")
            n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            key = image_key(images[len(spans)])
            non_causal = bool(mtmd.mtmd_decode_use_non_causal(self.ctx, chunk))
            if non_causal and n_tokens > self.n_ubatch:
                raise RequestError(
                    f"an image is {n_tokens} tokens, and this model must see them in one "
                    f"micro-batch of at most n_ubatch = {self.n_ubatch}; serve with a larger "
                    "--ubatch-size",
                    param="messages",
                )
            n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
            spans.append(ImageSpan(len(tokens), n_tokens, key, chunk, non_causal, n_pos))
            tokens.extend([key] * n_tokens)
        if spans and spans[-1].end == len(tokens):
            raise RequestError(
                "the prompt ends with an image: add text after it", param="messages"
            )
        return MediaPrompt(tokens, spans, chunks)

    # ------------------------------------------------------------------ worker thread

    def encode_later(self, span: ImageSpan, on_done: Any) -> None:
        """Queue the span's encode on the worker; on_done(future) when it is done."""
        span.embd = self._worker.submit(self._encode, span.chunk, span.n_tokens)
        span.embd.add_done_callback(on_done)

    def _encode(self, chunk: Any, n_tokens: int) -> npt.NDArray[np.float32]:
        mtmd = _mtmd()
        with self._lock:
            status = mtmd.mtmd_encode_chunk(self.ctx, chunk)
            if status != 0:
                raise RequestError(f"llama.cpp could not encode an image (status {status})")
            pointer = mtmd.mtmd_get_output_embd(self.ctx)
            # mtmd reuses this buffer for the next image: copy it now
            embd = np.ctypeslib.as_array(pointer, shape=(n_tokens * self.n_embd,)).copy()
            self.encodes += 1
        return embd

    # ------------------------------------------------------------------ scheduler thread

    def decode_image(self, backend: Any, span: ImageSpan, pos: int, seq_id: int) -> int:
        """Decode an encoded image's embeddings at positions pos.. of a sequence (batches of at
        most n_batch; a non-causal image is one, `prompt` checked it fits a micro-batch);
        llama_decode's status."""
        assert span.embd is not None
        embd = span.embd.result().reshape(span.n_tokens, self.n_embd)
        mtmd = _mtmd()
        if self.uses_mrope:
            image = mtmd.mtmd_input_chunk_get_tokens_image(span.chunk)
            at = [mtmd.mtmd_image_tokens_get_decoder_pos(image, pos, i) for i in range(len(embd))]
            positions = [[p.t for p in at], [p.y for p in at], [p.x for p in at], [p.z for p in at]]
        else:
            positions = [list(range(pos, pos + len(embd)))]
        llama = _llama()
        if span.non_causal:
            llama.llama_set_causal_attn(backend.ctx, False)
        try:
            for first in range(0, len(embd), self.n_batch):
                last = min(len(embd), first + self.n_batch)
                rows = [section[first:last] for section in positions]
                status = self._decode_rows(backend, embd[first:last], rows, seq_id)
                if status != 0:
                    return status
        finally:
            if span.non_causal:
                llama.llama_set_causal_attn(backend.ctx, True)
        span.embd = None  # the cells hold it now; keep the memory free
        return 0

    def _decode_rows(
        self, backend: Any, embd: npt.NDArray[np.float32], positions: list[list[int]], seq_id: int
    ) -> int:
        llama = _llama()
        n = len(embd)
        # M-RoPE: four positions per embedding, section-major (t, y, x, z), as mtmd's helper
        batch = llama.llama_batch_init(n * len(positions), self.n_embd, 1)
        try:
            rows = np.ascontiguousarray(embd, dtype=np.float32)
            ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            for j, section in enumerate(positions):
                for i, p in enumerate(section):
                    batch.pos[j * n + i] = p
            for i in range(n):
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = 0
            batch.n_tokens = n
            status: int = llama.llama_decode(backend.ctx, batch)
        finally:
            llama.llama_batch_free(batch)
        return status

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self.ctx is not None:
            _mtmd().mtmd_free(self.ctx)
            self.ctx = None


class ShiftedMemory:
    """The backend's memory calls for a prompt whose M-RoPE images take fewer positions than
    tokens: cuts given as prompt indices (`checkpoints.cut_to_prefix`) go to the positions."""

    def __init__(self, backend: Any, prompt: MediaPrompt) -> None:
        self._backend = backend
        self._prompt = prompt
        self.n_swa: int = backend.n_swa
        self.recurrent: bool = backend.recurrent

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        shift = self._prompt.shift_before
        p0 = p0 - shift(p0) if p0 > 0 else p0
        p1 = p1 - shift(p1) if p1 > 0 else p1
        return bool(self._backend.seq_rm(seq_id, p0, p1))

    def seq_pos_min(self, seq_id: int) -> int:
        # as an index: at least this far on (the most any cut can shift), so a sliding-window
        # check errs towards restoring a checkpoint
        pos = int(self._backend.seq_pos_min(seq_id))
        return pos + self._prompt.shift_before(len(self._prompt.tokens)) if pos >= 0 else pos

    def partial_state(self, seq_id: int) -> bytes:
        data: bytes = self._backend.partial_state(seq_id)
        return data

    def restore_partial_state(self, seq_id: int, data: bytes) -> bool:
        return bool(self._backend.restore_partial_state(seq_id, data))


def _llama() -> Any:
    import llama_cpp

    return llama_cpp
