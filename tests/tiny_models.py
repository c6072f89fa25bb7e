"""Tiny GGUFs of the 2026 architectures with random weights (real tensor data, small dimensions).

llama.cpp runs them for real: the text is garbage, but every path of the engine runs (hybrid
recurrent memory, sliding-window caches, context checkpoints). Tensor names and shapes follow
llama.cpp's loaders (`src/models/<arch>.cpp`, `load_arch_tensors`); the vocabulary is
`gguf_factory`'s SentencePiece-style one, which llama.cpp accepts for any architecture.

- `write_qwen35`: Qwen3.5's Gated DeltaNet hybrid: three recurrent layers, then one attention
  layer (`full_attention_interval` 4), gated queries, interleaved M-RoPE sections.
- `write_gemma3_swa`: Gemma 3 with a short sliding window (5 of 6 layers slide), so that a chat of
  a few hundred tokens overwrites the small sliding-window cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from tests.gguf_factory import ArchSpec, _add_metadata, tensor_plan

N_VOCAB = 512


@dataclass(frozen=True)
class TinyModel:
    arch: str
    path: Path
    hybrid: bool  # recurrent layers beside attention ones
    sliding_window: int  # 0: none


class _Tensors:
    """Random tensors in ggml shape order ({ne0, ne1, ...}), stored as numpy (reversed) arrays."""

    def __init__(self, writer: gguf.GGUFWriter, seed: int) -> None:
        self.writer = writer
        self.rng = np.random.default_rng(seed)

    def add(
        self,
        name: str,
        ggml_shape: tuple[int, ...],
        scale: float = 0.05,
        fill: float | None = None,
        dtype: type = np.float32,
    ) -> None:
        shape = tuple(reversed(ggml_shape))
        if fill is not None:
            data = np.full(shape, fill, dtype=np.float32)
        else:
            data = self.rng.standard_normal(shape).astype(np.float32) * scale
        self.writer.add_tensor(name, data.astype(dtype if len(shape) > 1 else np.float32))


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


QWEN35_SPEC = ArchSpec(
    "qwen35", 4, 64, 4, 2, 128, N_VOCAB, 4096, head_dim=16, name="tiny qwen35"
)
# Gated DeltaNet: d_state is the head width of keys and values, group_count the key heads,
# time_step_rank the value heads; inner_size = value heads x head width.
QWEN35_SSM = {"conv_kernel": 4, "state_size": 16, "group_count": 2, "time_step_rank": 4}


def write_qwen35(path: Path, seed: int = 0) -> TinyModel:
    spec = QWEN35_SPEC
    ssm = QWEN35_SSM
    writer = gguf.GGUFWriter(str(path), spec.arch)
    _add_metadata(writer, spec, "F16")
    a = spec.arch
    head_k = head_v = ssm["state_size"]
    n_k_heads, n_v_heads = ssm["group_count"], ssm["time_step_rank"]
    key_dim, value_dim = head_k * n_k_heads, head_v * n_v_heads
    conv_dim = 2 * key_dim + value_dim
    writer.add_uint32(f"{a}.ssm.conv_kernel", ssm["conv_kernel"])
    writer.add_uint32(f"{a}.ssm.state_size", ssm["state_size"])
    writer.add_uint32(f"{a}.ssm.group_count", n_k_heads)
    writer.add_uint32(f"{a}.ssm.time_step_rank", n_v_heads)
    writer.add_uint32(f"{a}.ssm.inner_size", value_dim)
    writer.add_uint32(f"{a}.full_attention_interval", 4)
    writer.add_uint32(f"{a}.rope.dimension_count", spec.n_embd_head)
    writer.add_array(f"{a}.rope.dimension_sections", [3, 3, 2, 0])  # n_rot / 2 in all
    t = _Tensors(writer, seed)
    e, hd = spec.n_embd, spec.n_embd_head
    t.add("token_embd.weight", (e, spec.n_vocab), scale=0.5, dtype=np.float16)
    t.add("output_norm.weight", (e,), fill=1.0)
    t.add("output.weight", (e, spec.n_vocab), dtype=np.float16)
    for il in range(spec.n_layer):
        p = f"blk.{il}."
        t.add(p + "attn_norm.weight", (e,), fill=1.0)
        t.add(p + "post_attention_norm.weight", (e,), fill=1.0)
        if (il + 1) % 4 == 0:  # full attention, with a gate on the queries (hence x2)
            t.add(p + "attn_q.weight", (e, hd * spec.n_head * 2), dtype=np.float16)
            t.add(p + "attn_k.weight", (e, hd * spec.n_head_kv), dtype=np.float16)
            t.add(p + "attn_v.weight", (e, hd * spec.n_head_kv), dtype=np.float16)
            t.add(p + "attn_output.weight", (hd * spec.n_head, e), dtype=np.float16)
            t.add(p + "attn_q_norm.weight", (hd,), fill=1.0)
            t.add(p + "attn_k_norm.weight", (hd,), fill=1.0)
        else:  # Gated DeltaNet
            t.add(p + "attn_qkv.weight", (e, conv_dim), dtype=np.float16)
            t.add(p + "attn_gate.weight", (e, value_dim), dtype=np.float16)
            t.add(p + "ssm_conv1d.weight", (ssm["conv_kernel"], conv_dim), scale=0.3)
            t.add(p + "ssm_dt.bias", (n_v_heads,), fill=0.0)
            t.add(p + "ssm_a", (n_v_heads,), fill=-0.5)  # -exp(A_log): decays, never grows
            t.add(p + "ssm_beta.weight", (e, n_v_heads), dtype=np.float16)
            t.add(p + "ssm_alpha.weight", (e, n_v_heads), dtype=np.float16)
            t.add(p + "ssm_norm.weight", (head_v,), fill=1.0)
            t.add(p + "ssm_out.weight", (value_dim, e), dtype=np.float16)
        t.add(p + "ffn_gate.weight", (e, spec.n_ff), dtype=np.float16)
        t.add(p + "ffn_up.weight", (e, spec.n_ff), dtype=np.float16)
        t.add(p + "ffn_down.weight", (spec.n_ff, e), dtype=np.float16)
    _finish(writer)
    return TinyModel(spec.arch, path, hybrid=True, sliding_window=0)


GEMMA3_SWA_SPEC = ArchSpec(
    "gemma3",
    6,
    64,
    2,
    1,
    128,
    N_VOCAB,
    8192,
    head_dim=32,
    sliding_window=32,
    tied_output=True,
    name="tiny gemma3 swa",
)


def write_gemma3_swa(path: Path, seed: int = 0, sliding_window: int = 32) -> TinyModel:
    """Gemma 3 with random F16 weights, tensors exactly as `gguf_factory.tensor_plan` lists them
    (so the fitter's figures for it are the same as for its sparse twins)."""
    spec = replace(GEMMA3_SWA_SPEC, sliding_window=sliding_window)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    _add_metadata(writer, spec, "F16")
    t = _Tensors(writer, seed)
    for name, shape, qtype in tensor_plan(spec, "F16"):
        if name.endswith("norm.weight"):
            t.add(name, shape, fill=1.0)  # the converter stores Gemma's (1 + w)
        else:
            dtype = np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32
            t.add(name, shape, scale=0.5 if name == "token_embd.weight" else 0.05, dtype=dtype)
    _finish(writer)
    return TinyModel(spec.arch, path, hybrid=False, sliding_window=sliding_window)


WRITERS = {"qwen35": write_qwen35, "gemma3": write_gemma3_swa}


def write_all(folder: Path) -> dict[str, TinyModel]:
    folder.mkdir(parents=True, exist_ok=True)
    return {arch: write(folder / f"tiny-{arch}.gguf") for arch, write in WRITERS.items()}
