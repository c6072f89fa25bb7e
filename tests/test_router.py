"""The router on real worker processes: a models folder with two copies of the embedded model,
a real tiny BERT and a reranker, and a host memory budget set small so that co-residency and
eviction both happen."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localllm.engine import FinishEvent, GenerationRequest, SamplingParams, TextEvent
from localllm.errors import (
    DoesNotFitError,
    EmbeddingsNotSupportedError,
    GenerationNotSupportedError,
    ModelCrashedError,
    ModelNotFoundError,
    QueueFullError,
    SettingsError,
)
from localllm.router import Registry, Router, parse_keep_alive
from localllm.router.metrics import RouterCollector
from localllm.router.ps import format_ps
from localllm.router.worker import rss_bytes
from localllm.settings import Settings
from tests.gguf_factory import write_bert

GREEDY = SamplingParams(temperature=0)
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path) -> Path:
    models = tmp_path_factory.mktemp("router-models")
    for name in ("gemma-a.gguf", "gemma-b.gguf"):
        shutil.copyfile(embedded_model_path, models / name)
    write_bert(models / "tiny-bert.gguf")
    write_bert(models / "tiny-reranker.gguf", pooling_type=4)
    return models


def settings_for(folder: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "models_dir": folder,
        "n_ctx": 1024,  # tokens per conversation
        "parallel": 2,
        "threads": 1,  # two cores shared with the test process and other workers
        "n_batch": 256,
        "n_ubatch": 256,
        "load_on_start": False,
        "keep_alive": "5m",
    }
    values.update(changes)
    return Settings(**values)


def needs(folder: Path) -> dict[str, int]:
    """Planned host bytes per model, from the same plans the router makes."""
    registry = Registry(settings_for(folder))
    out = {}
    for name in ("gemma-a", "tiny-bert"):
        plan, _ = registry.planned(registry.get(name))
        out[name] = plan.host.total_bytes
    return out


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=240))


async def generate(router: Router, name: str, prompt: str, **kwargs: Any) -> str:
    keep_alive = kwargs.pop("keep_alive", None)
    extra = {"keep_alive": keep_alive} if keep_alive is not None else {}
    async with router.use(name, **extra) as model:
        handle = await model.worker.asubmit(
            GenerationRequest(prompt=prompt, sampling=GREEDY, max_tokens=8, **kwargs)
        )
        completion = await handle.aresult()
        return completion.text


def metrics_text(router: Router) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(RouterCollector(router))
    return generate_latest(registry).decode()


async def eventually(condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
    """Wait for what a background task does (an expiry, a crash noticed), however loaded the
    machine: poll, with a deadline far beyond any normal wait."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


def loaded_names(router: Router) -> list[str]:
    return [m.name for m in router.loaded()]


def test_keep_alive_durations_follow_ollama() -> None:
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("500ms") == 0.5
    assert parse_keep_alive("0") == 0
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive(90) == 90
    assert parse_keep_alive("-1") is None
    assert parse_keep_alive("-5m") is None
    with pytest.raises(SettingsError, match="not a duration"):
        parse_keep_alive("soon")
    with pytest.raises(SettingsError, match="not a duration"):
        parse_keep_alive("5 minutes")


def test_registry_lists_the_folder_with_capabilities(folder: Path) -> None:
    registry = Registry(settings_for(folder))
    entries = {e.name: e for e in registry.entries()}
    assert set(entries) == {"gemma-a", "gemma-b", "tiny-bert", "tiny-reranker"}
    assert entries["gemma-a"].capabilities == ["completion", "chat", "embeddings"]
    assert entries["tiny-bert"].capabilities == ["embeddings"]
    assert entries["tiny-reranker"].capabilities == []
    assert registry.get("GEMMA-A.gguf") is entries["gemma-a"]
    with pytest.raises(ModelNotFoundError, match="available"):
        registry.get("no-such-model")


def test_co_residency_then_lru_eviction_in_both_orders(folder: Path) -> None:
    need = needs(folder)
    gemma, bert = need["gemma-a"], need["tiny-bert"]
    # Room for one Gemma and the BERT, not for two Gemmas.
    limit = gemma + bert + (gemma - bert) // 2
    settings = settings_for(folder, models_memory_limit=f"{limit // MIB}MiB")

    async def scenario() -> None:
        router = Router(settings)
        try:
            assert await generate(router, "gemma-a", "The capital of France is")
            async with router.use("tiny-bert", purpose="embed") as model:
                vectors = (await model.worker.acall("embed", ["hello"])).vectors
            assert len(vectors[0]) == 64
            assert loaded_names(router) == ["gemma-a", "tiny-bert"]  # side by side

            # gemma-a was used before tiny-bert: it is the least recently used idle model
            await generate(router, "gemma-b", "Hello")
            assert sorted(loaded_names(router)) == ["gemma-b", "tiny-bert"]
            assert router.counters["gemma-a"].unloads == {"evicted": 1}

            # touch tiny-bert: now gemma-b is the least recently used and goes instead
            async with router.use("tiny-bert", purpose="embed") as model:
                await model.worker.acall("embed", ["again"])
            await generate(router, "gemma-a", "Hello")
            assert sorted(loaded_names(router)) == ["gemma-a", "tiny-bert"]
            assert router.counters["gemma-b"].unloads == {"evicted": 1}
            assert router.counters["tiny-bert"].unloads == {}
            assert router.counters["gemma-a"].loads == 2

            scrape = metrics_text(router)
            assert 'localllm_model_loads_total{model="gemma-a"} 2.0' in scrape
            assert 'localllm_model_unloads_total{model="gemma-b",reason="evicted"} 1.0' in scrape
            assert 'localllm_model_loaded{model="gemma-b"} 0.0' in scrape
            assert 'localllm_model_loaded{model="tiny-bert"} 1.0' in scrape
            assert 'localllm_generated_tokens_total{model="gemma-a"}' in scrape
            assert 'localllm_model_planned_bytes{device="host",model="gemma-a"}' in scrape
            table = format_ps(router.ps())
            assert table.splitlines()[0].split() == ["NAME", "DEVICES", "RSS", "CONTEXT", "UNTIL"]
            assert "gemma-a" in table and "tiny-bert" in table and "1024 x2" in table
        finally:
            await router.close()

    run(scenario)


def test_a_model_in_use_is_never_evicted_the_request_waits_then_the_queue_refuses(
    folder: Path,
) -> None:
    gemma = needs(folder)["gemma-a"]
    settings = settings_for(
        folder, models_memory_limit=f"{(gemma + gemma // 2) // MIB}MiB", queue_size=1
    )

    async def scenario() -> None:
        router = Router(settings)
        try:
            busy = await router.acquire("gemma-a")  # a request in flight on gemma-a
            waiting = asyncio.create_task(generate(router, "gemma-b", "Hi"))
            await asyncio.sleep(1.0)
            assert not waiting.done()  # it cannot evict gemma-a, so it waits
            assert loaded_names(router) == ["gemma-a"]
            with pytest.raises(QueueFullError) as refused:
                await router.acquire("tiny-bert", purpose="embed")
            assert refused.value.retry_after_s > 0
            router.release(busy)  # the request ends: now gemma-a may go
            assert await asyncio.wait_for(waiting, 120)
            assert loaded_names(router) == ["gemma-b"]
        finally:
            await router.close()

    run(scenario)


def test_keep_alive_zero_unloads_after_the_answer_and_default_expiry(folder: Path) -> None:
    settings = settings_for(folder, keep_alive="1s")

    async def scenario() -> None:
        router = Router(settings)
        try:
            await generate(router, "gemma-a", "Hello", keep_alive=0.0)
            await eventually(lambda: loaded_names(router) == [])
            assert router.counters["gemma-a"].unloads == {"expired": 1}

            await router.load("tiny-bert")  # the default keep_alive: 1 s
            (row,) = router.ps()
            assert row["expires_at"] == pytest.approx(time.time() + 1, abs=0.5)
            await eventually(lambda: loaded_names(router) == [])

            await router.load("tiny-bert", keep_alive=None)  # -1: never
            await asyncio.sleep(1.5)
            assert loaded_names(router) == ["tiny-bert"]
            assert router.ps()[0]["expires_at"] is None
        finally:
            await router.close()

    run(scenario)


def test_pinned_models_stay_and_models_max_counts(folder: Path) -> None:
    gemma = needs(folder)["gemma-a"]
    settings = settings_for(
        folder,
        models_memory_limit=f"{(gemma + gemma // 2) // MIB}MiB",
        pinned_models=["gemma-a"],
        request_timeout_s=1.5,
        models_max=1,
    )

    async def scenario() -> None:
        router = Router(settings)
        try:
            await router.load("gemma-a", keep_alive=0.0)  # pinned: keep_alive does not apply
            await asyncio.sleep(0.3)
            assert loaded_names(router) == ["gemma-a"]
            with pytest.raises(QueueFullError, match="does not fit"):
                await generate(router, "gemma-b", "Hi")  # gemma-a is pinned: no room
            assert loaded_names(router) == ["gemma-a"]
            assert await router.unload("gemma-a")  # an explicit unload still works
        finally:
            await router.close()
        # models_max=1: the BERT fits in memory beside Gemma, but only one model may load
        router = Router(settings_for(folder, models_max=1))
        try:
            await router.load("tiny-bert")
            await router.load("gemma-a")
            assert loaded_names(router) == ["gemma-a"]
        finally:
            await router.close()

    run(scenario)


def test_requests_run_on_two_models_at_once(folder: Path) -> None:
    async def scenario() -> None:
        router = Router(settings_for(folder))
        try:
            texts = await asyncio.gather(
                generate(router, "gemma-a", "Once upon a time"),
                generate(router, "gemma-b", "Once upon a time"),
            )
            assert texts[0] == texts[1] and texts[0]  # same weights, greedy: same text
            assert sorted(loaded_names(router)) == ["gemma-a", "gemma-b"]
            assert {m.worker.pid for m in router.loaded()} != {os.getpid()}
        finally:
            await router.close()

    run(scenario)


def test_wrong_kind_of_request_is_refused_before_loading(folder: Path) -> None:
    async def scenario() -> None:
        router = Router(settings_for(folder))
        try:
            with pytest.raises(GenerationNotSupportedError, match="embedding model"):
                await router.acquire("tiny-bert")
            with pytest.raises(EmbeddingsNotSupportedError, match="reranker"):
                await router.acquire("tiny-reranker", purpose="embed")
            with pytest.raises(DoesNotFitError, match="models_memory_limit"):
                small = Router(settings_for(folder, models_memory_limit="100MiB"))
                await small.acquire("gemma-a")
            assert router.loaded() == [] and router.counters == {}
        finally:
            await router.close()

    run(scenario)


def test_a_worker_killed_mid_stream_fails_its_request_and_the_model_reloads(
    folder: Path,
) -> None:
    async def scenario() -> None:
        router = Router(settings_for(folder))
        try:
            await router.load("tiny-bert")
            model = await router.acquire("gemma-a")
            handle = await model.worker.asubmit(
                GenerationRequest(prompt="Tell me a long story", sampling=GREEDY, max_tokens=400)
            )
            got_text = False
            with pytest.raises(ModelCrashedError, match="SIGKILL"):
                async for event in handle:
                    if isinstance(event, TextEvent) and event.text and not got_text:
                        got_text = True
                        model.worker.kill()
                    assert not isinstance(event, FinishEvent)
            router.release(model)
            assert got_text
            await eventually(lambda: router.state_of("gemma-a")["value"] == "unloaded")
            status = router.state_of("gemma-a")
            assert status["value"] == "unloaded" and status["failed"]
            assert status["exit_code"] == -9
            assert router.counters["gemma-a"].crashes == 1
            # the other model goes on; the crashed one loads again on the next request
            async with router.use("tiny-bert", purpose="embed") as bert:
                assert (await bert.worker.acall("embed", ["still here"])).vectors
            assert await generate(router, "gemma-a", "Hello")
            assert router.counters["gemma-a"].loads == 2
            assert router.state_of("gemma-a") == {"value": "loaded"}
        finally:
            await router.close()

    run(scenario)


def test_unloading_gives_the_memory_back(folder: Path) -> None:
    async def scenario() -> None:
        router = Router(settings_for(folder))
        baseline = rss_bytes(os.getpid())
        try:
            model = await router.load("gemma-a")
            worker_rss = rss_bytes(model.worker.pid)
            assert worker_rss is not None and worker_rss > 200 * MIB  # the weights and buffers
            pid = model.worker.pid
            assert await router.unload("gemma-a")
            assert rss_bytes(pid) is None  # the process is gone, and all it held
            after = rss_bytes(os.getpid())
            assert baseline is not None and after is not None
            assert after - baseline < 64 * MIB  # the router process never held the model
        finally:
            await router.close()

    run(scenario)


def test_embeddings_through_a_worker_equal_the_engine_s(folder: Path, engine: Any) -> None:
    async def scenario() -> None:
        router = Router(settings_for(folder))
        try:
            async with router.use("gemma-a", purpose="embed") as model:
                remote = await model.worker.acall("embed", ["Hello world", "Goodbye"])
                router.note_embeddings(model)
                assert model.embedding_bytes["host"] > 0  # counted from now on
            local = engine.embed(["Hello world", "Goodbye"])
            cosine = np.sum(np.array(remote.vectors) * np.array(local.vectors), axis=1)
            assert cosine.min() > 0.9999
            assert remote.prompt_tokens == local.prompt_tokens
        finally:
            await router.close()

    run(scenario)


def test_a_lease_holds_the_model_until_its_stream_ends(folder: Path) -> None:
    async def scenario() -> None:
        router = Router(settings_for(folder))
        try:
            async with router.lease("gemma-a") as lease:
                request = GenerationRequest(prompt="Once", sampling=GREEDY, max_tokens=24)
                handle = await asyncio.to_thread(lease.submit, request)
            (model,) = router.loaded()
            assert model.in_flight == 1  # the handler is done, its stream is not
            assert (await handle.aresult()).usage.completion_tokens > 0
            await eventually(lambda: model.in_flight == 0)
            assert model.expires_at is not None
            async with router.lease("gemma-a") as lease:  # nothing submitted
                assert await asyncio.to_thread(lease.tokenize, "hi")
            assert model.in_flight == 0
        finally:
            await router.close()

    run(scenario)
