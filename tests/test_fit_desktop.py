"""The plan a desktop user gets for the models of 2026 on a 24 GB card (pure: headers only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from localllm.fitter import FitRequest, fit_header, fit_ladder
from localllm.fitter.memory import HeaderFacts, state_layer_bytes
from localllm.gguf_header import ModelHeader, read_header
from localllm.hardware import GIB, Hardware, HostInfo, parse_gpu_names
from tests import gguf_factory as gf
from tests.arch_2026 import MODELS, write_model

HOST = HostInfo(64 * GIB, 56 * GIB, 8, 16, 60e9, 1e12, "assumed")
RTX4090 = Hardware(parse_gpu_names("rtx4090"), HOST, 8)
RTX3090 = Hardware(parse_gpu_names("rtx3090"), HOST, 8)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelHeader]:
    """With their real vocabularies (the output layer and logits matter for a plan)."""
    folder = tmp_path_factory.mktemp("desktop")
    vocab = {"Qwen3.5-27B": 248320, "Gemma-4-31B": 262144, "Nemotron-Nano-9B-v2": 131072}
    return {name: read_header(write_model(folder / f"{name}.gguf", MODELS[name], n_vocab=n))
            for name, n in vocab.items()}


def test_qwen35_27b_at_32k_is_entirely_on_a_4090(full: dict[str, ModelHeader]) -> None:
    header = full["Qwen3.5-27B"]
    plan = fit_header(header, RTX4090, FitRequest(n_ctx=32768))
    assert plan.full_offload and plan.fits
    gpu = plan.gpus[0]
    # 16 attention layers x 4 KV heads of 256 x (K + V) x f16 x 32768 cells, + the state
    state = sum(state_layer_bytes(header, 1))
    assert gpu.kv_bytes == 16 * 4 * 256 * 2 * 2 * 32768 + state
    assert round(state / 2**20, 1) == 149.6  # 48 Gated DeltaNet layers, one sequence
    # the MTP block is in the file but llama.cpp does not load it
    assert gpu.weights_bytes + plan.host.weights_bytes == HeaderFacts(header).total_bytes
    assert plan.decode_tok_s > 30


def test_gemma4_31b_fits_32k_with_the_small_swa_cache(full: dict[str, ModelHeader]) -> None:
    header = full["Gemma-4-31B"]
    small = fit_header(header, RTX4090, FitRequest(swa_full=False))
    assert (small.n_ctx_slot, small.full_offload) == (32768, True)
    assert any("small sliding-window cache" in n for n in small.notes)
    # the full-size cache must shorten the context; the plan says what it costs
    full_size = fit_header(header, RTX4090, FitRequest(swa_full=True))
    assert full_size.full_offload and full_size.n_ctx_slot < 32768
    note = next(n for n in full_size.notes if n.startswith("full-size sliding-window cache"))
    assert "--no-swa-full" in note and "27.5 GiB" in note and "3.7 GiB" in note


def test_qwen25_32b_gets_q4_k_m_with_8k_or_more_on_24gb(tmp_path: Path) -> None:
    """Context first, but not at any quality: the best quant of 4+ bits that keeps 8192+ tokens
    on the GPU (Q4_K_M), not Q5_K_M with 4096 (quant first) nor Q3_K_M with 32768."""
    headers = [read_header(p) for p in gf.write_ladder(tmp_path, gf.QWEN25_32B)]
    plan = fit_ladder(headers, RTX3090, FitRequest())
    assert plan.quant == "Q4_K_M" and plan.full_offload and plan.n_ctx_slot >= 8192
    rejected = dict(plan.rejected)
    assert "context first" in rejected["Q5_K_M"]
    assert "lower quality" in rejected["Q3_K_M"]
    assert any(n.startswith("desktop order") for n in plan.notes)


def test_recurrent_state_follows_its_layers(full: dict[str, ModelHeader]) -> None:
    header = full["Nemotron-Nano-9B-v2"]
    plan = fit_header(header, RTX4090, FitRequest(n_ctx=8192, n_gpu_layers=30))
    start = header.n_layer + 1 - 30
    layout = HeaderFacts(header).layout
    state = state_layer_bytes(header, 1)
    on_host = sum(s for il, s in enumerate(state) if il < start)
    assert layout.recurrent[0] and on_host > 0
    assert plan.host.kv_bytes >= on_host
    assert plan.gpus[0].kv_bytes + plan.host.kv_bytes >= sum(state)
