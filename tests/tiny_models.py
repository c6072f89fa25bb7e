"""Tiny GGUFs of the 2026 architectures with random weights (real tensor data, small dimensions).

llama.cpp runs them for real: the text is garbage, but every path of the engine runs (hybrid
recurrent memory, sliding-window caches, context checkpoints). Tensor names and shapes follow
llama.cpp's loaders (`src/models/<arch>.cpp`, `load_arch_tensors`); the vocabulary is
`gguf_factory`'s SentencePiece-style one, which llama.cpp accepts for any architecture.

- `write_qwen35`: Qwen3.5's Gated DeltaNet hybrid: three recurrent layers, then one attention
  layer (`full_attention_interval` 4), gated queries, interleaved M-RoPE sections; with
  `nextn=True` (`write_qwen35_mtp`) one MTP (nextn) block after them.
- `write_gemma3_swa`: Gemma 3 with a short sliding window (5 of 6 layers slide), so that a chat of
  a few hundred tokens overwrites the small sliding-window cache.
- `write_nemotron_h`: Nemotron-H's Mamba2 hybrid: per-layer arrays say which layer is Mamba2
  (no KV heads, no FFN), attention (no FFN) or FFN only (ReLU^2, no gate).
- `write_gpt_oss`: gpt-oss: sliding-window and full attention alternating, attention sinks,
  biased MoE experts.
- `write_gemma4`: Gemma 4: a sliding-window pattern array, narrower heads on the sliding layers
  (`key_length_swa`), the last layers sharing earlier layers' caches (`shared_kv_layers`).
- `write_deepseek2`: DeepSeek V2/V3-style MLA (the cache holds the compressed latent and the
  rope part), a leading dense block, then MoE blocks with a shared expert.
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
        offset: float = 0.0,
    ) -> None:
        shape = tuple(reversed(ggml_shape))
        if fill is not None:
            data = np.full(shape, fill, dtype=np.float32)
        else:
            data = self.rng.standard_normal(shape).astype(np.float32) * scale + offset
        self.writer.add_tensor(name, data.astype(dtype if len(shape) > 1 else np.float32))


    def embeddings(self, n_embd: int, output: bool = True) -> None:
        """The token embedding, the final norm and (unless tied) the output projection."""
        self.add("token_embd.weight", (n_embd, N_VOCAB), scale=0.5, dtype=np.float16)
        self.add("output_norm.weight", (n_embd,), fill=1.0)
        if output:
            self.add("output.weight", (n_embd, N_VOCAB), dtype=np.float16)


def _uints(writer: gguf.GGUFWriter, arch: str, **keys: int) -> None:
    """`{arch}.<key>` uint32 keys; dots in key names are written as double underscores."""
    for key, value in keys.items():
        writer.add_uint32(f"{arch}.{key.replace('__', '.')}", value)


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
AGREED_TOKEN = 7  # what write_qwen35(mtp_agrees=True) predicts after every token


def write_qwen35(
    path: Path, seed: int = 0, nextn: bool = False, mtp_agrees: bool = False
) -> TinyModel:
    """With `nextn`, one MTP block follows the trunk as llama.cpp's `qwen35` loader wants it
    (`load_block_mtp`): a full-attention block plus `nextn.eh_proj`, `enorm`, `hnorm`, counted
    in `block_count` and named by `nextn_predict_layers`; llama.cpp loads it with `load_mtp`.

    With random weights the MTP block's guesses are wrong; `mtp_agrees` makes trunk and block
    agree: every token embedding leans the same way (a constant offset), the output row of
    AGREED_TOKEN points that way, and `eh_proj` passes the token embedding through, so both
    predict AGREED_TOKEN after any token."""
    spec = QWEN35_SPEC
    ssm = QWEN35_SSM
    writer = gguf.GGUFWriter(str(path), spec.arch)
    _add_metadata(writer, replace(spec, n_layer=spec.n_layer + int(nextn)), "F16")
    a = spec.arch
    if nextn:
        _uints(writer, a, nextn_predict_layers=1)
    head_k = head_v = ssm["state_size"]
    n_k_heads, n_v_heads = ssm["group_count"], ssm["time_step_rank"]
    key_dim, value_dim = head_k * n_k_heads, head_v * n_v_heads
    conv_dim = 2 * key_dim + value_dim
    _uints(writer, a, ssm__conv_kernel=ssm["conv_kernel"], ssm__state_size=ssm["state_size"],
           ssm__group_count=n_k_heads, ssm__time_step_rank=n_v_heads, ssm__inner_size=value_dim,
           full_attention_interval=4, rope__dimension_count=spec.n_embd_head)
    writer.add_array(f"{a}.rope.dimension_sections", [3, 3, 2, 0])  # n_rot / 2 in all
    t = _Tensors(writer, seed)
    e, hd = spec.n_embd, spec.n_embd_head
    if mtp_agrees:
        t.add("token_embd.weight", (e, N_VOCAB), scale=0.5, offset=3.0, dtype=np.float16)
        t.add("output_norm.weight", (e,), fill=1.0)
        output = t.rng.standard_normal((N_VOCAB, e)).astype(np.float32) * 0.05
        output[AGREED_TOKEN] = 0.5
        writer.add_tensor("output.weight", output.astype(np.float16))
    else:
        t.embeddings(e)
    for il in range(spec.n_layer + int(nextn)):
        p = f"blk.{il}."
        t.add(p + "attn_norm.weight", (e,), fill=1.0)
        t.add(p + "post_attention_norm.weight", (e,), fill=1.0)
        if il >= spec.n_layer and mtp_agrees:  # [embd; hidden] -> embd
            eh_proj = np.concatenate([np.eye(e), np.zeros((e, e))], axis=1)
            writer.add_tensor(p + "nextn.eh_proj.weight", eh_proj.astype(np.float16))
        elif il >= spec.n_layer:  # the MTP block: its own input projection of [embd; hidden]
            t.add(p + "nextn.eh_proj.weight", (2 * e, e), dtype=np.float16)
        if il >= spec.n_layer:
            t.add(p + "nextn.enorm.weight", (e,), fill=1.0)
            t.add(p + "nextn.hnorm.weight", (e,), fill=1.0)
            t.add(p + "nextn.shared_head_norm.weight", (e,), fill=1.0)
        if il >= spec.n_layer or (il + 1) % 4 == 0:  # full attention, gated queries (hence x2)
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


def write_qwen35_mtp(path: Path, seed: int = 0, agrees: bool = False) -> TinyModel:
    return write_qwen35(path, seed, nextn=True, mtp_agrees=agrees)


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


def _metadata(
    writer: gguf.GGUFWriter,
    arch: str,
    n_layer: int,
    n_embd: int,
    n_head: int | list[int],
    n_head_kv: int | list[int],
    n_ff: int | list[int],
    head_dim: int,
    head_dim_v: int | None = None,
) -> None:
    """The common keys, taking per-layer arrays where an architecture has them."""

    def put(key: str, value: int | list[int]) -> None:
        if isinstance(value, list):
            writer.add_array(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)

    spec = ArchSpec(arch, n_layer, n_embd, 1, 1, 1, N_VOCAB, 4096, head_dim=head_dim)
    # _add_metadata's scalar head and FFN keys are left out: written here, arrays or not
    probe = gguf.GGUFWriter(None, arch)  # type: ignore[arg-type]
    _add_metadata(probe, spec, "F16")
    skip = {f"{arch}.{k}" for k in ("attention.head_count", "attention.head_count_kv",
                                     "feed_forward_length", "attention.value_length")}
    for key, field in probe.kv_data[0].items():
        if key not in skip and key != "general.architecture":
            writer.add_key_value(key, field.value, field.type, sub_type=field.sub_type)
    put("attention.head_count", n_head)
    put("attention.head_count_kv", n_head_kv)
    put("feed_forward_length", n_ff)
    put("attention.value_length", head_dim if head_dim_v is None else head_dim_v)


NEMOTRON_LAYERS = ("mamba", "attention", "mamba", "ffn")


def write_nemotron_h(path: Path, seed: int = 0) -> TinyModel:
    arch, e, hd, n_head, n_ff = "nemotron_h", 64, 16, 4, 128
    d_conv, d_inner, d_state, n_group, n_ssm_head = 4, 128, 16, 2, 8
    kinds = NEMOTRON_LAYERS
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(
        writer, arch, len(kinds), e, n_head,
        [2 if k == "attention" else 0 for k in kinds],
        [n_ff if k == "ffn" else 0 for k in kinds],
        hd,
    )
    writer.add_float32(f"{arch}.attention.layer_norm_epsilon", 1e-5)
    _uints(writer, arch, ssm__conv_kernel=d_conv, ssm__inner_size=d_inner,
           ssm__state_size=d_state, ssm__time_step_rank=n_ssm_head, ssm__group_count=n_group)
    t = _Tensors(writer, seed)
    t.embeddings(e)
    conv_dim = d_inner + 2 * n_group * d_state
    for il, kind in enumerate(kinds):
        p = f"blk.{il}."
        t.add(p + "attn_norm.weight", (e,), fill=1.0)
        if kind == "mamba":
            t.add(p + "ssm_in.weight", (e, 2 * d_inner + 2 * n_group * d_state + n_ssm_head),
                  dtype=np.float16)
            t.add(p + "ssm_conv1d.weight", (d_conv, conv_dim), scale=0.3)
            t.add(p + "ssm_conv1d.bias", (conv_dim,), fill=0.0)
            t.add(p + "ssm_dt.bias", (n_ssm_head,), fill=0.0)
            t.add(p + "ssm_a", (1, n_ssm_head), fill=-0.5)
            t.add(p + "ssm_d", (1, n_ssm_head), fill=1.0)
            t.add(p + "ssm_norm.weight", (d_inner // n_group, n_group), fill=1.0)
            t.add(p + "ssm_out.weight", (d_inner, e), dtype=np.float16)
        elif kind == "attention":
            t.add(p + "attn_q.weight", (e, hd * n_head), dtype=np.float16)
            t.add(p + "attn_k.weight", (e, hd * 2), dtype=np.float16)
            t.add(p + "attn_v.weight", (e, hd * 2), dtype=np.float16)
            t.add(p + "attn_output.weight", (hd * n_head, e), dtype=np.float16)
        else:
            t.add(p + "ffn_up.weight", (e, n_ff), dtype=np.float16)
            t.add(p + "ffn_down.weight", (n_ff, e), dtype=np.float16)
    _finish(writer)
    return TinyModel(arch, path, hybrid=True, sliding_window=0)


def write_gpt_oss(path: Path, seed: int = 0, sliding_window: int = 32) -> TinyModel:
    arch, n_layer, e, hd, n_head, n_head_kv = "gpt-oss", 4, 64, 16, 4, 2
    n_expert, n_used, n_ff_exp = 4, 2, 64
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, arch, n_layer, e, n_head, n_head_kv, n_ff_exp, hd)
    _uints(writer, arch, expert_feed_forward_length=n_ff_exp, expert_count=n_expert,
           expert_used_count=n_used, attention__sliding_window=sliding_window)
    t = _Tensors(writer, seed)
    t.embeddings(e)
    for il in range(n_layer):
        p = f"blk.{il}."
        t.add(p + "attn_norm.weight", (e,), fill=1.0)
        t.add(p + "post_attention_norm.weight", (e,), fill=1.0)
        t.add(p + "attn_q.weight", (e, hd * n_head), dtype=np.float16)
        t.add(p + "attn_k.weight", (e, hd * n_head_kv), dtype=np.float16)
        t.add(p + "attn_v.weight", (e, hd * n_head_kv), dtype=np.float16)
        t.add(p + "attn_output.weight", (hd * n_head, e), dtype=np.float16)
        t.add(p + "attn_output.bias", (e,), fill=0.0)
        t.add(p + "attn_sinks.weight", (n_head,), fill=0.0)
        t.add(p + "ffn_gate_inp.weight", (e, n_expert))
        t.add(p + "ffn_gate_inp.bias", (n_expert,), fill=0.0)
        for part, shape in (("gate", (e, n_ff_exp, n_expert)), ("up", (e, n_ff_exp, n_expert)),
                            ("down", (n_ff_exp, e, n_expert))):
            t.add(p + f"ffn_{part}_exps.weight", shape, dtype=np.float16)
            t.add(p + f"ffn_{part}_exps.bias", (shape[1], n_expert), fill=0.0)
    _finish(writer)
    return TinyModel(arch, path, hybrid=False, sliding_window=sliding_window)


GEMMA4_SWA = (True, True, True, False, True, False)


def write_gemma4(path: Path, seed: int = 0, sliding_window: int = 32) -> TinyModel:
    arch, e, n_head, n_head_kv, n_ff = "gemma4", 64, 2, 1, 128
    head_global, head_swa = 32, 16
    n_layer = len(GEMMA4_SWA)
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, arch, n_layer, e, n_head, n_head_kv, n_ff, head_global)
    writer.add_array(f"{arch}.attention.sliding_window_pattern", list(GEMMA4_SWA))
    _uints(writer, arch, attention__sliding_window=sliding_window,
           attention__key_length_swa=head_swa, attention__value_length_swa=head_swa,
           rope__dimension_count_swa=head_swa,
           attention__shared_kv_layers=2,  # layers 4 and 5 use the caches of 2 and 3
           embedding_length_per_layer_input=0)
    t = _Tensors(writer, seed)
    f16 = np.float16
    t.embeddings(e, output=False)
    t.add("rope_freqs.weight", (head_global // 2,), fill=1.0)
    for il, swa in enumerate(GEMMA4_SWA):
        p = f"blk.{il}."
        hd = head_swa if swa else head_global
        t.add(p + "attn_norm.weight", (e,), fill=1.0)
        t.add(p + "attn_q.weight", (e, hd * n_head), dtype=f16)
        if il < n_layer - 2:  # the shared layers have no K/V of their own
            t.add(p + "attn_k.weight", (e, hd * n_head_kv), dtype=f16)
            t.add(p + "attn_v.weight", (e, hd * n_head_kv), dtype=f16)
            t.add(p + "attn_k_norm.weight", (hd,), fill=1.0)
        t.add(p + "attn_output.weight", (hd * n_head, e), dtype=f16)
        t.add(p + "attn_q_norm.weight", (hd,), fill=1.0)
        t.add(p + "post_attention_norm.weight", (e,), fill=1.0)
        t.add(p + "ffn_norm.weight", (e,), fill=1.0)
        t.add(p + "ffn_gate.weight", (e, n_ff), dtype=f16)
        t.add(p + "ffn_up.weight", (e, n_ff), dtype=f16)
        t.add(p + "ffn_down.weight", (n_ff, e), dtype=f16)
        t.add(p + "post_ffw_norm.weight", (e,), fill=1.0)
    _finish(writer)
    return TinyModel(arch, path, hybrid=False, sliding_window=sliding_window)


def write_deepseek2(
    path: Path, seed: int = 0, nextn: bool = False, stripped_nextn: bool = False
) -> TinyModel:
    """`nextn`: one MTP block after the trunk (GLM-4.x / DeepSeek V3 style: an MoE block with
    MLA attention plus the `nextn.*` tensors). `stripped_nextn`: the header announces an MTP
    block (`nextn_predict_layers`, counted in `block_count`) whose tensors are not in the file,
    as in trunk-only conversions; llama.cpp loads it (the block's tensors are optional for
    deepseek2) but cannot build its MTP graph."""
    arch, n_layer, e, n_head, n_ff = "deepseek2", 3, 64, 4, 128
    q_lora, kv_lora, rope, nope, v_head = 32, 32, 8, 16, 16
    n_expert, n_used, n_ff_exp = 4, 2, 32
    writer = gguf.GGUFWriter(str(path), arch)
    # The converter's MLA layout: one KV head as wide as the latent plus the rope part.
    announced = int(nextn or stripped_nextn)
    _metadata(writer, arch, n_layer + announced, e, n_head, 1, n_ff, kv_lora + rope, kv_lora)
    if announced:
        _uints(writer, arch, nextn_predict_layers=1)
    _uints(writer, arch, attention__key_length_mla=nope + rope,
           attention__value_length_mla=v_head, attention__q_lora_rank=q_lora,
           attention__kv_lora_rank=kv_lora, rope__dimension_count=rope,
           leading_dense_block_count=1, expert_count=n_expert, expert_used_count=n_used,
           expert_feed_forward_length=n_ff_exp, expert_shared_count=1,
           expert_gating_func=1)  # softmax
    t = _Tensors(writer, seed)
    t.embeddings(e)
    f16 = np.float16
    for il in range(n_layer + int(nextn)):
        p = f"blk.{il}."
        if il >= n_layer:
            t.add(p + "nextn.eh_proj.weight", (2 * e, e), dtype=f16)
            t.add(p + "nextn.enorm.weight", (e,), fill=1.0)
            t.add(p + "nextn.hnorm.weight", (e,), fill=1.0)
            t.add(p + "nextn.shared_head_norm.weight", (e,), fill=1.0)
        t.add(p + "attn_norm.weight", (e,), fill=1.0)
        t.add(p + "attn_q_a_norm.weight", (q_lora,), fill=1.0)
        t.add(p + "attn_kv_a_norm.weight", (kv_lora,), fill=1.0)
        t.add(p + "attn_q_a.weight", (e, q_lora), dtype=f16)
        t.add(p + "attn_q_b.weight", (q_lora, n_head * (nope + rope)), dtype=f16)
        t.add(p + "attn_kv_a_mqa.weight", (e, kv_lora + rope), dtype=f16)
        t.add(p + "attn_k_b.weight", (nope, kv_lora, n_head), dtype=f16)
        t.add(p + "attn_v_b.weight", (kv_lora, v_head, n_head), dtype=f16)
        t.add(p + "attn_output.weight", (n_head * v_head, e), dtype=f16)
        t.add(p + "ffn_norm.weight", (e,), fill=1.0)
        if il == 0:
            t.add(p + "ffn_gate.weight", (e, n_ff), dtype=f16)
            t.add(p + "ffn_up.weight", (e, n_ff), dtype=f16)
            t.add(p + "ffn_down.weight", (n_ff, e), dtype=f16)
            continue
        t.add(p + "ffn_gate_inp.weight", (e, n_expert))
        t.add(p + "ffn_gate_exps.weight", (e, n_ff_exp, n_expert), dtype=f16)
        t.add(p + "ffn_up_exps.weight", (e, n_ff_exp, n_expert), dtype=f16)
        t.add(p + "ffn_down_exps.weight", (n_ff_exp, e, n_expert), dtype=f16)
        t.add(p + "ffn_gate_shexp.weight", (e, n_ff_exp), dtype=f16)
        t.add(p + "ffn_up_shexp.weight", (e, n_ff_exp), dtype=f16)
        t.add(p + "ffn_down_shexp.weight", (n_ff_exp, e), dtype=f16)
    _finish(writer)
    return TinyModel(arch, path, hybrid=False, sliding_window=0)


WRITERS = {
    "qwen35": write_qwen35,
    "gemma3": write_gemma3_swa,
    "nemotron_h": write_nemotron_h,
    "gpt-oss": write_gpt_oss,
    "deepseek2": write_deepseek2,
    "gemma4": write_gemma4,
}


def write_all(folder: Path) -> dict[str, TinyModel]:
    folder.mkdir(parents=True, exist_ok=True)
    return {arch: write(folder / f"tiny-{arch}.gguf") for arch, write in WRITERS.items()}
