"""Write real GGUF files for tests and benchmarks: true architectures, header only or sparse.

`ArchSpec` holds a model's hyperparameters; `write_gguf` writes its metadata (with a tokenizer
llama.cpp accepts) and the tensor infos with llama.cpp's tensor names and shapes. With
`sparse=True` the file is then truncated to its full size, so the tensor data is a hole: llama.cpp
can load it (the data reads as zeros; llama.cpp never checks weights) while the disk holds only
the header. scripts/bench_fit.py and tests/test_fitter.py load such files with llama.cpp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

Q = GGMLQuantizationType


@dataclass(frozen=True)
class ArchSpec:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    head_dim: int | None = None  # key/value head size when not n_embd / n_head
    n_expert: int = 0
    n_expert_used: int = 0
    sliding_window: int = 0
    tied_output: bool = False
    name: str = "test model"

    @property
    def n_embd_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


LLAMA_7B = ArchSpec("llama", 32, 4096, 32, 32, 11008, 32000, 4096, name="llama 7B")
LLAMA_70B = ArchSpec("llama", 80, 8192, 64, 8, 28672, 128256, 131072, name="llama 70B")
MIXTRAL_8X7B = ArchSpec(
    "llama", 32, 4096, 32, 8, 14336, 32000, 32768, n_expert=8, n_expert_used=2, name="mixtral 8x7B"
)
GEMMA3_27B = ArchSpec(
    "gemma3",
    62,
    5376,
    32,
    16,
    21504,
    262144,
    131072,
    head_dim=128,
    sliding_window=1024,
    tied_output=True,
    name="gemma3 27B",
)
# Published models the GPU check loads (hyperparameters from their config.json files).
LLAMA31_8B = ArchSpec("llama", 32, 4096, 32, 8, 14336, 128256, 131072, name="Llama-3.1-8B")
LLAMA2_70B = ArchSpec("llama", 80, 8192, 64, 8, 28672, 32000, 4096, name="Llama-2-70B")
QWEN25_32B = ArchSpec("qwen2", 64, 5120, 40, 8, 27648, 152064, 32768, name="Qwen2.5-32B")
GEMMA3_270M = ArchSpec(
    "gemma3",
    18,
    640,
    4,
    1,
    2048,
    262144,
    32768,
    head_dim=256,
    sliding_window=512,
    tied_output=True,
    name="gemma3 270M",
)

# The main weight type of each file type, and the higher-precision type its "_M" mixes use for
# attn_v / ffn_down / output (a simplification of llama.cpp's per-tensor rules; tests compute
# expected sizes from the same table).
QUANT_MIX: dict[str, tuple[Q, Q]] = {
    "Q2_K": (Q.Q2_K, Q.Q4_K),
    "Q3_K_M": (Q.Q3_K, Q.Q5_K),
    "Q4_K_M": (Q.Q4_K, Q.Q6_K),
    "Q5_K_M": (Q.Q5_K, Q.Q6_K),
    "Q6_K": (Q.Q6_K, Q.Q6_K),
    "Q8_0": (Q.Q8_0, Q.Q8_0),
    "F16": (Q.F16, Q.F16),
    "Q4_0": (Q.Q4_0, Q.Q6_K),
    "IQ4_XS": (Q.IQ4_XS, Q.Q6_K),
}


def fit_type(qtype: Q, row: int) -> Q:
    """The type llama.cpp would fall back to when a row does not fill whole blocks."""
    for candidate in (qtype, Q.Q8_0, Q.F16):
        if row % GGML_QUANT_SIZES[candidate][0] == 0:
            return candidate
    return Q.F32


def tensor_bytes(qtype: Q, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def tensor_plan(spec: ArchSpec, quant: str) -> list[tuple[str, tuple[int, ...], Q]]:
    """(name, ggml shape, type) of every tensor llama.cpp expects for this architecture."""
    main, high = QUANT_MIX[quant]
    e, hd = spec.n_embd, spec.n_embd_head
    q_dim, kv_dim = spec.n_head * hd, spec.n_head_kv * hd
    out: list[tuple[str, tuple[int, ...], Q]] = []

    def add(name: str, shape: tuple[int, ...], qtype: Q) -> None:
        out.append((name, shape, Q.F32 if len(shape) == 1 else fit_type(qtype, shape[0])))

    add("token_embd.weight", (e, spec.n_vocab), main)
    add("output_norm.weight", (e,), Q.F32)
    if not spec.tied_output:
        add("output.weight", (e, spec.n_vocab), high)
    for il in range(spec.n_layer):
        p = f"blk.{il}."
        # llama.cpp's _M mixes raise attn_v and ffn_down in about half of the layers
        raised = high if il % 2 == 0 else main
        add(p + "attn_norm.weight", (e,), Q.F32)
        add(p + "attn_q.weight", (e, q_dim), main)
        add(p + "attn_k.weight", (e, kv_dim), main)
        add(p + "attn_v.weight", (e, kv_dim), raised)
        add(p + "attn_output.weight", (q_dim, e), main)
        if spec.arch == "qwen2":  # Qwen2 requires the q/k/v biases
            add(p + "attn_q.bias", (q_dim,), Q.F32)
            add(p + "attn_k.bias", (kv_dim,), Q.F32)
            add(p + "attn_v.bias", (kv_dim,), Q.F32)
        if spec.arch == "gemma3":
            add(p + "attn_q_norm.weight", (hd,), Q.F32)
            add(p + "attn_k_norm.weight", (hd,), Q.F32)
            add(p + "post_attention_norm.weight", (e,), Q.F32)
            add(p + "post_ffw_norm.weight", (e,), Q.F32)
        add(p + "ffn_norm.weight", (e,), Q.F32)
        if spec.n_expert:
            add(p + "ffn_gate_inp.weight", (e, spec.n_expert), Q.F32)
            add(p + "ffn_gate_exps.weight", (e, spec.n_ff, spec.n_expert), main)
            add(p + "ffn_up_exps.weight", (e, spec.n_ff, spec.n_expert), main)
            add(p + "ffn_down_exps.weight", (spec.n_ff, e, spec.n_expert), raised)
        else:
            add(p + "ffn_gate.weight", (e, spec.n_ff), main)
            add(p + "ffn_up.weight", (e, spec.n_ff), main)
            add(p + "ffn_down.weight", (spec.n_ff, e), raised)
    return out


def _add_metadata(writer: gguf.GGUFWriter, spec: ArchSpec, quant: str) -> None:
    a = spec.arch
    writer.add_string("general.name", spec.name)
    writer.add_uint32("general.file_type", LlamaFileType[f"MOSTLY_{quant}"].value)
    writer.add_uint32("general.quantization_version", 2)
    writer.add_uint32(f"{a}.context_length", spec.n_ctx_train)
    writer.add_uint32(f"{a}.embedding_length", spec.n_embd)
    writer.add_uint32(f"{a}.block_count", spec.n_layer)
    writer.add_uint32(f"{a}.feed_forward_length", spec.n_ff)
    writer.add_uint32(f"{a}.attention.head_count", spec.n_head)
    writer.add_uint32(f"{a}.attention.head_count_kv", spec.n_head_kv)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{a}.rope.freq_base", 10000.0)
    if spec.head_dim:
        writer.add_uint32(f"{a}.attention.key_length", spec.head_dim)
        writer.add_uint32(f"{a}.attention.value_length", spec.head_dim)
    else:
        writer.add_uint32(f"{a}.rope.dimension_count", spec.n_embd_head)
    if spec.sliding_window:
        writer.add_uint32(f"{a}.attention.sliding_window", spec.sliding_window)
    if spec.n_expert:
        writer.add_uint32(f"{a}.expert_count", spec.n_expert)
        writer.add_uint32(f"{a}.expert_used_count", spec.n_expert_used)
    add_test_tokenizer(writer, spec.n_vocab)


def write_gguf(
    path: Path,
    spec: ArchSpec,
    quant: str = "Q4_K_M",
    sparse: bool = True,
    chat_template: str | None = None,
) -> Path:
    """Write `spec` as a GGUF: header with every tensor info; data a hole (sparse) or absent."""
    writer = gguf.GGUFWriter(str(path), spec.arch)
    _add_metadata(writer, spec, quant)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return write_tensor_infos(writer, path, tensor_plan(spec, quant), sparse)


def write_tensor_infos(
    writer: gguf.GGUFWriter,
    path: Path,
    plan: list[tuple[str, tuple[int, ...], Q]],
    sparse: bool = True,
) -> Path:
    """Finish a GGUF: the tensor infos of `plan` (name, ggml shape, type), then the data a hole
    (sparse) or absent."""
    end = 0
    for name, shape, qtype in plan:
        nbytes = tensor_bytes(qtype, shape)
        # GGUFWriter takes numpy-order shapes (reversed ggml order), rows in bytes for raw types
        block, type_size = GGML_QUANT_SIZES[qtype]
        byte_shape = (*reversed(shape[1:]), shape[0] // block * type_size)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        end += -(-nbytes // 32) * 32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    if sparse:
        header = path.stat().st_size
        data_start = -(-header // 32) * 32
        os.truncate(path, data_start + end)
    return path


def scaled(spec: ArchSpec, **changes: int) -> ArchSpec:
    return replace(spec, **changes)  # type: ignore[arg-type]


# A 13B-class dense model: its F16 file does not fit a 24 GB card, its Q8_0 does.
LLAMA_13B = ArchSpec("llama", 40, 5120, 40, 40, 13824, 32000, 4096, name="llama 13B")

# The quants of a typical published ladder, best quality first.
LADDER_QUANTS: tuple[str, ...] = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


def write_ladder(
    folder: Path, spec: ArchSpec, quants: tuple[str, ...] = LADDER_QUANTS
) -> list[Path]:
    """One sparse GGUF per quant in `folder`, named like published repos (`model-Q4_K_M.gguf`)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = spec.name.replace(" ", "-")
    return [write_gguf(folder / f"{stem}-{quant}.gguf", spec, quant) for quant in quants]


# The models scripts/gpu_check.py loads, by the names its measurement files record (and
# tests/test_gpu_measurements.py rebuilds them by): published architectures for the GPU run,
# small ones of the same families for its --cpu run.
GPU_CHECK_MODELS: dict[str, ArchSpec] = {
    "llama-3.1-8b": LLAMA31_8B,
    "qwen2.5-32b": QWEN25_32B,
    "gemma-3-27b": GEMMA3_27B,
    "mixtral-8x7b": MIXTRAL_8X7B,
    "llama-2-70b": LLAMA2_70B,
}
CPU_CHECK_MODELS: dict[str, ArchSpec] = {
    "tiny-llama": ArchSpec("llama", 4, 512, 8, 2, 1536, 32000, 32768, name="tiny llama"),
    "tiny-qwen2": ArchSpec("qwen2", 4, 512, 8, 2, 1536, 32000, 32768, name="tiny qwen2"),
    "tiny-moe": ArchSpec(
        "llama", 4, 512, 8, 2, 1024, 32000, 32768, n_expert=4, n_expert_used=2, name="tiny moe"
    ),
    "tiny-gemma3": ArchSpec(
        "gemma3",
        6,
        640,
        4,
        1,
        2048,
        32000,
        32768,
        head_dim=256,
        sliding_window=512,
        tied_output=True,
        name="tiny gemma3",
    ),
}
CHECK_MODELS: dict[str, ArchSpec] = {**GPU_CHECK_MODELS, **CPU_CHECK_MODELS}


def write_bert(
    path: Path,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_ff: int = 128,
    n_vocab: int = 512,
    n_ctx_train: int = 128,
    pooling_type: int = 1,
    seed: int = 0,
) -> Path:
    """A tiny BERT-architecture embedding model with random F32 weights (data written, not a
    hole): llama.cpp runs it for real. The vocabulary is the SentencePiece-style one above, which
    llama.cpp accepts for any architecture. pooling_type: 1 mean, 2 cls, 4 rank (a reranker)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "bert")
    a = "bert"
    writer.add_string("general.name", "tiny bert")
    writer.add_uint32("general.file_type", LlamaFileType.ALL_F32.value)
    writer.add_uint32(f"{a}.context_length", n_ctx_train)
    writer.add_uint32(f"{a}.embedding_length", n_embd)
    writer.add_uint32(f"{a}.block_count", n_layer)
    writer.add_uint32(f"{a}.feed_forward_length", n_ff)
    writer.add_uint32(f"{a}.attention.head_count", n_head)
    writer.add_float32(f"{a}.attention.layer_norm_epsilon", 1e-12)
    writer.add_bool(f"{a}.attention.causal", False)
    writer.add_uint32(f"{a}.pooling_type", pooling_type)
    add_test_tokenizer(writer, n_vocab)
    writer.add_uint32("tokenizer.ggml.token_type_count", 2)

    def add(name: str, *numpy_shape: int, scale: float = 0.1, fill: float | None = None) -> None:
        if fill is not None:
            data = np.full(numpy_shape, fill, dtype=np.float32)
        else:
            data = (rng.standard_normal(numpy_shape) * scale).astype(np.float32)
        writer.add_tensor(name, data)

    # numpy shapes are ggml's reversed: ggml {n_embd, n_vocab} is (n_vocab, n_embd) here
    add("token_embd.weight", n_vocab, n_embd, scale=0.5)
    add("token_types.weight", 2, n_embd)
    add("position_embd.weight", n_ctx_train, n_embd)
    add("token_embd_norm.weight", n_embd, fill=1.0)
    add("token_embd_norm.bias", n_embd, fill=0.0)
    for il in range(n_layer):
        p = f"blk.{il}."
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(p + part + ".weight", n_embd, n_embd)
            add(p + part + ".bias", n_embd)
        add(p + "attn_output_norm.weight", n_embd, fill=1.0)
        add(p + "attn_output_norm.bias", n_embd, fill=0.0)
        add(p + "ffn_up.weight", n_ff, n_embd)
        add(p + "ffn_up.bias", n_ff)
        add(p + "ffn_down.weight", n_embd, n_ff)
        add(p + "ffn_down.bias", n_embd)
        add(p + "layer_output_norm.weight", n_embd, fill=1.0)
        add(p + "layer_output_norm.bias", n_embd, fill=0.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_test_tokenizer(writer: gguf.GGUFWriter, n_vocab: int) -> None:
    """A SentencePiece-style vocabulary llama.cpp accepts for any architecture: control tokens,
    byte tokens, the rest."""
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"t{i}".encode() for i in range(n_vocab - len(tokens))]
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", [0.0] * n_vocab)
    writer.add_array("tokenizer.ggml.token_type", [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
