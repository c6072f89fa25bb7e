"""Sparse GGUFs of the architectures of 2026, with published configurations, for the fit sweep.

Each `Model` names a real model and holds its hyperparameters as its config.json gives them
(figures marked "recalled" were written from memory of the model card and could not be checked
offline; they are real-model-shaped either way). The tensors follow the bundled llama.cpp's
`src/models/<arch>.cpp` (`load_arch_tensors`): the names, shapes and optional tensors it needs,
so llama.cpp loads the file and builds its real caches and graph in a dry run.

To keep the suite fast every model's vocabulary is cut to `SWEEP_VOCAB` tokens (the tokenizer is
the one tests/gguf_factory.py writes); every layer keeps its real shapes, layer count and pattern.
Matrices are Q4_K (Q8_0 / F16 where a row does not fill Q4_K blocks), norms F32, the output Q6_K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf.constants import GGMLQuantizationType, LlamaFileType

from tests.gguf_factory import add_test_tokenizer, fit_type, write_tensor_infos

Q = GGMLQuantizationType
SWEEP_VOCAB = 32000
Tensors = list[tuple[str, tuple[int, ...], Q]]


@dataclass(frozen=True)
class Model:
    name: str  # the published model
    arch: str
    n_layer: int  # trunk layers (MTP blocks come on top)
    n_embd: int
    n_head: int
    n_head_kv: int | list[int]
    head_dim: int
    n_ff: int | list[int]
    n_ctx_train: int
    tensors: Callable[[Model], Tensors]
    keys: dict[str, Any] = field(default_factory=dict)  # more {arch}.* keys
    n_nextn: int = 0  # MTP blocks the converter writes (not loaded by default)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    n_vocab: int = SWEEP_VOCAB
    tied: bool = False
    source: str = ""  # where the configuration comes from

    @property
    def n_layer_all(self) -> int:
        return self.n_layer + self.n_nextn

    def kv(self, il: int) -> int:
        return self.n_head_kv[il] if isinstance(self.n_head_kv, list) else self.n_head_kv

    def ff(self, il: int) -> int:
        return self.n_ff[il] if isinstance(self.n_ff, list) else self.n_ff

    def key(self, name: str, default: Any = None) -> Any:
        return self.keys.get(name, default)


class _Builder:
    def __init__(self) -> None:
        self.out: Tensors = []

    def add(self, name: str, *shape: int, qtype: Q = Q.Q4_K) -> None:
        if len(shape) == 1:
            qtype = Q.F32
        self.out.append((name, tuple(shape), fit_type(qtype, shape[0])))

    def common(self, m: Model, output_norm: str = "output_norm") -> None:
        self.add("token_embd.weight", m.n_embd, m.n_vocab)
        self.add(f"{output_norm}.weight", m.n_embd)
        if not m.tied:
            self.add("output.weight", m.n_embd, m.n_vocab, qtype=Q.Q6_K)

    def qkv(self, p: str, e: int, q: int, k: int, v: int, bias: bool = False) -> None:
        self.add(p + "attn_q.weight", e, q)
        self.add(p + "attn_k.weight", e, k)
        self.add(p + "attn_v.weight", e, v, qtype=Q.Q6_K)
        if bias:
            self.add(p + "attn_q.bias", q)
            self.add(p + "attn_k.bias", k)
            self.add(p + "attn_v.bias", v)

    def ffn(self, p: str, e: int, ff: int, gate: bool = True) -> None:
        if gate:
            self.add(p + "ffn_gate.weight", e, ff)
        self.add(p + "ffn_up.weight", e, ff)
        self.add(p + "ffn_down.weight", ff, e, qtype=Q.Q6_K)

    def experts(self, p: str, e: int, ff: int, n: int, gate: bool = True) -> None:
        self.add(p + "ffn_gate_inp.weight", e, n, qtype=Q.F32)
        if gate:
            self.add(p + "ffn_gate_exps.weight", e, ff, n)
        self.add(p + "ffn_up_exps.weight", e, ff, n)
        self.add(p + "ffn_down_exps.weight", ff, e, n, qtype=Q.Q6_K)

    def shared(self, p: str, e: int, ff: int, gate_inp: bool = False) -> None:
        if gate_inp:
            self.add(p + "ffn_gate_inp_shexp.weight", e)
        self.add(p + "ffn_gate_shexp.weight", e, ff)
        self.add(p + "ffn_up_shexp.weight", e, ff)
        self.add(p + "ffn_down_shexp.weight", ff, e, qtype=Q.Q6_K)

    def glm_ffn(self, m: Model, il: int) -> None:
        """DeepSeek / GLM: dense leading layers, then routed + shared experts; MTP block last."""
        p, e = f"blk.{il}.", m.n_embd
        if il < m.key("leading_dense_block_count", 0):
            self.ffn(p, e, m.ff(il))
        else:
            self.experts(p, e, m.n_ff_exp, m.n_expert)
            self.add(p + "exp_probs_b.bias", m.n_expert)
            self.shared(p, e, m.n_ff_exp * m.key("expert_shared_count"))
        if il >= m.n_layer:
            self.nextn(p, e)

    def nextn(self, p: str, e: int) -> None:
        self.add(p + "nextn.eh_proj.weight", 2 * e, e)
        self.add(p + "nextn.enorm.weight", e)
        self.add(p + "nextn.hnorm.weight", e)
        self.add(p + "nextn.shared_head_norm.weight", e)


# ---- per-family tensor lists (llama.cpp src/models/<arch>.cpp) -------------------------------


def _dense(m: Model) -> Tensors:
    """qwen3 / qwen3moe (with Q/K norms) and mistral3 (without)."""
    b = _Builder()
    b.common(m)
    e, hd = m.n_embd, m.head_dim
    for il in range(m.n_layer):
        p = f"blk.{il}."
        b.add(p + "attn_norm.weight", e)
        b.qkv(p, e, hd * m.n_head, hd * m.kv(il), hd * m.kv(il))
        b.add(p + "attn_output.weight", hd * m.n_head, e)
        if m.arch != "mistral3":
            b.add(p + "attn_q_norm.weight", hd)
            b.add(p + "attn_k_norm.weight", hd)
        b.add(p + "ffn_norm.weight", e)
        if m.n_expert:
            b.experts(p, e, m.n_ff_exp, m.n_expert)
        else:
            b.ffn(p, e, m.ff(il))
    return b.out


def _delta_net(m: Model) -> Tensors:
    """qwen35 / qwen35moe / qwen3next: Gated DeltaNet layers, every full_attention_interval-th
    layer gated attention, then the MTP block(s)."""
    b = _Builder()
    b.common(m)
    e, hd = m.n_embd, m.head_dim
    d_state, n_k, n_v = m.key("ssm.state_size"), m.key("ssm.group_count"), m.key(
        "ssm.time_step_rank")
    key_dim, value_dim = d_state * n_k, d_state * n_v
    every = m.key("full_attention_interval", 4)
    for il in range(m.n_layer_all):
        p = f"blk.{il}."
        b.add(p + "attn_norm.weight", e)
        b.add(p + "post_attention_norm.weight", e)
        if il >= m.n_layer or (il + 1) % every == 0:
            b.qkv(p, e, hd * m.n_head * 2, hd * m.kv(il), hd * m.kv(il))
            b.add(p + "attn_output.weight", hd * m.n_head, e)
            b.add(p + "attn_q_norm.weight", hd)
            b.add(p + "attn_k_norm.weight", hd)
        else:
            if m.arch == "qwen3next":
                b.add(p + "ssm_in.weight", e, 2 * key_dim + 2 * value_dim)
                b.add(p + "ssm_ba.weight", e, 2 * n_v, qtype=Q.F16)
            else:
                b.add(p + "attn_qkv.weight", e, 2 * key_dim + value_dim)
                b.add(p + "attn_gate.weight", e, value_dim)
                b.add(p + "ssm_beta.weight", e, n_v, qtype=Q.F16)
                b.add(p + "ssm_alpha.weight", e, n_v, qtype=Q.F16)
            b.add(p + "ssm_conv1d.weight", m.key("ssm.conv_kernel"), 2 * key_dim + value_dim,
                  qtype=Q.F32)
            b.add(p + "ssm_dt.bias", n_v)
            b.add(p + "ssm_a", n_v)
            b.add(p + "ssm_norm.weight", d_state)
            b.add(p + "ssm_out.weight", value_dim, e)
        if m.n_expert:
            b.experts(p, e, m.n_ff_exp, m.n_expert)
            b.shared(p, e, m.n_ff_shexp, gate_inp=True)
        else:
            b.ffn(p, e, m.ff(il))
        if il >= m.n_layer:
            b.nextn(p, e)
    return b.out


def _gemma4(m: Model) -> Tensors:
    b = _Builder()
    b.common(m)
    e = m.n_embd
    swa = m.key("attention.sliding_window_pattern")
    per_layer = m.key("embedding_length_per_layer_input", 0)
    shared = m.key("attention.shared_kv_layers", 0)
    if per_layer:
        b.add("per_layer_token_embd.weight", per_layer * m.n_layer, m.n_vocab)
        b.add("per_layer_model_proj.weight", e, per_layer * m.n_layer)
        b.add("per_layer_proj_norm.weight", per_layer)
    b.add("rope_freqs.weight", m.head_dim // 2)
    for il in range(m.n_layer):
        p = f"blk.{il}."
        hd = m.key("attention.key_length_swa") if swa[il] else m.head_dim
        kv = hd * m.kv(il)
        b.add(p + "attn_norm.weight", e)
        b.add(p + "attn_q.weight", e, hd * m.n_head)
        if il < m.n_layer - shared:
            b.add(p + "attn_k.weight", e, kv)
            b.add(p + "attn_v.weight", e, kv, qtype=Q.Q6_K)
            b.add(p + "attn_k_norm.weight", hd)
        b.add(p + "attn_output.weight", hd * m.n_head, e)
        b.add(p + "attn_q_norm.weight", hd)
        b.add(p + "post_attention_norm.weight", e)
        b.add(p + "ffn_norm.weight", e)
        b.ffn(p, e, m.ff(il))
        b.add(p + "post_ffw_norm.weight", e)
        if per_layer:
            b.add(p + "inp_gate.weight", e, per_layer, qtype=Q.F16)
            b.add(p + "proj.weight", per_layer, e, qtype=Q.F16)
            b.add(p + "post_norm.weight", e)
    return b.out


def _deepseek2(m: Model) -> Tensors:
    b = _Builder()
    b.common(m)
    e, n_head = m.n_embd, m.n_head
    q_rank, kv_rank = m.key("attention.q_lora_rank"), m.key("attention.kv_lora_rank")
    k_mla, v_mla = m.key("attention.key_length_mla"), m.key("attention.value_length_mla")
    rope = m.key("rope.dimension_count")
    for il in range(m.n_layer_all):
        p = f"blk.{il}."
        b.add(p + "attn_norm.weight", e)
        b.add(p + "attn_q_a_norm.weight", q_rank)
        b.add(p + "attn_kv_a_norm.weight", kv_rank)
        b.add(p + "attn_q_a.weight", e, q_rank)
        b.add(p + "attn_q_b.weight", q_rank, n_head * k_mla)
        b.add(p + "attn_kv_a_mqa.weight", e, kv_rank + rope)
        b.add(p + "attn_k_b.weight", k_mla - rope, kv_rank, n_head, qtype=Q.Q8_0)
        b.add(p + "attn_v_b.weight", kv_rank, v_mla, n_head, qtype=Q.Q8_0)
        b.add(p + "attn_output.weight", n_head * v_mla, e)
        b.add(p + "ffn_norm.weight", e)
        b.glm_ffn(m, il)
    return b.out


def _mamba2_hybrid(m: Model) -> Tensors:
    """nemotron_h / granitehybrid: Mamba2 layers where head_count_kv is 0."""
    b = _Builder()
    b.common(m)
    e, hd = m.n_embd, m.head_dim
    d_conv, d_inner = m.key("ssm.conv_kernel"), m.key("ssm.inner_size")
    d_state, n_group, n_ssm_head = (m.key("ssm.state_size"), m.key("ssm.group_count"),
                                    m.key("ssm.time_step_rank"))
    conv = d_inner + 2 * n_group * d_state
    for il in range(m.n_layer):
        p = f"blk.{il}."
        b.add(p + "attn_norm.weight", e)
        if m.kv(il) == 0 and (m.arch != "nemotron_h" or m.ff(il) == 0):
            b.add(p + "ssm_in.weight", e, 2 * d_inner + 2 * n_group * d_state + n_ssm_head)
            b.add(p + "ssm_conv1d.weight", d_conv, conv, qtype=Q.F32)
            b.add(p + "ssm_conv1d.bias", conv)
            b.add(p + "ssm_dt.bias", n_ssm_head)
            b.add(p + "ssm_a", 1, n_ssm_head, qtype=Q.F32)
            b.add(p + "ssm_d", 1, n_ssm_head, qtype=Q.F32)
            b.add(p + "ssm_norm.weight", d_inner // n_group, n_group, qtype=Q.F32)
            b.add(p + "ssm_out.weight", d_inner, e)
        elif m.kv(il) > 0:
            b.qkv(p, e, hd * m.n_head, hd * m.kv(il), hd * m.kv(il))
            b.add(p + "attn_output.weight", hd * m.n_head, e)
        if m.arch == "nemotron_h":
            if m.ff(il) > 0:
                b.ffn(p, e, m.ff(il), gate=False)
            continue
        b.add(p + "ffn_norm.weight", e)
        if m.n_expert:
            b.experts(p, e, m.n_ff_exp, m.n_expert)
            if m.n_ff_shexp:
                b.shared(p, e, m.n_ff_shexp)
        else:
            b.ffn(p, e, m.ff(il))
    return b.out


def _lfm2(m: Model) -> Tensors:
    b = _Builder()
    b.common(m, output_norm="token_embd_norm")
    e, hd = m.n_embd, m.head_dim
    for il in range(m.n_layer):
        p = f"blk.{il}."
        b.add(p + "ffn_norm.weight", e)
        b.ffn(p, e, m.ff(il))
        b.add(p + "attn_norm.weight", e)
        if m.kv(il):
            b.add(p + "attn_q_norm.weight", hd)
            b.add(p + "attn_k_norm.weight", hd)
            b.qkv(p, e, e, hd * m.kv(il), hd * m.kv(il))
            b.add(p + "attn_output.weight", e, e)
        else:
            b.add(p + "shortconv.conv.weight", m.key("shortconv.l_cache"), e, qtype=Q.F32)
            b.add(p + "shortconv.in_proj.weight", e, 3 * e)
            b.add(p + "shortconv.out_proj.weight", e, e)
    return b.out


def _gpt_oss(m: Model) -> Tensors:
    b = _Builder()
    b.common(m)
    e, hd, n = m.n_embd, m.head_dim, m.n_expert
    for il in range(m.n_layer):
        p = f"blk.{il}."
        b.add(p + "attn_norm.weight", e)
        b.add(p + "post_attention_norm.weight", e)
        b.qkv(p, e, hd * m.n_head, hd * m.kv(il), hd * m.kv(il), bias=True)
        b.add(p + "attn_output.weight", hd * m.n_head, e)
        b.add(p + "attn_output.bias", e)
        b.add(p + "attn_sinks.weight", m.n_head)
        b.add(p + "ffn_gate_inp.weight", e, n, qtype=Q.F32)
        b.add(p + "ffn_gate_inp.bias", n)
        for part in ("gate", "up"):  # MXFP4 experts, as OpenAI publishes them
            b.add(p + f"ffn_{part}_exps.weight", e, m.n_ff_exp, n, qtype=Q.MXFP4)
            b.add(p + f"ffn_{part}_exps.bias", m.n_ff_exp, n, qtype=Q.F32)
        b.add(p + "ffn_down_exps.weight", m.n_ff_exp, e, n, qtype=Q.MXFP4)
        b.add(p + "ffn_down_exps.bias", e, n, qtype=Q.F32)
    return b.out


def _glm4moe(m: Model) -> Tensors:
    b = _Builder()
    b.common(m)
    e, hd = m.n_embd, m.head_dim
    for il in range(m.n_layer_all):
        p = f"blk.{il}."
        b.add(p + "attn_norm.weight", e)
        b.qkv(p, e, hd * m.n_head, hd * m.kv(il), hd * m.kv(il), bias=True)
        b.add(p + "attn_output.weight", hd * m.n_head, e)
        b.add(p + "post_attention_norm.weight", e)
        b.glm_ffn(m, il)
    return b.out


def _llama4(m: Model) -> Tensors:
    b = _Builder()
    b.common(m)
    e, hd = m.n_embd, m.head_dim
    step = m.key("interleave_moe_layer_step", 1)
    for il in range(m.n_layer):
        p = f"blk.{il}."
        b.add(p + "attn_norm.weight", e)
        b.qkv(p, e, hd * m.n_head, hd * m.kv(il), hd * m.kv(il))
        b.add(p + "attn_output.weight", hd * m.n_head, e)
        b.add(p + "ffn_norm.weight", e)
        if (il + 1) % step == 0:
            b.experts(p, e, m.n_ff_exp, m.n_expert)
            b.shared(p, e, m.n_ff_exp)
        else:
            b.ffn(p, e, m.ff(il))
    return b.out


# ---- the models ------------------------------------------------------------------------------

_QWEN35_SSM = {"ssm.conv_kernel": 4, "ssm.state_size": 128, "ssm.group_count": 16,
               "full_attention_interval": 4, "rope.dimension_sections": [11, 11, 10, 0]}


def _nemotron_pattern(pattern: str) -> tuple[list[int], list[int]]:
    """Nemotron-H's hybrid_override_pattern: M Mamba2, * attention, - MLP."""
    kv = [8 if c == "*" else 0 for c in pattern]
    ff = [15680 if c == "-" else 0 for c in pattern]
    return kv, ff


_NEMOTRON_KV, _NEMOTRON_FF = _nemotron_pattern(
    "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-")
_GEMMA4_31B_SWA = [il % 6 != 5 for il in range(60)]
_GEMMA4_E4B_SWA = [il % 6 != 5 for il in range(42)]
_GRANITE_KV = [8 if il in (5, 15, 25, 35) else 0 for il in range(40)]
_LFM2_KV = [8 if il in (2, 5, 8, 10, 12, 14) else 0 for il in range(16)]

MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model("Qwen3.5-27B", "qwen35", 64, 5120, 24, 4, 256, 17408, 262144, _delta_net,
              {**_QWEN35_SSM, "ssm.inner_size": 6144, "ssm.time_step_rank": 48}, n_nextn=1,
              source="llama.cpp tests/snapshots/qwen3.6-27b.schema; linear-attention heads "
                     "16 K x 48 V of 128 (config.json, recalled)"),
        Model("Qwen3.5-35B-A3B", "qwen35moe", 40, 2048, 16, 2, 256, 0, 262144, _delta_net,
              {**_QWEN35_SSM, "ssm.inner_size": 4096, "ssm.time_step_rank": 32}, n_nextn=1,
              n_expert=256, n_expert_used=8, n_ff_exp=512, n_ff_shexp=512,
              source="config.json (recalled)"),
        Model("Qwen3-Next-80B-A3B", "qwen3next", 48, 2048, 16, 2, 256, 0, 262144, _delta_net,
              {**_QWEN35_SSM, "ssm.inner_size": 4096, "ssm.time_step_rank": 32},
              n_expert=512, n_expert_used=10, n_ff_exp=512, n_ff_shexp=512,
              source="config.json (recalled)"),
        Model("Gemma-4-31B", "gemma4", 60, 5376, 32, [4 if not s else 16 for s in
              _GEMMA4_31B_SWA], 512, 21504, 262144, _gemma4,
              {"attention.sliding_window": 1024, "attention.key_length_swa": 256,
               "attention.value_length_swa": 256, "attention.sliding_window_pattern":
               _GEMMA4_31B_SWA, "embedding_length_per_layer_input": 0,
               "attention.shared_kv_layers": 0}, tied=True,
              source="recalled, unverified offline: 5 local (1024 window, 16 KV heads of 256) "
                     "to 1 global (4 KV heads of 512)"),
        Model("Gemma-4-E4B", "gemma4", 42, 2560, 8, 2, 512, 10240, 131072, _gemma4,
              {"attention.sliding_window": 512, "attention.key_length_swa": 256,
               "attention.value_length_swa": 256, "attention.sliding_window_pattern":
               _GEMMA4_E4B_SWA, "embedding_length_per_layer_input": 256,
               "attention.shared_kv_layers": 18}, tied=True,
              source="recalled, unverified offline: last 18 layers share KV"),
        Model("GLM-4.7-Flash", "deepseek2", 47, 2048, 20, 1, 576, 10240, 202752, _deepseek2,
              {"attention.q_lora_rank": 768, "attention.kv_lora_rank": 512,
               "attention.key_length_mla": 256, "attention.value_length_mla": 256,
               "attention.value_length": 512, "rope.dimension_count": 64,
               "leading_dense_block_count": 1, "expert_shared_count": 1,
               "expert_weights_scale": 1.8, "expert_weights_norm": True, "expert_gating_func": 2},
              n_nextn=1, n_expert=64, n_expert_used=4, n_ff_exp=1536,
              source="config.json (recalled); llama.cpp deepseek2.cpp names 47 layers A3B"),
        Model("Nemotron-Nano-9B-v2", "nemotron_h", 56, 4480, 40, _NEMOTRON_KV, 128, _NEMOTRON_FF,
              131072, _mamba2_hybrid,
              {"ssm.conv_kernel": 4, "ssm.inner_size": 128 * 80, "ssm.state_size": 128,
               "ssm.group_count": 8, "ssm.time_step_rank": 128},
              source="config.json hybrid_override_pattern (recalled)"),
        Model("Granite-4.0-H-Small", "granitehybrid", 40, 4096, 32, _GRANITE_KV, 128, 896,
              131072, _mamba2_hybrid,
              {"ssm.conv_kernel": 4, "ssm.inner_size": 8192, "ssm.state_size": 128,
               "ssm.group_count": 1, "ssm.time_step_rank": 128,
               "expert_shared_feed_forward_length": 8192},
              n_expert=72, n_expert_used=10, n_ff_exp=896, n_ff_shexp=8192,
              source="config.json (recalled): attention at layers 5/15/25/35"),
        Model("LFM2-1.2B", "lfm2", 16, 2048, 32, _LFM2_KV, 64, 8192, 128000, _lfm2,
              {"shortconv.l_cache": 3}, tied=True, source="config.json (recalled)"),
        Model("gpt-oss-20b", "gpt-oss", 24, 2880, 64, 8, 64, 2880, 131072, _gpt_oss,
              {"attention.sliding_window": 128, "rope.dimension_count": 64},
              n_expert=32, n_expert_used=4, n_ff_exp=2880, source="config.json"),
        Model("GLM-4.5-Air", "glm4moe", 46, 4096, 96, 8, 128, 10944, 131072, _glm4moe,
              {"leading_dense_block_count": 1, "expert_shared_count": 1,
               "expert_weights_scale": 1.0, "expert_weights_norm": True,
               "expert_gating_func": 2, "rope.dimension_count": 64},
              n_nextn=1, n_expert=128, n_expert_used=8, n_ff_exp=1408,
              source="config.json (recalled)"),
        Model("Llama-4-Scout-17B-16E", "llama4", 48, 5120, 40, 8, 128, 16384, 10485760,
              _llama4, {"interleave_moe_layer_step": 1, "rope.dimension_count": 128},
              n_expert=16, n_expert_used=1, n_ff_exp=8192, source="config.json (recalled)"),
        Model("Mistral-Small-3.2-24B", "mistral3", 40, 5120, 32, 8, 128, 32768, 131072,
              _dense, source="config.json (recalled)"),
        Model("Qwen3-32B", "qwen3", 64, 5120, 64, 8, 128, 25600, 40960, _dense,
              source="config.json"),
        Model("Qwen3-30B-A3B", "qwen3moe", 48, 2048, 32, 4, 128, 6144, 40960, _dense,
              n_expert=128, n_expert_used=8, n_ff_exp=768, source="config.json"),
    )
}


def _add(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, list):
        writer.add_array(key, [int(v) for v in value])
    else:
        writer.add_string(key, value)


def write_model(path: Path, m: Model, n_vocab: int | None = None) -> Path:
    """Write `m` as a sparse GGUF (Q4_K_M-like mix), header only, the data a hole."""
    if n_vocab is not None:
        m = Model(**{**m.__dict__, "n_vocab": n_vocab})
    a = m.arch
    writer = gguf.GGUFWriter(str(path), a)
    writer.add_string("general.name", m.name)
    writer.add_uint32("general.file_type", LlamaFileType.MOSTLY_Q4_K_M.value)
    writer.add_uint32("general.quantization_version", 2)
    n_all = m.n_layer_all
    per_layer = {
        "attention.head_count_kv": [m.kv(il) for il in range(n_all)]
        if isinstance(m.n_head_kv, list) else m.n_head_kv,
        "feed_forward_length": [m.ff(il) for il in range(n_all)]
        if isinstance(m.n_ff, list) else m.n_ff,
    }
    values: dict[str, Any] = {
        "context_length": m.n_ctx_train, "embedding_length": m.n_embd, "block_count": n_all,
        "attention.head_count": m.n_head, "attention.key_length": m.head_dim,
        "attention.value_length": m.head_dim, "attention.layer_norm_rms_epsilon": 1e-6,
        "attention.layer_norm_epsilon": 1e-5, "rope.freq_base": 10000.0,
        "vocab_size": m.n_vocab, **per_layer,
    }
    if m.n_nextn:
        values["nextn_predict_layers"] = m.n_nextn
    if m.n_expert:
        values.update({"expert_count": m.n_expert, "expert_used_count": m.n_expert_used,
                       "expert_feed_forward_length": m.n_ff_exp})
        if m.n_ff_shexp:
            values["expert_shared_feed_forward_length"] = m.n_ff_shexp
    values.update(m.keys)
    for key, value in values.items():
        _add(writer, f"{a}.{key}", value)
    add_test_tokenizer(writer, m.n_vocab)
    return write_tensor_infos(writer, path, m.tensors(m))
