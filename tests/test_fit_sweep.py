"""The fitter against llama.cpp's own dry run for the architectures of 2026 (tests/arch_2026.py).

Per model and configuration: llama.cpp builds the model and context with no_alloc (about a second)
and logs its KV cache, recurrent state and compute buffer; the fitter predicts the same from the
header alone. Tolerances: KV + recurrent state within 1%, compute within 10%; weights: the
fitter's file bytes equal llama.cpp's "file size" line (logged in 0.01 MiB / GiB) and what it
loads is that less the MTP blocks llama.cpp skips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from localllm.fitter import FitRequest, fit_header
from localllm.fitter.memory import HeaderFacts
from localllm.gguf_header import ModelHeader, read_header
from localllm.hardware import GIB, Hardware, HostInfo
from tests.arch_2026 import MODELS, write_model

pytest.importorskip("llama_cpp")

HOST = HostInfo(512 * GIB, 480 * GIB, 8, 16, 60e9, 1e12, "assumed")
CPU = Hardware((), HOST, 8, cpu_repack=False)
# (label, n_ctx per conversation, n_parallel, cache type, flash attention)
CONFIGS = [
    ("8k-f16", 8192, 1, "f16", False),
    ("32k-q8-fa", 32768, 1, "q8_0", True),
    ("32k-x4-f16", 32768, 4, "f16", False),
]


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelHeader]:
    folder = tmp_path_factory.mktemp("sweep")
    return {name: read_header(write_model(folder / f"{name}.gguf", m))
            for name, m in MODELS.items()}


def measure(
    header: ModelHeader, n_ctx: int, n_seq: int, cache: str, fa: bool, mtp: bool = False
) -> dict[str, int]:
    """llama.cpp's figures and the fitter's for one configuration (with `mtp`: the MTP block
    loaded and an MTP draft context beside the target's, as spec_type draft-mtp runs)."""
    from localllm.engine.dry_run import dry_run

    measured = dry_run(header.path, n_ctx=n_ctx * n_seq, n_parallel=n_seq, type_k=cache,
                       type_v=cache, flash_attn=fa, swa_full=True, n_gpu_layers=0, mtp=mtp)
    plan = fit_header(header, CPU, FitRequest(n_ctx=n_ctx, n_parallel=n_seq, type_k=cache,
                                              type_v=cache, flash_attn=fa, n_gpu_layers=0,
                                              mtp=mtp))
    facts = HeaderFacts(header, load_mtp=mtp)
    return {
        "file": header.total_bytes, "file_llama": measured.weights_bytes,
        "loaded": facts.total_bytes,
        "kv": plan.host.kv_bytes, "kv_llama": measured.kv_bytes + measured.state_bytes,
        "compute": plan.host.compute_bytes, "compute_llama": measured.total_compute_bytes,
        "output": plan.host.output_bytes, "output_llama": measured.total_output_bytes,
    }


# Where the compute model misses by more than 10% (both over-estimates, the safe side): with flash
# attention and a small vocabulary the MoE FFN phase sets the peak, and ggml's allocator packs
# these two architectures' expert intermediates tighter than the linear model says.
COMPUTE_OVER = {("Granite-4.0-H-Small", "32k-q8-fa"): 0.20, ("gpt-oss-20b", "32k-q8-fa"): 0.13}


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("name", list(MODELS))
def test_fitter_matches_llama_cpp(headers: dict[str, ModelHeader], name: str,
                                  config: tuple[str, int, int, str, bool]) -> None:
    label, n_ctx, n_seq, cache, fa = config
    header = headers[name]
    got = measure(header, n_ctx, n_seq, cache, fa)
    # "file size = X MiB/GiB" with two decimals
    assert abs(got["file"] - got["file_llama"]) <= 0.006 * (GIB if got["file"] > GIB else 2**20)
    assert got["kv"] == pytest.approx(got["kv_llama"], rel=0.01, abs=2**20 * 0.01)
    over = COMPUTE_OVER.get((name, label))
    if over is None:
        assert got["compute"] == pytest.approx(got["compute_llama"], rel=0.10)
    else:  # known over-estimate: never below llama.cpp, and no further above than recorded
        assert got["compute_llama"] <= got["compute"] <= (1 + over) * got["compute_llama"]


def test_mtp_blocks_are_not_counted(headers: dict[str, ModelHeader]) -> None:
    header = headers["Qwen3.5-27B"]
    facts = HeaderFacts(header)
    mtp = sum(t.n_bytes for t in header.tensors if t.layer == 64)
    assert mtp > 0 and facts.total_bytes == header.total_bytes - mtp
    assert facts.layout.n_layer_trunk == 64 and not facts.layout.attention[64]


def report(folder: Path) -> list[str]:
    """The sweep as a table (scripts and docs): family, config, fitter vs llama.cpp."""
    rows = []
    for name, m in MODELS.items():
        header = read_header(write_model(folder / f"{name}.gguf", m))
        for label, n_ctx, n_seq, cache, fa in CONFIGS:
            got = measure(header, n_ctx, n_seq, cache, fa)

            def err(key: str, got: dict[str, int] = got) -> str:
                ref = got[f"{key}_llama"]
                return f"{100 * (got[key] - ref) / ref:+.2f}%" if ref else "n/a"

            rows.append(
                f"| {name} ({m.arch}) | {label} | {got['loaded'] / GIB:.2f} / "
                f"{got['file_llama'] / GIB:.2f} | {got['kv'] / 2**20:.1f} / "
                f"{got['kv_llama'] / 2**20:.1f} ({err('kv')}) | {got['compute'] / 2**20:.1f} / "
                f"{got['compute_llama'] / 2**20:.1f} ({err('compute')}) |"
            )
    return rows


MTP_MODELS = [name for name, m in MODELS.items() if m.n_nextn]
# With flash attention the draft context's compute buffer is 20-30% below the trunk's widest
# attention/FFN phase the fitter counts for it (measured: Qwen3.5-27B 144 vs 174 MiB); the sum
# of both contexts is then over by up to this much, the safe side.
MTP_COMPUTE_OVER = {("Qwen3.5-27B", "32k-q8-fa"): 0.15, ("Qwen3.5-35B-A3B", "32k-q8-fa"): 0.25,
                    ("GLM-4.5-Air", "32k-q8-fa"): 0.18}


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("name", MTP_MODELS)
def test_fitter_counts_the_mtp_draft_context(headers: dict[str, ModelHeader], name: str,
                                             config: tuple[str, int, int, str, bool]) -> None:
    """spec_type draft-mtp: the MTP block's weights, the draft context's KV layer, compute and
    output buffers, against llama.cpp building both contexts."""
    label, n_ctx, n_seq, cache, fa = config
    header = headers[name]
    without = measure(header, n_ctx, n_seq, cache, fa)
    got = measure(header, n_ctx, n_seq, cache, fa, mtp=True)
    assert got["loaded"] == header.total_bytes > without["loaded"]
    assert got["kv_llama"] > without["kv_llama"]
    assert got["kv"] == pytest.approx(got["kv_llama"], rel=0.01, abs=2**20 * 0.01)
    over = MTP_COMPUTE_OVER.get((name, label))
    if over is None:
        assert got["compute"] == pytest.approx(got["compute_llama"], rel=0.10)
    else:
        assert got["compute_llama"] <= got["compute"] <= (1 + over) * got["compute_llama"]
    # and the target's hidden states of a batch, allocated at the first decode (not in the log)
    nextn = header.n_embd * min(2048, n_ctx * n_seq) * 4
    assert got["output"] == pytest.approx(got["output_llama"] + nextn, abs=0.01 * 2**20)


@pytest.mark.parametrize("n_rs_seq", [3, 8])
def test_fitter_counts_recurrent_snapshots(headers: dict[str, ModelHeader], n_rs_seq: int) -> None:
    """draft-mtp on a hybrid model: the target keeps n_rs_seq snapshots of each sequence's
    recurrent state to roll back rejected guesses (llama.cpp's need_n_rs_seq)."""
    from localllm.engine.dry_run import dry_run

    header = headers["Qwen3.5-27B"]
    measured = dry_run(header.path, n_ctx=2 * 8192, n_parallel=2, n_gpu_layers=0,
                       flash_attn=True, n_rs_seq=n_rs_seq)
    request = FitRequest(n_ctx=8192, n_parallel=2, flash_attn=True, n_gpu_layers=0,
                         n_rs_seq=n_rs_seq)
    plan = fit_header(header, CPU, request)
    assert plan.host.kv_bytes == pytest.approx(measured.kv_bytes + measured.state_bytes,
                                               rel=0.01)


def test_llama_cpp_really_leaves_the_mtp_block_unloaded(tmp_path: Path) -> None:
    """A real (not dry) load of a small Qwen3.5-shaped file: llama.cpp's model buffer holds the
    trunk's tensors, not the MTP block's, exactly what the fitter counts."""
    import dataclasses

    import llama_cpp

    from localllm.engine import logs
    from localllm.ggml import LOAD_MODE_NONE
    from localllm.units import MIB

    small = dataclasses.replace(
        MODELS["Qwen3.5-27B"], n_layer=4, n_embd=256, n_head=2, head_dim=128, n_ff=512,
        n_vocab=1024,
        keys={**MODELS["Qwen3.5-27B"].keys, "ssm.inner_size": 256, "ssm.state_size": 64,
              "ssm.group_count": 2, "ssm.time_step_rank": 4})
    header = read_header(write_model(tmp_path / "small.gguf", small))
    llama: Any = llama_cpp
    with logs.capture() as lines:
        llama.llama_backend_init()
        params = llama.llama_model_default_params()
        params.load_mode = LOAD_MODE_NONE  # read the (all-zero) data into a buffer
        params.use_extra_bufts = False  # no CPU_REPACK copy
        params.n_gpu_layers = 0
        model = llama.llama_model_load_from_file(str(header.path).encode(), params)
        assert model
        llama.llama_model_free(model)
    loaded = sum(b.bytes for b in logs.buffer_lines(lines) if b.kind == "model")
    facts = HeaderFacts(header)
    assert facts.skipped_bytes > 0
    assert abs(loaded - facts.total_bytes) <= 0.006 * MIB


def test_fit_check_counts_the_recurrent_state(headers: dict[str, ModelHeader]) -> None:
    from localllm.loading import check_plan

    plan = fit_header(headers["Nemotron-Nano-9B-v2"], CPU, FitRequest(n_ctx=4096, n_parallel=2))
    rows = {row.what: row for row in check_plan(plan)}
    assert rows["KV cache"].gap_percent == pytest.approx(0, abs=0.01)
