"""Speculative decoding (localllm.engine.speculative): the verification inside continuous
batching, the proposers, the sampling guarantee, the counters.

Two kinds of tests. A stub backend (a tiny vocabulary whose logits are a pure function of a
sequence's tokens, with llama.cpp's position rules enforced) checks the mechanism exactly: greedy
output token-identical, the distribution kept under sampling (a chi-square test with a fixed
seed), KV cells cut back after rejections, cancellation and timeouts between verifications. The
real embedded models check the same on llama.cpp: SmolLM2-135M-Instruct Q4_1, whose batched and
single-token kernels give identical logits, is greedy-identical with each proposer and is its own
draft model with acceptance near 1.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localllm.engine import Engine, EngineConfig
from localllm.engine.backend import BatchItem
from localllm.engine.speculative import NgramProposer, ngram_simple_draft
from localllm.engine.types import GenerationRequest, SamplingParams
from localllm.errors import CancelledError, ModelLoadError, RequestTimeoutError

EOS = 9
N_VOCAB = 10


# ---------------------------------------------------------------------------- the stub backend


def cyclic_logits(tokens: Sequence[int]) -> np.ndarray:
    """A 'model' that counts 0..4 in a cycle, skipping one number every 7th position: the
    n-gram proposer guesses right most of the time and wrong at the skips."""
    last = tokens[-1] % 5
    step = 2 if len(tokens) % 7 == 0 else 1
    row = np.full(N_VOCAB, -5.0, dtype=np.float32)
    row[(last + step) % 5] = 3.0
    row[(last + step + 1) % 5] = 1.0
    return row


class StubSampler:
    def __init__(self, backend: StubBackend, params: SamplingParams, seed: int) -> None:
        self.backend = backend
        self.temperature = params.temperature
        self.rng = np.random.default_rng(seed)
        self.needs_row = False

    def sample(self, batch_index: int) -> int:
        row = self.backend.rows[batch_index]
        if self.temperature <= 0:
            return int(np.argmax(row))
        p = np.exp((row - row.max()) / self.temperature)
        return int(self.rng.choice(len(row), p=p / p.sum()))

    def free(self) -> None:
        pass


class StubBackend:
    """The Backend protocol over a pure-Python 'model'; enforces llama.cpp's rule that a
    sequence's next tokens continue right after the last position its cells hold."""

    n_vocab = N_VOCAB
    bos_id = 0
    eos_id = EOS
    architecture = "stub"
    chat_template = None
    n_swa = 0
    recurrent = False
    embedding_only = False

    def __init__(self, logits: Any = cyclic_logits) -> None:
        self.logits = logits
        self.load_log: list[str] = []
        self.cells: dict[int, list[int]] = {}
        self.rows: dict[int, np.ndarray] = {}
        self.decodes = 0
        self.batch_sizes: list[int] = []
        self.batches: list[list[BatchItem]] = []
        self.gate: threading.Event | None = None  # set: decode waits for it
        self.entered = threading.Event()

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return [int(c) for c in text if c.isdigit()]

    def control_tokens(self) -> Any:
        return np.zeros(N_VOCAB, dtype=bool)

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        return b"" if token == EOS else str(token).encode()

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(self.token_bytes(t).decode() for t in tokens)

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def decode(self, items: Sequence[BatchItem]) -> int:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.decodes += 1
        self.batch_sizes.append(len(items))
        self.batches.append(list(items))
        self.rows = {}
        for index, item in enumerate(items):
            cells = self.cells.setdefault(item.seq_id, [])
            assert item.pos == len(cells), f"seq {item.seq_id}: pos {item.pos}, {len(cells)} held"
            cells.append(item.token)
            if item.logits:
                self.rows[index] = self.logits(cells)
        return 0

    def logprobs(self, batch_index: int) -> Any:
        row = self.rows[batch_index]
        return row - np.log(np.exp(row).sum())

    def logits_row(self, batch_index: int) -> Any:
        return self.rows[batch_index].copy()

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        assert p1 == -1
        cells = self.cells.setdefault(seq_id, [])
        del cells[max(p0, 0) :]
        return True

    def seq_pos_min(self, seq_id: int) -> int:
        return 0 if self.cells.get(seq_id) else -1

    def partial_state(self, seq_id: int) -> bytes:
        return b""

    def restore_partial_state(self, seq_id: int, data: bytes) -> bool:
        return True

    def compile_grammar(self, text: str) -> Any:
        raise NotImplementedError

    def new_sampler(self, params: SamplingParams, seed: int, grammar: Any = None) -> StubSampler:
        return StubSampler(self, params, seed)

    def embedder(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FixedProposer:
    """Always guesses `token`, n_max times (a deterministic proposal)."""

    name = "fixed"
    wants_prompt_outputs = False

    def __init__(self, token: int) -> None:
        self.token = token
        self.verified: list[tuple[int, int]] = []
        self.outputs: list[tuple[int, list[int], list[int]]] = []

    def draft(self, seq_id: int, history: Sequence[int], n_max: int) -> list[int]:
        return [self.token] * n_max

    def on_target_outputs(
        self, seq_id: int, positions: Sequence[int], batch_indices: Sequence[int]
    ) -> None:
        self.outputs.append((seq_id, list(positions), list(batch_indices)))

    def on_verified(self, seq_id: int, n_keep: int) -> None:
        self.verified.append((seq_id, n_keep))

    def release(self, seq_id: int) -> None:
        pass

    def close(self) -> None:
        pass


def stub_engine(backend: StubBackend, proposer: Any = None, **changes: Any) -> Engine:
    values: dict[str, Any] = dict(
        model_path=Path(__file__), n_ctx=4096, n_parallel=4, n_batch=256, seed=7
    )
    values.update(changes)
    return Engine(EngineConfig(**values), backend, proposer)  # type: ignore[arg-type]


def run(engine: Engine, prompt: Sequence[int], **kwargs: Any) -> Any:
    sampling = SamplingParams(temperature=kwargs.pop("temperature", 0.0), **kwargs.pop("s", {}))
    request = GenerationRequest(prompt=tuple(prompt), sampling=sampling, **kwargs)
    return engine.submit(request).result()


PROMPT = [1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]


def cells_match(backend: StubBackend, engine: Engine) -> bool:
    """The stub's cells are exactly what each slot says it holds."""
    return all(backend.cells.get(s.seq_id, []) == s.cached for s in engine._slots)


# ---------------------------------------------------------------------------- stub tests


def test_ngram_simple_finds_the_latest_earlier_occurrence() -> None:
    history = [5, 1, 2, 3, 7, 8, 1, 2, 3, 6, 6, 6, 1, 2, 3]
    assert ngram_simple_draft(history, 3, 2) == [6, 6]  # the match at 6, not the one at 1
    assert ngram_simple_draft(history, 3, 8) == [6, 6, 6, 1, 2, 3]  # to the end at most
    assert ngram_simple_draft([1, 2, 3, 4, 5, 6, 7, 8], 2, 4) == []  # no repeat: no guess
    assert ngram_simple_draft([1, 2, 1, 2], 2, 4) == []  # too short for a pattern + a match


def test_ngram_simple_matches_llama_cpps_loop_on_random_histories() -> None:
    def loop(history: list[int], size_n: int, n_max: int) -> list[int]:
        # common_ngram_simple_draft's search, position by position from the end
        n = len(history)
        if n <= 2 * size_n:
            return []
        pattern = history[n - size_n :]
        for j in range(n - size_n - 1, 0, -1):
            if history[j : j + size_n] == pattern:
                take = min(n_max, n - (j + size_n))
                return history[j + size_n : j + size_n + take] if take >= min(size_n, n_max) else []
        return []

    rng = np.random.default_rng(0)
    for _ in range(500):
        history = [int(t) for t in rng.integers(0, 3, int(rng.integers(1, 60)))]
        for size_n in (1, 2, 3, 4):
            for n_max in (1, 3, 8):
                assert ngram_simple_draft(history, size_n, n_max) == loop(history, size_n, n_max)


def test_greedy_output_is_token_identical_with_ngram_speculation() -> None:
    plain_backend, spec_backend = StubBackend(), StubBackend()
    with stub_engine(plain_backend) as plain:
        expected = run(plain, PROMPT, max_tokens=60)
    with stub_engine(
        spec_backend, spec_type="ngram-simple", spec_ngram_simple_size_n=3, spec_draft_n_max=6
    ) as spec:
        got = run(spec, PROMPT, max_tokens=60)
        stats = spec.stats()
        assert cells_match(spec_backend, spec)
    assert got.text == expected.text
    assert got.usage.completion_tokens == 60 == expected.usage.completion_tokens
    assert stats.spec_type == "ngram-simple"
    assert stats.spec_drafts_total > 0
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total  # skips rejected
    assert spec_backend.decodes < plain_backend.decodes  # fewer target steps


def test_stop_strings_eog_and_logprobs_stay_right_inside_accepted_guesses() -> None:
    with stub_engine(StubBackend()) as plain:
        expected = run(plain, PROMPT, max_tokens=40, logprobs=2)
        cut = run(plain, PROMPT, max_tokens=40, stop=("40",))
    spec_backend = StubBackend()
    with stub_engine(
        spec_backend, spec_type="ngram-simple", spec_ngram_simple_size_n=3, spec_draft_n_max=8
    ) as spec:
        got = run(spec, PROMPT, max_tokens=40, logprobs=2)
        stopped = run(spec, PROMPT, max_tokens=40, stop=("40",))
        assert cells_match(spec_backend, spec)
    assert got.text == expected.text
    assert [lp.logprob for lp in got.logprobs] == [lp.logprob for lp in expected.logprobs]
    assert len(got.logprobs) == 40
    assert stopped.text == cut.text and stopped.finish_reason == cut.finish_reason == "stop"


def end_after_eight(tokens: Sequence[int]) -> np.ndarray:
    row = cyclic_logits(tokens)
    if len(tokens) >= len(PROMPT) + 8:
        row[EOS] = 10.0
    return row


def test_an_end_of_generation_token_inside_the_guesses_ends_the_request() -> None:
    backend = StubBackend(end_after_eight)
    with stub_engine(backend, FixedProposer(EOS)) as spec:
        got = run(spec, PROMPT, max_tokens=50)
        assert cells_match(backend, spec)
    with stub_engine(StubBackend(end_after_eight)) as plain:
        expected = run(plain, PROMPT, max_tokens=50)
    assert got.text == expected.text and got.finish_reason == "stop"
    assert got.usage.completion_tokens == expected.usage.completion_tokens == 9


def test_the_proposer_hears_of_outputs_and_verifications() -> None:
    proposer = FixedProposer(4)
    backend = StubBackend()
    with stub_engine(backend, proposer, spec_draft_n_max=3) as engine:
        run(engine, PROMPT, max_tokens=10)
    # The prompt's last token, then verification batches of the pending token + 3 guesses.
    assert proposer.outputs[0] == (0, [len(PROMPT) - 1], [len(PROMPT) - 1])
    seq, positions, indices = proposer.outputs[1]
    assert positions == [len(PROMPT) + i for i in range(4)] and indices == [0, 1, 2, 3]
    assert proposer.verified and all(n > len(PROMPT) for _, n in proposer.verified)


def fixed_distribution(tokens: Sequence[int]) -> np.ndarray:
    return np.log(np.array([0.4, 0.25, 0.2, 0.1, 0.05, 0, 0, 0, 0, 0]) + 1e-30).astype(np.float32)


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    """Guessing token 1 (p = 0.25) every time must not make it more frequent: every generated
    token is drawn from p whatever was guessed. Chi-square over 5 tokens (4 degrees of freedom)
    at a fixed seed; the bound 40 is p < 1e-7, while always accepting the guess gives > 1000."""
    backend = StubBackend(fixed_distribution)
    p = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    counts = np.zeros(5)
    with stub_engine(backend, FixedProposer(1), spec_draft_n_max=4, seed=3) as engine:
        for i in range(20):
            out = run(engine, PROMPT, max_tokens=200, temperature=1.0, s={"seed": 1000 + i})
            tokens = [int(c) for c in out.text]
            counts += np.bincount(tokens, minlength=5)[:5]
        stats = engine.stats()
    n = counts.sum()
    chi2 = float((((counts - n * p) ** 2) / (n * p)).sum())
    assert n == 4000
    assert chi2 < 40, (counts / n, chi2)
    rate = stats.spec_acceptance_rate
    # A guess is checked only after the ones before it were accepted: (p + p^2 + p^3 + p^4) / 4
    # of the 4 guesses per step are accepted, p = 0.25: 0.083.
    assert rate is not None and 0.05 < rate < 0.12


def guessing_streams(batch: Sequence[BatchItem]) -> int:
    """Slots whose generated tokens in this step include guesses (a generated position is past
    every prompt here: the longest is PROMPT)."""
    per_seq: dict[int, int] = {}
    for item in batch:
        if item.pos >= len(PROMPT):
            per_seq[item.seq_id] = per_seq.get(item.seq_id, 0) + 1
    return sum(1 for n in per_seq.values() if n > 1)


def test_four_concurrent_slots_verify_in_one_batch() -> None:
    prompts = [PROMPT, PROMPT[1:], PROMPT[2:], PROMPT[3:]]
    with stub_engine(StubBackend()) as plain:
        expected = [run(plain, p, max_tokens=50).text for p in prompts]
    backend = StubBackend()
    backend.gate = threading.Event()  # hold the first step until all four are queued
    with stub_engine(
        backend, spec_type="ngram-simple", spec_ngram_simple_size_n=3, spec_draft_n_max=4
    ) as spec:
        handles = [
            spec.submit(
                GenerationRequest(prompt=tuple(p), max_tokens=50, sampling=SamplingParams(0))
            )
            for p in prompts
        ]
        backend.gate.set()
        got = [h.result().text for h in handles]
        assert cells_match(backend, spec)
    assert got == expected
    # Some step verified guesses of several slots together.
    assert max(guessing_streams(batch) for batch in backend.batches) >= 2


def guessed_beside_another_stream(limit: int) -> tuple[bool, bool]:
    """Two greedy requests side by side: (did a step that decoded both streams carry guesses,
    did any step carry guesses)."""
    backend = StubBackend()
    backend.gate = threading.Event()  # the first step waits until both are queued
    with stub_engine(
        backend,
        spec_type="ngram-simple",
        spec_ngram_simple_size_n=3,
        spec_draft_n_max=2,  # many steps each: the two streams overlap for most of them
        spec_max_busy_slots=limit,
    ) as spec:
        request = GenerationRequest(
            prompt=tuple(PROMPT), max_tokens=300, sampling=SamplingParams(0)
        )
        handles = [spec.submit(request) for _ in range(2)]
        backend.gate.set()
        for handle in handles:
            handle.result()
    beside = any_guess = False
    for batch in backend.batches:
        # Generated tokens are past the prompt: per stream, how many in this step.
        per_seq: dict[int, int] = {}
        for item in batch:
            if item.pos >= len(PROMPT):
                per_seq[item.seq_id] = per_seq.get(item.seq_id, 0) + 1
        guessed = any(n > 1 for n in per_seq.values())
        any_guess |= guessed
        beside |= guessed and len(per_seq) > 1
    return beside, any_guess


def test_spec_max_busy_slots_turns_guessing_off_when_many_slots_decode() -> None:
    assert not guessed_beside_another_stream(limit=1)[0]  # guesses only when alone
    assert guessed_beside_another_stream(limit=0)[0]  # no limit: guesses beside each other


def test_cancelling_between_verifications_leaves_the_slot_reusable() -> None:
    with stub_engine(StubBackend()) as plain:
        expected = run(plain, PROMPT, max_tokens=40).text
    backend = StubBackend()
    with stub_engine(
        backend, spec_type="ngram-simple", spec_ngram_simple_size_n=3, spec_draft_n_max=4
    ) as spec:
        backend.gate = threading.Event()
        handle = spec.submit(
            GenerationRequest(prompt=tuple(PROMPT), max_tokens=40, sampling=SamplingParams(0))
        )
        for _ in range(3):  # let a few verification steps through, then cancel inside one
            backend.entered.clear()
            backend.gate.set()
            backend.gate.clear()
            assert backend.entered.wait(30)
        handle.cancel()
        backend.gate.set()
        with pytest.raises(CancelledError):
            handle.result()
        backend.gate = None
        assert cells_match(backend, spec)
        again = run(spec, PROMPT, max_tokens=40)
        assert cells_match(backend, spec)
    assert again.text == expected


def test_a_timeout_during_verification_fails_the_request_and_frees_the_slot() -> None:
    backend = StubBackend()

    def slow(tokens: Sequence[int]) -> np.ndarray:
        if len(tokens) > len(PROMPT) + 4:
            time.sleep(0.05)
        return cyclic_logits(tokens)

    backend.logits = slow
    with stub_engine(
        backend, spec_type="ngram-simple", spec_ngram_simple_size_n=3, spec_draft_n_max=4
    ) as spec:
        with pytest.raises(RequestTimeoutError):
            run(spec, PROMPT, max_tokens=1000, timeout_s=0.5)
        assert cells_match(backend, spec)
        backend.logits = cyclic_logits
        assert run(spec, PROMPT, max_tokens=5).usage.completion_tokens == 5
        assert spec.stats().busy_slots == 0


def test_metrics_expose_the_speculation_counters_and_acceptance_rate() -> None:
    from localllm.server.metrics import Metrics

    with stub_engine(
        StubBackend(), spec_type="ngram-simple", spec_ngram_simple_size_n=3, spec_draft_n_max=4
    ) as engine:
        metrics = Metrics(engine.stats)
        before = metrics.render().decode()
        run(engine, PROMPT, max_tokens=40)
        after = metrics.render().decode()
        stats = engine.stats()

    def value(text: str, name: str) -> float | None:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    assert value(before, "localllm_spec_decode_num_drafts_total") == 0
    assert value(before, "localllm_spec_decode_acceptance_rate") is None  # nothing drafted yet
    assert value(after, "localllm_spec_decode_num_drafts_total") == stats.spec_drafts_total > 0
    drafted = value(after, "localllm_spec_decode_num_draft_tokens_total")
    accepted = value(after, "localllm_spec_decode_num_accepted_tokens_total")
    assert drafted == stats.spec_draft_tokens_total and accepted == stats.spec_accepted_tokens_total
    assert value(after, "localllm_spec_decode_acceptance_rate") == pytest.approx(accepted / drafted)


def test_a_recurrent_model_runs_without_speculation() -> None:
    backend = StubBackend()
    backend.recurrent = True
    with stub_engine(backend, spec_type="ngram-simple", spec_ngram_simple_size_n=3) as engine:
        run(engine, PROMPT, max_tokens=20)
        stats = engine.stats()
    assert stats.spec_type == "none" and stats.spec_drafts_total == 0


def test_an_unknown_spec_type_and_a_missing_draft_model_are_refused() -> None:
    with pytest.raises(ModelLoadError, match="spec_type"):
        stub_engine(StubBackend(), spec_type="eagle9")
    with pytest.raises(ModelLoadError, match="spec_draft_model"):
        stub_engine(StubBackend(), spec_type="draft-simple")


def test_ngram_proposer_protocol_is_stateless() -> None:
    proposer = NgramProposer(size_n=2)
    assert proposer.draft(0, [4, 1, 2, 3, 5, 1, 2], 3) == [3, 5, 1]
    proposer.on_verified(0, 3)
    proposer.release(0)
    proposer.close()


# ---------------------------------------------------------------------------- real models

CODE_PROMPT = (
    "<|im_start|>user\nRename the variable total to subtotal in this code and show the whole "
    "code:\n```python\ndef total_price(items):\n    total = 0\n    for item in items:\n"
    "        total += item.price * item.quantity\n    return total\n```<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def real_engine(model: Path, **changes: Any) -> Engine:
    values: dict[str, Any] = dict(
        model_path=model,
        n_ctx=2048,
        n_parallel=2,
        n_threads=1,
        n_batch=256,
        n_ubatch=256,
        use_extra_bufts=False,
        seed=1,
    )
    values.update(changes)
    return Engine.load(EngineConfig(**values))


def greedy(engine: Engine, prompt: str, n: int) -> Any:
    request = GenerationRequest(prompt=prompt, max_tokens=n, sampling=SamplingParams(0))
    return engine.submit(request).result()


@pytest.fixture(scope="module")
def plain_code_answer(instruct_model_path: Path) -> str:
    with real_engine(instruct_model_path) as engine:
        return str(greedy(engine, CODE_PROMPT, 64).text)


def test_ngram_speculation_on_the_instruct_model_is_greedy_identical(
    instruct_model_path: Path, plain_code_answer: str
) -> None:
    with real_engine(
        instruct_model_path, spec_type="ngram-simple", spec_ngram_simple_size_n=3
    ) as engine:
        got = greedy(engine, CODE_PROMPT, 64)
        stats = engine.stats()
    assert got.text == plain_code_answer
    assert stats.spec_drafts_total > 0 and stats.spec_accepted_tokens_total > 0


def test_the_model_as_its_own_draft_is_greedy_identical_with_acceptance_near_one(
    instruct_model_path: Path, plain_code_answer: str
) -> None:
    with real_engine(
        instruct_model_path,
        spec_type="draft-simple",
        spec_draft_model=instruct_model_path,
        spec_draft_n_max=8,
    ) as engine:
        got = greedy(engine, CODE_PROMPT, 64)
        stats = engine.stats()
        memory = engine.memory
    assert got.text == plain_code_answer
    assert stats.spec_type == "draft-simple"
    rate = stats.spec_acceptance_rate
    assert rate is not None and rate > 0.9, rate
    # The draft's buffers are the target's again (same file, same slots).
    assert memory["draft_model_mib"] == memory["model_mib"]
    assert memory["draft_kv_cache_mib"] == memory["kv_cache_mib"]


def test_a_draft_model_with_another_vocabulary_is_refused(
    instruct_model_path: Path, embedded_model_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match="same tokenizer"):
        real_engine(
            instruct_model_path, spec_type="draft-simple", spec_draft_model=embedded_model_path
        )


def test_draft_model_memory_matches_its_plan(instruct_model_path: Path) -> None:
    from localllm.fitter import FitRequest
    from localllm.loading import plan_draft_model, plan_for_serving, planning_hardware
    from localllm.settings import Settings

    settings = Settings(
        n_ctx=2048,
        parallel=2,
        threads=1,
        cpu_only=True,
        spec_type="draft-simple",
        spec_draft_model=str(instruct_model_path),
    )
    plan, config, _ = plan_for_serving(instruct_model_path, settings)
    hardware, _ = planning_hardware(settings)
    draft_plan = plan_draft_model(settings, hardware, FitRequest.from_settings(settings))
    assert draft_plan is not None
    assert draft_plan.n_ctx == plan.n_ctx
    assert config.spec_type == "draft-simple"
    with Engine.load(config) as engine:
        memory = engine.memory
    host = draft_plan.host
    mib = 1024 * 1024
    assert memory["draft_model_mib"] == pytest.approx(host.weights_bytes / mib, rel=0.1)
    assert memory["draft_kv_cache_mib"] == pytest.approx(host.kv_bytes / mib, rel=0.1)
    assert memory["draft_compute_mib"] <= 1.2 * host.compute_bytes / mib


def test_per_request_speculative_fields_as_llama_server_names_them() -> None:
    from fastapi.testclient import TestClient

    from localllm.server import create_app
    from localllm.settings import Settings

    class Recording(FixedProposer):
        def __init__(self) -> None:
            super().__init__(2)
            self.n_max: list[int] = []

        def draft(self, seq_id: int, history: Sequence[int], n_max: int) -> list[int]:
            self.n_max.append(n_max)
            return super().draft(seq_id, history, n_max)

    proposer = Recording()
    with stub_engine(StubBackend(), proposer, spec_draft_n_max=8) as engine:
        app = create_app(Settings(api_keys=[]), engine, model_id="stub")  # type: ignore[arg-type]
        with TestClient(app, base_url="http://localhost") as client:
            body: dict[str, Any] = {
                "model": "stub",
                "prompt": PROMPT,
                "max_tokens": 20,
                "temperature": 0,
            }
            assert client.post("/v1/completions", json=body).status_code == 200
            assert max(proposer.n_max) == 8
            proposer.n_max.clear()
            answer = client.post("/v1/completions", json={**body, "speculative.n_max": 2})
            assert answer.status_code == 200, answer.text
            assert proposer.n_max and max(proposer.n_max) == 2
            refused = client.post("/v1/completions", json={**body, "speculative.p_min": 0.5})
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "speculative.p_min"
            bad = client.post("/v1/completions", json={**body, "speculative.n_max": "many"})
            assert bad.status_code == 400


def test_four_concurrent_real_slots_with_ngram_speculation_match_plain_decoding(
    instruct_model_path: Path,
) -> None:
    prompts = [CODE_PROMPT.replace("total", name) for name in ("total", "sum", "acc", "value")]
    with real_engine(instruct_model_path, n_parallel=4) as plain:
        expected = [str(greedy(plain, p, 40).text) for p in prompts]
    with real_engine(
        instruct_model_path, n_parallel=4, spec_type="ngram-simple", spec_ngram_simple_size_n=3
    ) as spec:
        handles = [
            spec.submit(GenerationRequest(prompt=p, max_tokens=40, sampling=SamplingParams(0)))
            for p in prompts
        ]
        got = [str(h.result().text) for h in handles]
        stats = spec.stats()
    assert got == expected
    assert stats.spec_drafts_total > 0


# ---------------------------------------------------------------------------- the fitter


def test_expected_tokens_per_step() -> None:
    from localllm.fitter.speculative import expected_tokens_per_step

    assert expected_tokens_per_step(0.0, 5) == 1.0
    assert expected_tokens_per_step(1.0, 5) == 6.0
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens_per_step(0.7, 0) == 1.0


def test_the_fitter_predicts_a_gain_when_extra_tokens_are_cheap_and_finds_the_break_even() -> None:
    from localllm.fitter.speculative import describe, predict, speedup

    gpu = predict("ngram-simple", 115.0, 3000.0, n_max=16, n_parallel=64)
    assert gpu.gain and gpu.speedup > 1.5 and 1 <= gpu.draft_n_max <= 16
    # Busier batches gain less, and past the break-even speculation loses.
    gains = [speedup(s, gpu.draft_n_max, 0.6, 115.0, 3000.0) for s in (1, 4, 16, 64)]
    assert gains == sorted(gains, reverse=True)
    assert 1 <= gpu.break_even_slots < 64
    assert speedup(gpu.break_even_slots + 1, gpu.draft_n_max, 0.6, 115.0, 3000.0) <= 1.0
    assert "pays while at most" in describe(gpu)
    # A verification token that costs as much as a step of its own never pays.
    slow = predict("ngram-simple", 40.0, 30.0, n_max=16, n_parallel=4)
    assert not slow.gain and slow.break_even_slots == 0 and "no gain" in describe(slow)
    # A draft model's own time counts: a slow draft model loses where n-gram guesses win.
    drafted = predict(
        "draft-simple", 115.0, 3000.0, n_max=16, n_parallel=4, draft_decode_tok_s=100.0
    )
    assert not drafted.gain
    # The measured acceptance rate is a parameter.
    assert (
        predict("ngram-simple", 115.0, 3000.0, n_max=16, n_parallel=4, acceptance=0.0).speedup
        == 1.0
    )


def test_a_draft_model_catches_up_on_a_long_prompt_over_several_steps(
    instruct_model_path: Path,
) -> None:
    from localllm.engine.speculative import CATCH_UP_TOKENS

    notes = "".join(f"Note {i}: the invoice total is kept in cents.\n" for i in range(60))
    prompt = "<|im_start|>system\n" + notes + "<|im_end|>\n" + CODE_PROMPT
    with real_engine(instruct_model_path) as plain:
        assert len(plain.tokenize(prompt)) > 2 * CATCH_UP_TOKENS
        expected = greedy(plain, prompt, 24).text
    with real_engine(
        instruct_model_path, spec_type="draft-simple", spec_draft_model=instruct_model_path
    ) as spec:
        got = greedy(spec, prompt, 24)
        stats = spec.stats()
    assert got.text == expected
    assert stats.spec_drafts_total > 0


def test_fit_shows_the_speculation_choice_and_the_draft_models_memory(tmp_path: Path) -> None:
    from tests.gguf_factory import LLAMA_7B, write_gguf
    from tests.test_cli import run_cli

    target = write_gguf(tmp_path / "llama.gguf", LLAMA_7B)
    common = ("--gpu", "rtx4090", "--ctx", "4096", "--parallel", "2")
    text = run_cli("fit", str(target), *common, "--spec-type", "ngram-simple")
    assert text.returncode == 0, text.stderr
    assert "speculative decoding ngram-simple" in text.stdout
    assert "pays while at most" in text.stdout
    answer = run_cli(
        "fit", str(target), *common, "--spec-type", "draft-simple",
        "--spec-draft-model", str(target), "--json",
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    speculation = json.loads(answer.stdout)["speculation"]
    assert speculation["spec_type"] == "draft-simple"
    assert speculation["draft_model"]["file"] == str(target)
    # A draft as big as the model costs as much as it saves: no gain.
    assert speculation["speedup"] == 1.0 and speculation["break_even_slots"] == 0


def test_guesses_outside_the_vocabulary_and_a_failing_proposer_cost_only_the_guesses() -> None:
    class Broken(FixedProposer):
        def draft(self, seq_id: int, history: Sequence[int], n_max: int) -> list[int]:
            if len(history) % 2:
                raise RuntimeError("proposer bug")
            return [(history[-1] + 1) % 5, N_VOCAB + 3, 1]

    with stub_engine(StubBackend()) as plain:
        expected = run(plain, PROMPT, max_tokens=30).text
    backend = StubBackend()
    with stub_engine(backend, Broken(0)) as engine:
        got = run(engine, PROMPT, max_tokens=30)
        stats = engine.stats()
        assert cells_match(backend, engine)
    assert got.text == expected
    assert stats.spec_drafts_total > 0
    assert stats.spec_draft_tokens_total == stats.spec_drafts_total  # cut at the bad id


def test_a_cpu_plan_prices_verification_tokens_as_measured_and_a_gpu_plan_does_not(
    tmp_path: Path,
) -> None:
    """On a few CPU cores a decode step is compute: one more token costs most of a step
    (measured, CPU_BATCH_TOKEN_SHARE), so n-gram guesses at the assumed 60% acceptance predict no
    gain there, and at the measured 0.9 about the x1.08-1.10 scripts/bench_spec.py found. Fully
    on a GPU the weights are read once per step and the same guesses pay."""
    from localllm.fitter import FitRequest, fit_header
    from localllm.fitter.speculative import predict
    from localllm.fitter.speed import CPU_BATCH_TOKEN_SHARE
    from localllm.gguf_header import read_header
    from localllm.hardware import GIB, Hardware, HostInfo, parse_gpu_names
    from tests.gguf_factory import LLAMA_7B, write_gguf

    host = HostInfo(64 * GIB, 56 * GIB, 2, 2, 20e9, 50e9, "assumed")
    header = read_header(write_gguf(tmp_path / "llama.gguf", LLAMA_7B))
    request = FitRequest(n_ctx=4096, n_parallel=1)
    cpu = fit_header(header, Hardware((), host, 2), request)
    gpu = fit_header(header, Hardware(parse_gpu_names("rtx4090"), host, 2), request)
    assert cpu.n_gpu_layers == 0 and gpu.full_offload
    assert cpu.batch_token_s == pytest.approx(CPU_BATCH_TOKEN_SHARE / cpu.decode_tok_s, rel=1e-6)
    assert gpu.batch_token_s < 0.2 / gpu.decode_tok_s

    def guess(plan: Any, acceptance: float | None = None) -> Any:
        return predict(
            "ngram-simple", plan.decode_tok_s, plan.prompt_tok_s, n_max=16, n_parallel=4,
            acceptance=acceptance, batch_token_s=plan.batch_token_s,
        )

    assert not guess(cpu).gain
    assert 1.05 < guess(cpu, 0.9).speedup < 1.2
    assert guess(gpu).gain and guess(gpu).speedup > 1.5
