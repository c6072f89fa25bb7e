"""How many bytes llama.cpp allocates, per device, for one configuration (pure arithmetic).

Follows llama.cpp's own rules (llama-context.cpp, llama-kv-cache.cpp, llama-kv-cache-iswa.cpp,
llama-model.cpp), checked against its dry-run figures by `scripts/bench_fit.py` (weights and KV
exact, compute within 8% over 25 configurations of five architectures):

- weights: each tensor's bytes from the header; the token embedding in host memory; layer il on
  the GPU when il >= n_layer + 1 - n_gpu_layers; the output layer (and, for tied embeddings, a
  duplicate of the token embedding) on the GPU only when n_gpu_layers > n_layer.
- KV cache: n_ctx padded to 256; per non-unified stream PAD(n_ctx / n_seq, 256) cells;
  sliding-window layers PAD(min(cells, n_swa * (unified ? n_seq : 1) + n_ubatch), 256) unless
  swa_full; row bytes of type_k / type_v from gguf's GGML_QUANT_SIZES.
- output buffer: n_vocab x max(n_outputs, n_seq) floats, in (pinned) host memory.
- compute buffer: the peak of llama.cpp's graph allocator over the phases of one micro-batch,
  fitted to the dry-run figures of five architectures (Gemma 3 270M / 27B, Llama 7B / 70B,
  Mixtral): the output phase holds the logits of every token of the micro-batch; the layer phase
  holds the KQ mask(s), the FFN intermediates (x n_expert_used for MoE) and, without flash
  attention, the KQ matrix of the widest layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

from localllm.architectures import arch_memory
from localllm.gguf_header import ModelHeader

KV_PAD = 256
# llama.cpp's LLM_KV_ATTENTION_RECURRENT_LAYERS; newer than the gguf package's Keys table
RECURRENT_LAYERS_KEY = "{arch}.attention.recurrent_layers"
F32_BYTES = 4


def row_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of `n_elements` values of a ggml type (ggml_row_size)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return n_elements // block * size


# ggml-cpu's repack (ggml/src/ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type): on x86
# with AVX2 the matrix weights (MoE experts too) of these types held in host memory are copied
# into an interleaved CPU_REPACK buffer of the same size when their row count is a multiple of 8
# (Gemma 3 270M Q4_K_M: its Q4_K tensors, 12.66 MiB, measured). The token embedding is read by
# row (GET_ROWS) and never repacked.
REPACK_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})


def repacked_bytes(ggml_type: str, shape: tuple[int, ...], n_bytes: int) -> int:
    repackable = ggml_type in REPACK_TYPES and len(shape) in (2, 3) and shape[1] % 8 == 0
    return n_bytes if repackable else 0


@dataclass(frozen=True)
class MemoryLayout:
    """Which layers llama.cpp gives a KV cache or a recurrent state, and how wide: its hparams
    (`llama-hparams.cpp`) and memory classes (`llama-kv-cache`, `-iswa`, `llama-memory-recurrent`,
    `llama-memory-hybrid`) as data, from the header and the architecture table."""

    n_layer_trunk: int  # layers the model runs; the last nextn_predict_layers are MTP blocks
    recurrent: tuple[bool, ...]  # per layer: holds a recurrent state
    attention: tuple[bool, ...]  # per layer: has its own KV cache
    swa: tuple[bool, ...]  # per layer: sliding-window (or chunked) attention
    n_swa: int  # the window (0: none)
    k_width: tuple[int, ...]  # per layer: K values per cell (n_head_kv x head width)
    v_width: tuple[int, ...]  # per layer: V values per cell (0 with MLA)
    v_width_max: int  # without flash attention every V row is padded to this
    state_r: int  # recurrent conv state per layer and sequence (f32 values)
    state_s: int  # recurrent ssm state per layer and sequence (f32 values)

    @property
    def has_swa(self) -> bool:
        return self.n_swa > 0 and any(s for s, a in zip(self.swa, self.attention, strict=True) if a)

    @property
    def has_full(self) -> bool:
        return any(a and not s for s, a in zip(self.swa, self.attention, strict=True))

    @property
    def n_recurrent(self) -> int:
        return sum(self.recurrent)


def _meta_int(header: ModelHeader, key: str, default: int = 0) -> int:
    value = header.metadata.get(key.format(arch=header.architecture))
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _meta_flags(header: ModelHeader, key: str) -> tuple[bool, ...] | None:
    value = header.metadata.get(key.format(arch=header.architecture))
    if not isinstance(value, tuple):
        return None
    flags = [bool(v) for v in value][: header.n_layer]
    return tuple(flags + [False] * (header.n_layer - len(flags)))  # llama.cpp's get_arr


def memory_layout(header: ModelHeader) -> MemoryLayout:
    arch = arch_memory(header.architecture)
    n_all = header.n_layer
    nextn = min(n_all, _meta_int(header, Keys.LLM.NEXTN_PREDICT_LAYERS))
    trunk = n_all - nextn
    kv, ff = header.n_head_kv, header.n_ff
    in_trunk = [il < trunk for il in range(n_all)]
    if arch.recurrent == "interval":
        explicit = _meta_flags(header, RECURRENT_LAYERS_KEY)
        every = _meta_int(header, Keys.LLM.FULL_ATTENTION_INTERVAL, 4) or 4
        recurrent = explicit or tuple(t and (il + 1) % every != 0 for il, t in enumerate(in_trunk))
    elif arch.recurrent == "no_kv":
        recurrent = tuple(t and kv[il] == 0 for il, t in enumerate(in_trunk))
    elif arch.recurrent == "no_kv_no_ff":
        recurrent = tuple(t and kv[il] == 0 and ff[il] == 0 for il, t in enumerate(in_trunk))
    elif arch.recurrent == "all":
        recurrent = tuple(in_trunk)
    else:
        recurrent = (False,) * n_all
    shared = _meta_int(header, Keys.Attention.SHARED_KV_LAYERS) if arch.shared_kv else 0
    attention = tuple(
        t and not arch.stateless and kv[il] > 0 and il < n_all - shared
        and (arch.attention_too or not recurrent[il])
        for il, t in enumerate(in_trunk)
    )
    n_swa = header.sliding_window
    if arch.swa_fixed_window:
        key = Keys.Attention.SLIDING_WINDOW.format(arch=header.architecture)
        n_swa = 0 if header.metadata.get(key) == 0 else arch.swa_fixed_window
    if not n_swa or (arch.swa_period is None and not arch.swa_attention_layers):
        swa: tuple[bool, ...] = (False,) * n_all
        n_swa = 0
    elif arch.swa_attention_layers:
        swa = tuple(not r and t for r, t in zip(recurrent, in_trunk, strict=True))
    else:
        pattern = header.metadata.get(
            Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=header.architecture))
        period = pattern if isinstance(pattern, int) and not isinstance(pattern, bool) else (
            arch.swa_period or 0)
        flags = _meta_flags(header, Keys.Attention.SLIDING_WINDOW_PATTERN)
        if flags is None:
            dense_first = arch.swa_dense_first
            flags = tuple(
                period == 0 or (il % period != 0 if dense_first else il % period < period - 1)
                for il in range(n_all))
        swa = tuple(f and t for f, t in zip(flags, in_trunk, strict=True))
    head_k, head_v = header.n_embd_head_k, header.n_embd_head_v
    head_k_swa = _meta_int(header, Keys.Attention.KEY_LENGTH_SWA, head_k)
    head_v_swa = _meta_int(header, Keys.Attention.VALUE_LENGTH_SWA, head_v)
    mla = bool(_meta_int(header, Keys.Attention.KEY_LENGTH_MLA))
    k_width = tuple((head_k_swa if swa[il] else head_k) * kv[il] for il in range(n_all))
    v_all = tuple((head_v_swa if swa[il] else head_v) * kv[il] for il in range(n_all))
    v_width = (0,) * n_all if mla else v_all
    # the recurrent state's sizes (hparams.n_embd_r / n_embd_s)
    d_conv = _meta_int(header, Keys.SSM.CONV_KERNEL)
    d_inner = _meta_int(header, Keys.SSM.INNER_SIZE)
    d_state = _meta_int(header, Keys.SSM.STATE_SIZE)
    n_group = _meta_int(header, Keys.SSM.GROUP_COUNT)
    l_cache = _meta_int(header, Keys.ShortConv.L_CACHE)
    if l_cache:
        state_r = header.n_embd * (l_cache - 1)
    else:
        state_r = max(0, d_conv - 1) * (d_inner + 2 * n_group * d_state)
    return MemoryLayout(
        n_layer_trunk=trunk,
        recurrent=tuple(recurrent),
        attention=attention,
        swa=swa,
        n_swa=n_swa,
        k_width=k_width,
        v_width=v_width,
        v_width_max=max(v_all, default=0),
        state_r=state_r,
        state_s=d_state * d_inner,
    )


@dataclass(frozen=True)
class _TensorSpan:
    split: int
    start: int  # offset in its file's data section
    end: int
    layer: int | None
    expert: bool
    output: bool  # output.weight / output_norm.*
    repacked: bool


def pad(value: int, to: int = KV_PAD) -> int:
    return -(-value // to) * to


class HeaderFacts:
    """Per-layer sums of one header, computed once (a ladder fit reuses them many times)."""

    def __init__(self, header: ModelHeader, load_mtp: bool = False) -> None:
        self.header = header
        self.layout = memory_layout(header)
        n = header.n_layer
        # MTP (nextn) blocks: llama.cpp creates them with TENSOR_SKIP unless load_mtp is set;
        # loaded, they sit with the last layers (the device of their layer index)
        trunk = n if load_mtp else self.layout.n_layer_trunk
        self.mtp_bytes = sum(
            t.n_bytes for t in header.tensors
            if t.layer is not None and self.layout.n_layer_trunk <= t.layer < n)
        self.skipped_bytes = sum(
            t.n_bytes for t in header.tensors if t.layer is not None and trunk <= t.layer < n)
        layer_bytes = [0] * n
        expert_bytes = [0] * n
        layer_elements = [0] * n
        expert_elements = [0] * n
        token_embd_bytes = output_bytes = other_bytes = 0
        output_elements = 0
        has_output = False
        token_embd_elements = 0
        for tensor in header.tensors:
            layer = tensor.layer
            if layer is not None and trunk <= layer < n:
                continue
            if layer is not None and layer < n:
                layer_bytes[layer] += tensor.n_bytes
                layer_elements[layer] += tensor.n_elements
                if "_exps" in tensor.name:
                    expert_bytes[layer] += tensor.n_bytes
                    expert_elements[layer] += tensor.n_elements
            elif tensor.name == "token_embd.weight":
                token_embd_bytes += tensor.n_bytes
                token_embd_elements += tensor.n_elements
            elif tensor.name.startswith("output"):  # output.weight, output_norm.*
                output_bytes += tensor.n_bytes
                output_elements += tensor.n_elements
                has_output = has_output or tensor.name == "output.weight"
            else:
                other_bytes += tensor.n_bytes
        self.layer_bytes = tuple(layer_bytes)
        self.expert_bytes = tuple(expert_bytes)
        self.layer_elements = tuple(layer_elements)
        self.expert_elements = tuple(expert_elements)
        self.token_embd_bytes = token_embd_bytes
        self.output_tied = not has_output
        # What the output layer puts on its device: with tied embeddings llama.cpp loads a
        # duplicate of the token embedding there (TENSOR_DUPLICATED).
        self.output_bytes = output_bytes + (token_embd_bytes if self.output_tied else 0)
        self.output_elements = output_elements + (token_embd_elements if self.output_tied else 0)
        self.other_bytes = other_bytes
        self.total_bytes = header.total_bytes - self.skipped_bytes  # what llama.cpp loads
        self.spans = tuple(
            _TensorSpan(
                t.split_index,
                t.offset,
                t.offset + t.n_bytes,
                t.layer if t.layer is not None and t.layer < n else None,
                "_exps" in t.name,
                t.name.startswith("output"),
                t.name != "token_embd.weight"
                and bool(repacked_bytes(t.ggml_type, t.shape, t.n_bytes)),
            )
            for t in header.tensors
            if t.layer is None or not trunk <= t.layer < n
        )

    def repacked_host_bytes(
        self, layer_on_host: Sequence[bool], experts_on_host: Sequence[bool], output_on_host: bool
    ) -> int:
        """Host weights with repacking on, as llama.cpp allocates them: the repacked tensors in
        CPU_REPACK, and one CPU_Mapped mapping per file from the first to the last host tensor
        it does not repack (llama-model-loader.cpp get_mapping_range), so a repacked tensor at
        either end of the file is held once, one in the middle twice."""
        mapped: dict[int, tuple[int, int]] = {}
        repacked = 0
        for span in self.spans:
            if span.layer is not None:
                on_host = (experts_on_host if span.expert else layer_on_host)[span.layer]
            else:
                on_host = output_on_host if span.output else True
            if not on_host:
                continue
            if span.repacked:
                repacked += span.end - span.start
                continue
            low, high = mapped.get(span.split, (span.start, span.end))
            mapped[span.split] = (min(low, span.start), max(high, span.end))
        return repacked + sum(high - low for low, high in mapped.values())

    @cached_property
    def max_n_head(self) -> int:
        return max(self.header.n_head, default=0)

    @cached_property
    def max_n_ff(self) -> int:
        return max(self.header.n_ff, default=0)


@dataclass(frozen=True)
class ContextShape:
    """The context llama.cpp really builds from the requested one."""

    n_ctx: int  # total, after padding (and rounding to a multiple of n_seq when not unified)
    n_seq: int
    unified: bool
    n_ubatch: int  # effective micro-batch
    n_batch: int
    cells: int  # per stream, full-attention layers
    swa_cells: int  # per stream, sliding-window layers
    n_streams: int


def context_shape(
    header: ModelHeader,
    n_ctx: int,
    n_seq: int = 1,
    n_ubatch: int = 512,
    n_batch: int = 2048,
    swa_full: bool = True,
    unified: bool = False,
    layout: MemoryLayout | None = None,
) -> ContextShape:
    n_ctx = pad(n_ctx)
    if unified:
        cells = n_ctx
    else:
        cells = pad(n_ctx // n_seq)
        n_ctx = cells * n_seq
    batch = min(n_ctx, n_batch)  # causal attention: a batch never exceeds the context
    ubatch = min(batch, n_ubatch)
    swa_cells = cells
    layout = memory_layout(header) if layout is None else layout
    if layout.has_swa and not swa_full:
        swa_cells = pad(min(cells, layout.n_swa * (n_seq if unified else 1) + ubatch))
    streams = 1 if unified else n_seq
    return ContextShape(n_ctx, n_seq, unified, ubatch, batch, cells, swa_cells, streams)


def _kv_cell_bytes(
    layout: MemoryLayout, il: int, type_k: str, type_v: str, flash_attn: bool
) -> int:
    """One cell of layer il: its K row and V row. Without flash attention V is stored transposed
    and padded to the widest layer's V (llama-kv-cache.cpp, TAG_V_CACHE_VARIABLE)."""
    v_width = layout.v_width[il]
    if v_width and not flash_attn:
        v_width = layout.v_width_max
    return row_bytes(type_k, layout.k_width[il]) + (row_bytes(type_v, v_width) if v_width else 0)


def kv_layer_bytes(
    header: ModelHeader,
    shape: ContextShape,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = True,
    layout: MemoryLayout | None = None,
) -> tuple[int, ...]:
    """KV cache bytes of each layer (all streams); 0 for layers without a cache of their own
    (recurrent, shared-KV and MTP layers). Without flash attention V is stored transposed and
    padded to the widest layer's V (llama-kv-cache.cpp, TAG_V_CACHE_VARIABLE)."""
    layout = memory_layout(header) if layout is None else layout
    sizes = []
    for il in range(header.n_layer):
        if not layout.attention[il]:
            sizes.append(0)
            continue
        cells = shape.swa_cells if layout.swa[il] else shape.cells
        per_cell = _kv_cell_bytes(layout, il, type_k, type_v, flash_attn)
        sizes.append(per_cell * cells * shape.n_streams)
    return tuple(sizes)


def mtp_kv_layer_bytes(
    header: ModelHeader,
    shape: ContextShape,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = True,
    layout: MemoryLayout | None = None,
) -> tuple[int, ...]:
    """KV cache bytes of each layer in the MTP draft context (`LLAMA_CONTEXT_TYPE_MTP`, made
    with the target's n_ctx and sequences): the MTP blocks' layers, full attention, as wide as
    the model's attention layers; 0 for every trunk layer."""
    layout = memory_layout(header) if layout is None else layout
    sizes = []
    for il in range(header.n_layer):
        if il < layout.n_layer_trunk:
            sizes.append(0)
            continue
        per_cell = _kv_cell_bytes(layout, il, type_k, type_v, flash_attn)
        sizes.append(per_cell * shape.cells * shape.n_streams)
    return tuple(sizes)


def state_layer_bytes(
    header: ModelHeader, n_seq: int, layout: MemoryLayout | None = None
) -> tuple[int, ...]:
    """Recurrent state bytes of each layer (llama-memory-recurrent: an r and an s row of f32
    per sequence, whatever the context length); 0 for layers without one."""
    layout = memory_layout(header) if layout is None else layout
    per_seq = (layout.state_r + layout.state_s) * F32_BYTES
    return tuple(per_seq * max(1, n_seq) if r else 0 for r in layout.recurrent)


def output_buffer_bytes(header: ModelHeader, n_seq: int) -> int:
    """llama.cpp's output (logits) buffer at context creation: n_vocab x n_seq floats."""
    return header.n_vocab * max(1, n_seq) * F32_BYTES


@dataclass(frozen=True)
class ComputePhases:
    """Peak bytes of the compute graph's phases for one micro-batch."""

    output_bytes: int  # logits phase (the output projection of every micro-batch token)
    layer_bytes: int  # repeating-layer phase (FFN / attention), including the KQ masks
    mask_bytes: int
    input_bytes: int  # token embeddings of the micro-batch (host side of a GPU run)
    dense_layer_bytes: int = 0  # the attention / FFN phase alone (no recurrent layer)

    @property
    def mtp_bytes(self) -> int:
        """The MTP draft context's compute buffer: one attention + FFN block and the logits of
        a micro-batch, no recurrent layer (measured against llama.cpp: within 10%)."""
        return max(self.output_bytes, self.dense_layer_bytes)

    @property
    def peak_bytes(self) -> int:
        return max(self.output_bytes, self.layer_bytes)


def _ffn_floats(facts: HeaderFacts) -> int:
    """Per-token intermediates of the widest FFN: a dense one (gate, up, activation), or a MoE
    one (those for each used expert, each expert's output row, the shared expert)."""
    header = facts.header
    dense = max((ff for ff, e in zip(header.n_ff, facts.expert_bytes, strict=True) if not e),
                default=0)
    floats = 3 * dense
    if header.n_expert and any(facts.expert_bytes):
        n_ff_exp = _meta_int(header, Keys.LLM.EXPERT_FEED_FORWARD_LENGTH) or facts.max_n_ff
        n_ff_shexp = _meta_int(header, Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH) or (
            n_ff_exp * _meta_int(header, Keys.LLM.EXPERT_SHARED_COUNT))
        used = header.n_expert_used
        floats = max(floats, 3 * n_ff_exp * used + header.n_embd * used + 3 * n_ff_shexp)
    return floats


def _recurrent_floats(header: ModelHeader) -> int:
    """Per-token intermediates of a Mamba2 / Gated DeltaNet layer: the input projection, the
    convolution's input and output, the scan's output."""
    d_inner = _meta_int(header, Keys.SSM.INNER_SIZE)
    groups = 2 * _meta_int(header, Keys.SSM.GROUP_COUNT) * _meta_int(header, Keys.SSM.STATE_SIZE)
    in_proj = 2 * d_inner + groups + _meta_int(header, Keys.SSM.TIME_STEP_RANK)
    return in_proj + 3 * (d_inner + groups) + d_inner


def compute_phases(
    facts: HeaderFacts, shape: ContextShape, flash_attn: bool
) -> ComputePhases:
    header = facts.header
    ub = shape.n_ubatch
    n_embd = header.n_embd
    mask_elem = 2 if flash_attn else F32_BYTES  # flash attention takes an f16 mask
    layout = facts.layout
    has_swa = layout.has_swa
    has_full = layout.has_full
    mask_cells = (shape.cells if has_full else 0) + (shape.swa_cells if has_swa else 0)
    mask = mask_cells * ub * mask_elem
    output = (header.n_vocab + 2 * n_embd) * ub * F32_BYTES
    ffn = mask + (_ffn_floats(facts) + 4 * n_embd + header.n_expert) * ub * F32_BYTES
    # per-layer input embeddings (Gemma 3n / 4) live through the whole layer stack
    per_layer = _meta_int(header, Keys.LLM.EMBD_LENGTH_PER_LAYER_INP) * header.n_layer
    ffn += per_layer * ub * F32_BYTES
    # MLA attends with the decompressed head width (key_length_mla), not the cached latent's
    head_k = _meta_int(header, Keys.Attention.KEY_LENGTH_MLA) or header.n_embd_head_k
    n_q = facts.max_n_head * head_k
    n_kv_width = max(
        (w for w, a in zip(layout.k_width, layout.attention, strict=True) if a), default=0)
    attention = mask + (5 * n_q + 2 * n_kv_width + per_layer) * ub * F32_BYTES
    if not flash_attn:
        widest_cells = shape.cells if has_full else shape.swa_cells
        attention += facts.max_n_head * widest_cells * ub * F32_BYTES
    recurrent = 0
    if layout.n_recurrent:  # the layer's intermediates, and its state of every sequence
        state = (layout.state_r + layout.state_s) * shape.n_seq
        recurrent = mask + (_recurrent_floats(header) * ub + state) * F32_BYTES
    return ComputePhases(
        output_bytes=output,
        layer_bytes=max(ffn, attention, recurrent),
        mask_bytes=mask,
        input_bytes=n_embd * ub * F32_BYTES,
        dense_layer_bytes=max(ffn, attention),
    )


# ---------------------------------------------------------------- context checkpoints
# The engine's checkpoints (localllm.engine.checkpoints) copy the part of a sequence's memory
# that cannot be cut back, llama.cpp's PARTIAL_ONLY state, into host memory:
# llama_kv_cache::state_write for the sliding-window cache (the cells still inside the window:
# n_swa), llama_memory_recurrent::state_write for the recurrent state (f32 r and s rows).
STATE_CELL_META_BYTES = 12  # pos, n_seq_id, seq_id per cell
STATE_LAYER_META_BYTES = 32  # type and row size of each tensor of a layer
STATE_HEADER_BYTES = 64  # counts and flags of the state as a whole


def recurrent_layers(header: ModelHeader) -> tuple[bool, ...]:
    """Which layers keep a recurrent state (MemoryLayout.recurrent)."""
    return memory_layout(header).recurrent


def recurrent_state_bytes(header: ModelHeader) -> int:
    """One sequence's recurrent state over all layers, as llama_memory_recurrent::state_write
    writes it (f32 r and s rows, and each layer's tensor descriptions)."""
    layout = memory_layout(header)
    data = sum(state_layer_bytes(header, 1, layout))
    return data + STATE_LAYER_META_BYTES * layout.n_recurrent


def checkpoint_bytes(
    header: ModelHeader, swa_full: bool, type_k: str = "f16", type_v: str = "f16"
) -> int:
    """Host bytes of one context checkpoint of one sequence (0: the model needs none)."""
    total = recurrent_state_bytes(header)
    layout = memory_layout(header)
    if layout.has_swa and not swa_full:
        swa = [il for il in range(header.n_layer) if layout.swa[il] and layout.attention[il]]
        per_cell = STATE_CELL_META_BYTES + sum(
            row_bytes(type_k, layout.k_width[il])
            + (row_bytes(type_v, layout.v_width[il]) if layout.v_width[il] else 0)
            for il in swa
        )
        total += per_cell * layout.n_swa + STATE_LAYER_META_BYTES * len(swa)
    return total + STATE_HEADER_BYTES if total else 0


def checkpoints_total_bytes(
    header: ModelHeader,
    n_seq: int,
    ctx_checkpoints: int,
    swa_full: bool,
    type_k: str = "f16",
    type_v: str = "f16",
) -> int:
    """Host bytes every slot's checkpoints may hold together (the engine's limit per slot)."""
    return n_seq * ctx_checkpoints * checkpoint_bytes(header, swa_full, type_k, type_v)
