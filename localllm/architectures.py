"""What llama.cpp does with each architecture's memory, as data (one table, no branches elsewhere).

Mirrored from the bundled llama.cpp (llama-cpp-python 0.3.36): `src/models/<arch>.cpp`
(`load_arch_hparams`), `llama-model.cpp` (`create_memory`), `llama-hparams.cpp`. Everything not
listed here follows from the GGUF keys alone, the way llama.cpp reads them for every architecture:

- recurrent state size per layer and sequence (`n_embd_r`, `n_embd_s`, f32): from `ssm.*`
  (Mamba2 / Gated DeltaNet) or `shortconv.l_cache` (LFM2);
- MLA (`attention.key_length_mla` present): the cache holds K only, `key_length` wide (the
  compressed latent plus the rope part), and no V;
- per-layer head counts (arrays), sliding-window head widths (`attention.key_length_swa`),
  sliding-window pattern arrays, `nextn_predict_layers` (MTP blocks: not loaded, no cache in
  the target context; with spec_type draft-mtp loaded, with one KV layer in the MTP context).

A new architecture whose memory is one of these kinds needs one row here, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

# How an architecture marks its recurrent layers (llama.cpp `hparams.is_recr`):
#   ""            no recurrent layers
#   "interval"    Gated DeltaNet hybrids: `attention.recurrent_layers` array, else every layer but
#                 each `full_attention_interval`-th (default 4) of the trunk
#   "no_kv"       Mamba2 / short-conv hybrids: layers whose `head_count_kv` entry is 0
#   "no_kv_no_ff" Nemotron-H: layers with neither attention heads nor an FFN (its FFN-only
#                 layers have neither attention nor state)
#   "all"         every layer recurrent; with `attention_too`, every layer also attends (Falcon-H1)
RecurrentRule = Literal["", "interval", "no_kv", "no_kv_no_ff", "all"]


@dataclass(frozen=True)
class ArchMemory:
    recurrent: RecurrentRule = ""
    attention_too: bool = False  # recurrent layers also have a KV cache (Falcon-H1)
    # Sliding window: llama.cpp's `set_swa_pattern(period, dense_first)` when the GGUF has no
    # `attention.sliding_window_pattern`: layer il slides when il % period < period - 1
    # (dense_first: when il % period != 0); period 0 makes every layer slide.
    swa_period: int | None = None  # None: no sliding window for this architecture
    swa_dense_first: bool = False
    # Chunked attention (Llama 4): the window is fixed in code, not read from the file; a
    # `sliding_window` key of 0 turns it off.
    swa_fixed_window: int = 0
    swa_attention_layers: bool = False  # LFM2: with a window, every attention layer slides
    shared_kv: bool = False  # `attention.shared_kv_layers`: the last N layers reuse earlier caches
    stateless: bool = False  # encoders / diffusion models: no KV cache at all


ARCHITECTURES: Mapping[str, ArchMemory] = {
    # sliding-window attention
    "gemma2": ArchMemory(swa_period=2),
    "gemma3": ArchMemory(swa_period=6),
    "gemma3n": ArchMemory(swa_period=5, shared_kv=True),
    "gemma4": ArchMemory(swa_period=0, shared_kv=True),  # the pattern array is required
    "gemma-embedding": ArchMemory(swa_period=6, stateless=True),
    "cohere2": ArchMemory(swa_period=4),
    "gpt-oss": ArchMemory(swa_period=2),
    "exaone4": ArchMemory(swa_period=4),
    "olmo2": ArchMemory(swa_period=4),
    "smallthinker": ArchMemory(swa_period=4, swa_dense_first=True),
    "llama4": ArchMemory(swa_period=4, swa_fixed_window=8192),
    # hybrids with a recurrent state
    "qwen3next": ArchMemory(recurrent="interval"),
    "qwen35": ArchMemory(recurrent="interval"),
    "qwen35moe": ArchMemory(recurrent="interval"),
    "nemotron_h": ArchMemory(recurrent="no_kv_no_ff"),
    "nemotron_h_moe": ArchMemory(recurrent="no_kv_no_ff"),
    "granitehybrid": ArchMemory(recurrent="no_kv"),
    "jamba": ArchMemory(recurrent="no_kv"),
    "plamo2": ArchMemory(recurrent="no_kv"),
    "lfm2": ArchMemory(recurrent="no_kv", swa_attention_layers=True),
    "lfm2moe": ArchMemory(recurrent="no_kv", swa_attention_layers=True),
    "falcon-h1": ArchMemory(recurrent="all", attention_too=True),
    "mamba": ArchMemory(recurrent="all"),
    "mamba2": ArchMemory(recurrent="all"),
    # no KV cache
    "bert": ArchMemory(stateless=True),
    "nomic-bert": ArchMemory(stateless=True),
    "jina-bert-v2": ArchMemory(stateless=True),
}

PLAIN = ArchMemory()


def arch_memory(architecture: str) -> ArchMemory:
    """The row for an architecture; plain full attention when it has none."""
    return ARCHITECTURES.get(architecture, PLAIN)


def swa_period(architecture: str) -> int | None:
    """llama.cpp's hard-coded sliding-window period, or None when it sets none."""
    return arch_memory(architecture).swa_period
