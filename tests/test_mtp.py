"""MTP (nextn) drafting on a tiny random-weight Qwen3.5 with an MTP block (`tests.tiny_models`).

Random weights make the block's guesses wrong, so these tests check the path (the MTP context
runs, drafts are produced, verified and counted, the target rolls back what it rejected, greedy
output is unchanged), and a variant whose block agrees with the trunk checks the accepted path.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from localllm.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, logs
from localllm.engine.mtp import (
    FEED_AT_ONCE_ROWS,
    MtpProposer,
    n_nextn_layers,
    nextn_api,
    speculative_greedy,
)
from localllm.errors import ModelLoadError
from localllm.gguf_header import read_header
from localllm.units import MIB
from tests.tiny_models import (
    AGREED_TOKEN,
    QWEN35_SPEC,
    write_deepseek2,
    write_qwen35,
    write_qwen35_mtp,
)

llama_cpp = pytest.importorskip("llama_cpp")

N_MAX = 3
PROMPT = list(range(5, 90))


class _Loaded:
    def __init__(self, path: Path, load_mtp: bool) -> None:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.load_mtp = load_mtp
        params.use_extra_bufts = False  # repacked weights crash on some VMs (engine.build)
        with logs.capture() as self.load_log:
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model
        self.contexts: list[Any] = []

    def context(self, n_seq: int = 1) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = 512
        params.n_batch = params.n_ubatch = 64
        params.n_seq_max = n_seq
        params.n_rs_seq = N_MAX  # the hybrid target rolls back rejected guesses
        params.n_threads = params.n_threads_batch = 2
        with logs.capture():
            ctx = llama_cpp.llama_init_from_model(self.model, params)
        assert ctx
        self.contexts.append(ctx)
        return ctx

    def close(self) -> None:
        for ctx in self.contexts:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(self.model)


def _load(path: Path, load_mtp: bool = True) -> Iterator[_Loaded]:
    loaded = _Loaded(path, load_mtp)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Loaded]:
    yield from _load(write_qwen35_mtp(tmp_path_factory.mktemp("mtp") / "tiny-mtp.gguf").path)


@pytest.fixture(scope="module")
def agreeing_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Loaded]:
    path = tmp_path_factory.mktemp("mtp") / "tiny-mtp-agrees.gguf"
    yield from _load(write_qwen35_mtp(path, agrees=True).path)


def _proposer(loaded: _Loaded, ctx: Any) -> MtpProposer:
    with logs.capture():
        return MtpProposer(loaded.model, ctx, n_seq=1, n_batch=64, n_threads=2)


def test_the_tiny_model_loads_its_mtp_block_only_when_asked(tmp_path: Path) -> None:
    path = write_qwen35_mtp(tmp_path / "tiny-mtp.gguf").path
    header = read_header(path)
    assert header.metadata["qwen35.nextn_predict_layers"] == 1
    block = sum(t.n_bytes for t in header.tensors if t.layer == QWEN35_SPEC.n_layer)
    assert block > 0
    weights = {}
    for load_mtp in (True, False):
        for loaded in _load(path, load_mtp):
            # llama.cpp reports the block either way; it loads its weights only with load_mtp
            assert n_nextn_layers(loaded.model) == 1
            weights[load_mtp] = sum(
                b.bytes for b in logs.buffer_lines(loaded.load_log) if b.kind == "model")
    assert weights[True] - weights[False] == pytest.approx(block, abs=0.01 * MIB)


def test_mtp_drafts_are_verified_and_greedy_output_is_unchanged(mtp_model: _Loaded) -> None:
    plain = speculative_greedy(mtp_model.context(), None, PROMPT, 40, n_batch=64)
    ctx = mtp_model.context()
    proposer = _proposer(mtp_model, ctx)
    try:
        run = speculative_greedy(ctx, proposer, PROMPT, 40, n_max=N_MAX, n_batch=64)
    finally:
        proposer.close()
    assert run.tokens == plain.tokens
    assert len(set(run.tokens)) > 1  # a real text, not one token repeated
    # every step drafted, and the target checked every guess
    assert proposer.stats.drafts == run.steps > 0
    assert run.drafted == proposer.stats.drafted_tokens >= run.steps
    assert 0 <= run.accepted <= run.drafted
    assert run.steps + run.accepted == len(run.tokens) - 1
    # the prompt's hidden states reached the MTP context (none fed as zeros)
    assert proposer.stats.missing_hidden == 0


def test_an_agreeing_mtp_block_saves_target_steps(agreeing_model: _Loaded) -> None:
    plain = speculative_greedy(agreeing_model.context(), None, PROMPT, 33, n_batch=64)
    ctx = agreeing_model.context()
    proposer = _proposer(agreeing_model, ctx)
    try:
        run = speculative_greedy(ctx, proposer, PROMPT, 33, n_max=N_MAX, n_batch=64)
    finally:
        proposer.close()
    assert run.tokens == plain.tokens == [AGREED_TOKEN] * 33
    assert run.accepted == run.drafted == 3 * run.steps
    assert run.steps == 32 // (N_MAX + 1)  # a step yields N_MAX guesses and the target's own


class _Oracle:
    """Guesses the known continuation, wrong at one place per draft: partial acceptance."""

    def __init__(self, prompt: Sequence[int], continuation: Sequence[int]) -> None:
        self.text = [*prompt, *continuation]

    def draft(self, seq_id: int, history: Sequence[int], n_max: int) -> list[int]:
        guesses = list(self.text[len(history) : len(history) + n_max])
        if len(guesses) == n_max:
            guesses[-1] = (guesses[-1] + 1) % 512
        return guesses

    def on_target_outputs(self, *_: object) -> None:
        pass

    def on_verified(self, seq_id: int, n_keep: int) -> None:
        pass


def test_partly_accepted_guesses_roll_the_hybrid_target_back(mtp_model: _Loaded) -> None:
    plain = speculative_greedy(mtp_model.context(), None, PROMPT, 40, n_batch=64)
    oracle: Any = _Oracle(PROMPT, plain.tokens)
    run = speculative_greedy(mtp_model.context(), oracle, PROMPT, 40, n_max=N_MAX, n_batch=64)
    assert run.tokens == plain.tokens
    assert 0 < run.accepted < run.drafted
    assert run.steps < plain.steps


def test_a_model_without_mtp_layers_refuses_draft_mtp(tmp_path: Path) -> None:
    plain = write_qwen35(tmp_path / "tiny-qwen35.gguf").path
    for loaded in _load(plain):
        with pytest.raises(ModelLoadError, match="MTP \\(nextn\\) layers, and this one has none"):
            MtpProposer(loaded.model, loaded.context(), n_seq=1)


def test_a_library_without_the_nextn_calls_is_a_clear_error() -> None:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    other = ctypes.CDLL(str(next(lib_dir.glob("libggml-base.so*"))))
    with pytest.raises(ModelLoadError, match="nextn embedding calls"):
        nextn_api(other)
    assert nextn_api().get_embeddings_nextn_ith is not None


# -- through the engine (continuous batching, spec_type draft-mtp) ------------------------------

# the second is long enough to be prefilled in chunks fed to the MTP context at once
PROMPTS = ("the quick brown fox jumps over the lazy dog", "a journey of a thousand miles " * 10)


def _engine(path: Path, **changes: Any) -> Engine:
    values: dict[str, Any] = dict(model_path=path, n_ctx=1024, n_parallel=2, n_batch=64,
                                  n_ubatch=64, n_threads=2, use_extra_bufts=False, seed=1)
    values.update(changes)
    return Engine.load(EngineConfig(**values))


def _texts(engine: Engine, max_tokens: int = 40) -> list[str]:
    handles = [engine.submit(GenerationRequest(p, max_tokens=max_tokens,
                                               sampling=SamplingParams(temperature=0.0)))
               for p in PROMPTS]  # both slots at once: one batch verifies both
    return [h.result().text for h in handles]


MTP_WRITERS = {
    "qwen35": write_qwen35_mtp,  # hybrid: rejected guesses roll back through n_rs_seq
    "deepseek2": lambda path: write_deepseek2(path, nextn=True),  # MLA + MoE, GLM-4.x style
}


@pytest.mark.parametrize("arch", list(MTP_WRITERS))
def test_the_engine_drafts_with_mtp_and_keeps_greedy_output(tmp_path: Path, arch: str) -> None:
    path = MTP_WRITERS[arch](tmp_path / f"tiny-{arch}-mtp.gguf").path
    with _engine(path) as plain:
        expected = _texts(plain)
    with _engine(path, spec_type="draft-mtp", spec_draft_n_max=3) as engine:
        got = _texts(engine)
        stats = engine.stats()
        proposer: Any = engine._proposer
        missing = proposer.stats.missing_hidden
        again = _texts(engine)  # the slots reuse their cells (and the MTP cache's) now
    assert got == again == expected
    assert stats.spec_type == "draft-mtp"
    assert stats.spec_drafts_total > 0
    assert stats.spec_draft_tokens_total >= stats.spec_drafts_total
    assert 0 <= stats.spec_accepted_tokens_total <= stats.spec_draft_tokens_total
    assert isinstance(proposer, MtpProposer)
    assert proposer.stats.drafted_tokens >= stats.spec_draft_tokens_total
    # the engine reported every prompt token's hidden state to the MTP context, the long
    # prompt's chunks as soon as they were decoded
    assert missing == 0
    assert proposer.stats.fed_at_once >= 64


def test_steps_without_drafting_still_feed_the_mtp_context(tmp_path: Path) -> None:
    """With spec_max_busy_slots 1 the two requests decode side by side without guesses; the
    tokens the target decodes meanwhile reach the MTP context in batches, not at the end."""
    path = write_qwen35_mtp(tmp_path / "tiny-mtp.gguf").path
    with _engine(path) as plain:
        expected = _texts(plain, 80)
    with _engine(path, spec_type="draft-mtp", spec_draft_n_max=3,
                 spec_max_busy_slots=1) as engine:
        got = _texts(engine, 80)
        proposer: Any = engine._proposer
        fed = proposer.stats.fed_at_once
        held = [len(slot.hidden) for slot in proposer.slots]
        prompt_tokens = engine.stats().prompt_tokens_total
    assert got == expected
    assert fed > prompt_tokens + FEED_AT_ONCE_ROWS  # generated tokens too, without a draft
    assert max(held) < FEED_AT_ONCE_ROWS


def test_a_request_cannot_ask_more_guesses_than_the_hybrid_target_rolls_back(
    tmp_path: Path,
) -> None:
    path = write_qwen35_mtp(tmp_path / "tiny-mtp.gguf").path
    with _engine(path) as plain:
        expected = _texts(plain)[0]
    with _engine(path, spec_type="draft-mtp", spec_draft_n_max=2) as engine:
        request = GenerationRequest(PROMPTS[0], max_tokens=40, spec_draft_n_max=8,
                                    sampling=SamplingParams(temperature=0.0))
        got = engine.submit(request).result().text
        stats = engine.stats()
    assert got == expected
    assert 0 < stats.spec_draft_tokens_total <= 2 * stats.spec_drafts_total


def test_the_engine_accepts_an_agreeing_mtp_block(tmp_path: Path) -> None:
    path = write_qwen35_mtp(tmp_path / "tiny-mtp.gguf", agrees=True).path
    with _engine(path) as plain:
        expected = _texts(plain, 33)
    with _engine(path, spec_type="draft-mtp", spec_draft_n_max=3) as engine:
        got = _texts(engine, 33)
        stats = engine.stats()
    assert got == expected
    assert stats.spec_accepted_tokens_total == stats.spec_draft_tokens_total > 0
    assert stats.spec_drafts_total <= 2 * 32 // (3 + 1) + 2  # 4 tokens a step, two requests


def test_the_engine_refuses_draft_mtp_without_mtp_layers(tmp_path: Path) -> None:
    path = write_qwen35(tmp_path / "tiny-qwen35.gguf").path
    with pytest.raises(ModelLoadError, match="MTP \\(nextn\\) layers"):
        _engine(path, spec_type="draft-mtp")


def test_a_trunk_only_conversion_is_refused_before_llama_cpp_aborts(tmp_path: Path) -> None:
    """A header that announces an MTP block without its tensors: llama.cpp loads such a
    deepseek2 file, then aborts the process (GGML_ASSERT) building the MTP graph."""
    path = write_deepseek2(tmp_path / "tiny-deepseek2.gguf", stripped_nextn=True).path
    with pytest.raises(ModelLoadError, match="does not carry its tensors"):
        _engine(path, spec_type="draft-mtp")
    with _engine(path) as engine:  # without draft-mtp the file serves as usual
        assert _texts(engine, 4)


def test_the_plan_counts_what_draft_mtp_allocates(tmp_path: Path) -> None:
    """serve's plan for draft-mtp against the engine it configures: the MTP block's weights,
    the MTP context's KV layer and compute buffer, the recurrent snapshots (n_rs_seq)."""
    from localllm.engine.dry_run import parse_load_log
    from localllm.loading import plan_for_serving
    from localllm.settings import Settings

    path = write_qwen35_mtp(tmp_path / "tiny-mtp.gguf").path
    measured = {}
    for spec_type in ("none", "draft-mtp"):
        settings = Settings(n_ctx=1024, parallel=2, threads=2, cpu_only=True,
                            spec_type=spec_type, spec_draft_n_max=3)
        plan, config, _ = plan_for_serving(path, settings)
        assert config.spec_type == spec_type
        with Engine.load(config) as engine:
            log = parse_load_log(engine.load_log)
            weights = engine.memory["model_mib"] * MIB
        host = plan.host
        assert host.weights_bytes == pytest.approx(weights, abs=0.01 * MIB)
        assert host.kv_bytes == pytest.approx(log.kv_bytes + log.state_bytes, abs=0.03 * MIB)
        assert host.compute_bytes == pytest.approx(log.total_compute_bytes, rel=0.10)
        measured[spec_type] = log
    # the MTP context: a second KV cache and compute buffer; the state kept 1 + 3 times
    assert len(measured["draft-mtp"].kv_caches) == 2 * len(measured["none"].kv_caches)
    assert measured["draft-mtp"].state_bytes == pytest.approx(
        4 * measured["none"].state_bytes, abs=0.03 * MIB)


def test_the_speed_prediction_counts_the_mtp_steps(tmp_path: Path) -> None:
    from localllm.fitter import FitRequest, fit_header
    from localllm.fitter.speculative import predict
    from localllm.hardware import GIB, Hardware, HostInfo
    from localllm.loading import mtp_speeds, plan_speculation
    from localllm.settings import Settings
    from tests.arch_2026 import MODELS, write_model

    header = read_header(write_model(tmp_path / "qwen35-27b.gguf", MODELS["Qwen3.5-27B"]))
    host = HostInfo(512 * GIB, 480 * GIB, 8, 16, 60e9, 1e12, "assumed")
    plan = fit_header(header, Hardware((), host, 8, cpu_repack=False),
                      FitRequest(n_ctx=8192, n_gpu_layers=0, mtp=True, n_rs_seq=3))
    speeds = mtp_speeds(plan)
    assert speeds is not None
    # one block of 65 and the output head: an MTP step is a small share of a target step
    assert 10 * plan.decode_tok_s < speeds[0] < 65 * plan.decode_tok_s
    settings = Settings(spec_type="draft-mtp", spec_draft_n_max=3, parallel=1)
    counted = plan_speculation(plan, settings)
    free = predict("draft-mtp", plan.decode_tok_s, plan.prompt_tok_s, n_max=3, n_parallel=1)
    assert counted is not None and counted.decode_tok_s < free.decode_tok_s
