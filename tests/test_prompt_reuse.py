"""Prompt reuse with context checkpoints: hybrid and sliding-window models with the small cache.

The policy is tested on a fake memory; the engine end to end on tiny random-weight GGUFs of
Qwen3.5 (Gated DeltaNet hybrid) and Gemma 3 (sliding window 32, small cache), whose text is
garbage but whose memory is that of the real architectures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from localllm.engine import EngineConfig, FinishEvent, GenerationRequest, SamplingParams, TextEvent
from localllm.engine.checkpoints import (
    END_OFFSET,
    Checkpoint,
    SlotCheckpoints,
    checkpoint_positions,
    cut_to_prefix,
)
from localllm.errors import CancelledError
from tests.tiny_models import TinyModel, write_gemma3_swa, write_qwen35

GREEDY = SamplingParams(temperature=0)
# Random weights may choose their end-of-generation token (id 2) at once: keep them talking.
TALKATIVE = SamplingParams(temperature=0, logit_bias=((2, -100.0),))
N_UBATCH = 64
# A sliding-window slot holds PAD(n_swa + n_ubatch, 256) = 256 cells: an answer this long
# overwrites the window of the prompt's end, which the next turn's prefix ends in.
LONG_ANSWER = 250


# ---------------------------------------------------------------------------- the policy


def test_checkpoints_fall_before_the_prompt_end_and_every_n_tokens() -> None:
    assert checkpoint_positions(1000, 0, 64, 0) == (1000 - 4 - 64, 1000 - 4)
    assert checkpoint_positions(1000, 950, 64, 0) == (996,)  # what is cached needs none
    assert checkpoint_positions(1000, 0, 64, 300) == (300, 600, 900, 932, 996)
    assert checkpoint_positions(3, 0, 64, 0) == ()


def test_a_slot_keeps_its_newest_checkpoints() -> None:
    slot = SlotCheckpoints(limit=2)
    for n in (10, 20, 30):
        slot.add(Checkpoint(n, b"x" * n))
    assert [c.n_tokens for c in slot.items] == [20, 30]
    assert slot.n_bytes == 50
    found = slot.latest_at_or_before(25)
    assert found is not None and found.n_tokens == 20
    assert slot.latest_at_or_before(19) is None
    slot.drop_after(25)
    assert [c.n_tokens for c in slot.items] == [20]


@dataclass
class FakeMemory:
    """A sequence's memory: recurrent (no partial cut) or sliding-window (cells from pos_min)."""

    recurrent: bool = False
    n_swa: int = 0
    pos_min: int = 0
    n_tokens: int = 250  # what the state has seen (a recurrent state cannot forget any of it)
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        self.calls.append(("rm", p0))
        return p0 <= 0 or not self.recurrent or p0 >= self.n_tokens

    def seq_pos_min(self, seq_id: int) -> int:
        return self.pos_min

    def partial_state(self, seq_id: int) -> bytes:
        return b""

    def restore_partial_state(self, seq_id: int, data: bytes) -> bool:
        self.calls.append(("restore", data))
        self.n_tokens = int(data)
        return True


def test_a_recurrent_state_is_rewound_to_the_latest_checkpoint_before_the_prefix() -> None:
    memory = FakeMemory(recurrent=True)
    slot = SlotCheckpoints(limit=4)
    for n in (40, 96, 200):
        slot.add(Checkpoint(n, str(n).encode()))
    assert cut_to_prefix(memory, 0, 250, 150, slot) == (96, True)
    assert memory.calls == [("restore", b"96"), ("rm", 96)]
    assert [c.n_tokens for c in slot.items] == [40, 96]  # 200 followed another continuation
    assert cut_to_prefix(memory, 0, 250, 250, slot) == (250, False)  # nothing to cut
    assert cut_to_prefix(memory, 0, 250, 30, slot) == (0, False)  # none early enough: restart
    assert slot.items == []


def test_a_sliding_window_cut_needs_a_checkpoint_only_when_the_window_was_overwritten() -> None:
    slot = SlotCheckpoints(limit=4)
    slot.add(Checkpoint(100, b"100"))
    kept = FakeMemory(n_swa=32, pos_min=60)  # cells 60.. still there: 120 - 32 >= 60
    assert cut_to_prefix(kept, 0, 300, 120, slot) == (120, False)
    overwritten = FakeMemory(n_swa=32, pos_min=200)
    assert cut_to_prefix(overwritten, 0, 300, 120, slot) == (100, True)


def test_a_full_attention_cache_is_cut_exactly() -> None:
    memory = FakeMemory()
    assert cut_to_prefix(memory, 0, 300, 120, None) == (120, False)


# ---------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    folder = tmp_path_factory.mktemp("tiny")
    return {
        "qwen35": write_qwen35(folder / "tiny-qwen35.gguf"),
        "gemma3": write_gemma3_swa(folder / "tiny-gemma3.gguf"),
    }


def tiny_config(model: TinyModel, **changes: Any) -> EngineConfig:
    values: dict[str, Any] = dict(
        model_path=model.path,
        n_ctx=32768,
        n_parallel=4,
        n_threads=1,
        n_batch=256,
        n_ubatch=N_UBATCH,
        queue_size=4,
        max_tokens_default=LONG_ANSWER,
        seed=1,
        use_extra_bufts=False,
    )
    values.update(changes)
    return EngineConfig(**values)


@pytest.fixture(scope="module", params=["qwen35", "gemma3"])
def tiny_engine(request: pytest.FixtureRequest, tiny: dict[str, TinyModel]) -> Iterator[Any]:
    from localllm.engine import Engine

    with Engine.load(tiny_config(tiny[request.param])) as engine:
        yield engine


def chat(engine: Any, turns: int, max_tokens: int = 8) -> list[tuple[int, int, int]]:
    """A growing chat; per turn (prompt tokens, cached tokens, prompt tokens the turn added)."""
    messages: list[dict[str, str]] = []
    rows = []
    previous = 0
    for turn in range(turns):
        messages.append(
            {"role": "user", "content": f"Turn {turn}: tell me one thing about the number {turn}."}
        )
        prompt = engine.chat_prompt(messages)
        result = engine.submit(
            GenerationRequest(prompt=prompt, max_tokens=max_tokens, sampling=TALKATIVE)
        ).result()
        usage = result.usage
        rows.append((usage.prompt_tokens, usage.cached_tokens, len(prompt) - previous))
        previous = len(prompt)
        # As chat clients and templates do: the answer goes back trimmed.
        messages.append({"role": "assistant", "content": result.text.strip() or "ok"})
    return rows


def test_tiny_model_loads_with_the_memory_of_its_architecture(tiny_engine: Any) -> None:
    backend = tiny_engine.backend
    if backend.architecture == "qwen35":
        assert backend.recurrent
        assert any("llama_memory_recurrent" in line for line in tiny_engine.load_log)
    else:
        assert backend.n_swa == 32
        # the small sliding-window cache: PAD(32 + n_ubatch, 256) cells per slot, not 2048
        assert any("256 cells" in line for line in tiny_engine.load_log)
    assert all(slot.checkpoints is not None for slot in tiny_engine._slots)


def test_ten_turn_chat_reuses_its_prefix(tiny_engine: Any) -> None:
    before = tiny_engine.stats()
    rows = chat(tiny_engine, 10, max_tokens=LONG_ANSWER)
    for turn, (n_prompt, n_cached, n_new) in enumerate(rows[1:], start=2):
        processed = n_prompt - n_cached
        # only what the turn added, plus the tokens between the checkpoint and the prompt end
        assert processed <= n_new + END_OFFSET, (turn, rows)
        assert n_cached > 0, (turn, rows)
    after = tiny_engine.stats()
    assert after.checkpoints_saved_total >= before.checkpoints_saved_total + 9
    # the answers went back trimmed and re-tokenized: the prefix ends before the cached answer,
    # which neither memory can be cut back to: checkpoints stood in
    assert after.checkpoints_restored_total >= before.checkpoints_restored_total + 5
    assert 0 < after.checkpoint_bytes


@pytest.mark.parametrize("ctx_checkpoints", [4, 0])
def test_a_hybrid_model_edited_mid_prompt_restores_a_checkpoint_or_starts_over(
    tiny: dict[str, TinyModel], ctx_checkpoints: int
) -> None:
    from localllm.engine import Engine

    first = tuple(300 + i % 200 for i in range(200))
    edited = first[:150] + tuple(260 + i for i in range(30))
    config = tiny_config(tiny["qwen35"], ctx_checkpoints=ctx_checkpoints, n_parallel=1,
                         n_ctx=2048)
    with Engine.load(config) as engine:
        engine.submit(GenerationRequest(prompt=first, max_tokens=2, sampling=GREEDY)).result()
        again = engine.submit(GenerationRequest(prompt=edited, max_tokens=2)).result()
        stats = engine.stats()
    if ctx_checkpoints:
        # checkpoints at 200 - 4 - 64 = 132 and 196: the first one is inside the common prefix
        assert again.usage.cached_tokens == 132
        assert stats.checkpoints_restored_total == 1
    else:
        # a recurrent state cannot be cut back to 150 tokens: all 180 are decoded again
        assert again.usage.cached_tokens == 0


def test_restored_state_gives_the_same_logits_as_a_fresh_prefill(
    tiny: dict[str, TinyModel], tiny_engine: Any
) -> None:
    from localllm.engine import Engine

    model = tiny[tiny_engine.backend.architecture]
    restored_before = tiny_engine.stats().checkpoints_restored_total
    messages = [{"role": "user", "content": "Repeat after me: one two three four five six."}]
    for _ in range(3):
        prompt = tiny_engine.chat_prompt(messages)
        text = tiny_engine.submit(
            GenerationRequest(prompt=prompt, max_tokens=6, sampling=GREEDY)
        ).result().text
        messages += [{"role": "assistant", "content": text.strip() or "ok"},
                     {"role": "user", "content": "And again, slower: seven eight nine ten."}]
    prompt = tiny_engine.chat_prompt(messages)
    request = GenerationRequest(prompt=prompt, max_tokens=1, logprobs=5, sampling=GREEDY)
    reused = tiny_engine.submit(request).result()
    assert reused.usage.cached_tokens > 0
    with Engine.load(tiny_config(model, n_parallel=1, n_ctx=2048)) as fresh_engine:
        fresh = fresh_engine.submit(request).result()
    assert fresh.usage.cached_tokens == 0
    top_reused = [(t.token_bytes, round(t.logprob, 2)) for t in reused.logprobs[0].top]
    top_fresh = [(t.token_bytes, round(t.logprob, 2)) for t in fresh.logprobs[0].top]
    assert [t for t, _ in top_reused] == [t for t, _ in top_fresh]
    for (_, a), (_, b) in zip(top_reused, top_fresh, strict=True):
        assert abs(a - b) < 0.05
    assert tiny_engine.stats().checkpoints_restored_total >= restored_before


def test_four_concurrent_streams_all_finish(tiny_engine: Any) -> None:
    handles = [
        tiny_engine.submit(
            GenerationRequest(prompt=f"Stream {i}: count with me", max_tokens=16, sampling=GREEDY)
        )
        for i in range(4)
    ]
    finished: list[FinishEvent] = []

    def read(handle: Any) -> None:
        for event in handle:
            if isinstance(event, FinishEvent):
                finished.append(event)

    readers = [threading.Thread(target=read, args=(h,)) for h in handles]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=120)
    assert len(finished) == 4
    assert all(f.usage.completion_tokens >= 1 for f in finished)


def test_cancel_mid_stream_frees_the_slot_and_the_next_request_runs(tiny_engine: Any) -> None:
    handle = tiny_engine.submit(
        GenerationRequest(
            prompt="A long answer please",
            max_tokens=60,
            # random weights may end early on their EOS: keep them from choosing it
            sampling=SamplingParams(temperature=0, logit_bias=((2, -100.0),)),
        )
    )
    events = iter(handle)
    first = next(events)
    assert isinstance(first, TextEvent)
    handle.cancel()
    deadline = time.monotonic() + 30
    while tiny_engine.stats().busy_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tiny_engine.stats().busy_slots == 0
    with pytest.raises(CancelledError):
        for _ in events:
            pass
    after = tiny_engine.submit(GenerationRequest(prompt="A long answer", max_tokens=2)).result()
    assert after.usage.completion_tokens >= 1


def test_memory_matches_the_plan(tiny: dict[str, TinyModel], tiny_engine: Any) -> None:
    from localllm.fitter.memory import (
        checkpoint_bytes,
        context_shape,
        kv_layer_bytes,
        recurrent_layers,
        recurrent_state_bytes,
    )
    from localllm.gguf_header import read_header

    model = tiny[tiny_engine.backend.architecture]
    header = read_header(model.path)
    config = tiny_engine.config
    # One checkpoint, measured after a prompt longer than the window, against the fitter's.
    tiny_engine.submit(GenerationRequest(prompt=tuple(range(300, 400)), max_tokens=1)).result()
    measured = max(len(tiny_engine.backend.partial_state(s.seq_id)) for s in tiny_engine._slots)
    predicted = checkpoint_bytes(header, config.swa_full)
    assert measured <= predicted <= measured + 256, (measured, predicted)
    if model.hybrid:
        assert sum(recurrent_layers(header)) == 3
        recurrent_mib = _log_mib(tiny_engine.load_log, "llama_memory_recurrent: size")
        expected = recurrent_state_bytes(header) * config.n_parallel
        assert abs(recurrent_mib * 2**20 - expected) < 0.05 * expected + 2**16
    else:
        shape = context_shape(header, config.n_ctx, config.n_parallel, config.n_ubatch,
                              config.n_batch, config.swa_full)
        expected_kv = sum(kv_layer_bytes(header, shape))
        assert abs(tiny_engine.memory["kv_cache_mib"] * 2**20 - expected_kv) < 2**16


def _log_mib(log: list[str], marker: str) -> float:
    line = next(line for line in log if marker in line)
    return float(line.split("=", 1)[1].split("MiB", 1)[0])


def test_fitter_counts_the_checkpoints_in_host_memory(tiny: dict[str, TinyModel]) -> None:
    from localllm.fitter import FitRequest
    from localllm.fitter.memory import checkpoint_bytes
    from localllm.fitter.search import fit_header
    from localllm.gguf_header import read_header
    from localllm.hardware import Hardware, probe_host

    header = read_header(tiny["gemma3"].path)
    hardware = Hardware(gpus=(), host=probe_host(), threads=1)
    small = fit_header(header, hardware, FitRequest(n_ctx=4096, n_parallel=2, swa_full=False,
                                                    ctx_checkpoints=3))
    full = fit_header(header, hardware, FitRequest(n_ctx=4096, n_parallel=2, swa_full=True))
    host_small = next(d for d in small.devices if d.name == "host")
    host_full = next(d for d in full.devices if d.name == "host")
    assert host_small.checkpoint_bytes == 2 * 3 * checkpoint_bytes(header, False) > 0
    assert host_full.checkpoint_bytes == 0  # a full-size cache can be cut anywhere
    assert host_small.kv_bytes < host_full.kv_bytes
