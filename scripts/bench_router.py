"""Router benchmark on the embedded model: load times, time to first token through a load,
decode speed through a worker process vs the engine in-process, memory before/loaded/after.

    .venv/bin/python scripts/bench_router.py [--threads 2] [--tokens 64] [--rounds 3]

- cold load: the model file's pages are dropped from the page cache first (posix_fadvise
  DONTNEED, no root needed), then the router loads it (spawn + import + llama.cpp load);
- warm reload: unload and load again with the file page-cached;
- TTFT through a load: a request for a model not loaded, timed to its first token;
- tok/s: the same greedy requests on the engine in this process (what `serve MODEL` runs) and
  through the router's worker process (pipe per event), alternated round by round so that load
  on a shared machine hits both alike; 1 stream and 4 concurrent streams;
- memory: this process's RSS plus its children's before loading, while loaded, after unloading.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localllm.engine import (  # noqa: E402
    Engine,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TextEvent,
)
from localllm.models import embedded_model_path  # noqa: E402
from localllm.router import Router  # noqa: E402
from localllm.router.worker import rss_bytes  # noqa: E402
from localllm.settings import Settings  # noqa: E402

PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in a faraway city.",
    "Tell the history of a small fishing village over one hundred years.",
]
MIB = 1024 * 1024


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def tree_rss(pids: list[int]) -> int:
    return sum(rss_bytes(pid) or 0 for pid in pids)


async def stream(submit: Any, prompt: str, tokens: int) -> tuple[float, int, float]:
    """(seconds to first token, tokens, decode tok/s after the first) of one greedy request."""
    request = GenerationRequest(
        prompt=prompt, max_tokens=tokens, sampling=SamplingParams(temperature=0, seed=1)
    )
    started = time.perf_counter()
    handle = await submit(request)
    first = 0.0
    finish: FinishEvent | None = None
    async for event in handle:
        if isinstance(event, TextEvent) and event.text and not first:
            first = time.perf_counter() - started
        if isinstance(event, FinishEvent):
            finish = event
    assert finish is not None
    return first, finish.usage.completion_tokens, finish.decode_tokens_per_s


async def aggregate_tps(submit: Any, streams: int, tokens: int) -> float:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(stream(submit, PROMPTS[i % len(PROMPTS)] + f" ({i})", tokens) for i in range(streams))
    )
    return sum(n for _, n, _ in results) / (time.perf_counter() - started)


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    source = embedded_model_path(REPO / "models")
    model = tmp / "gemma.gguf"
    model.write_bytes(source.read_bytes())  # a file of its own, so its page cache is ours
    settings = Settings(
        models_dir=tmp,
        n_ctx=2048,
        parallel=4,
        threads=args.threads,
        load_on_start=False,
        keep_alive="-1",
    )
    me = os.getpid()
    router = Router(settings)
    rows: list[tuple[str, str]] = []

    def pids() -> list[int]:
        return [me] + [m.worker.pid for m in router.loaded()]

    rss_before = tree_rss(pids())
    drop_page_cache(model)
    started = time.perf_counter()
    loaded = await router.load("gemma")
    cold = time.perf_counter() - started
    rss_loaded = tree_rss(pids())
    worker_rss = rss_bytes(loaded.worker.pid) or 0
    await router.unload("gemma")
    rss_after = tree_rss(pids())
    warm = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        await router.load("gemma")
        warm.append(time.perf_counter() - started)
        await router.unload("gemma")
    ttft_loads = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        async with router.use("gemma") as m:
            loaded_after = time.perf_counter() - started
            first, _, _ = await stream(m.worker.asubmit, PROMPTS[0], 4)
        ttft_loads.append(loaded_after + first)
        await router.unload("gemma")
    rows += [
        ("cold load (page cache dropped)", f"{cold:.2f} s"),
        ("warm reload (median)", f"{statistics.median(warm):.2f} s"),
        ("TTFT of a request that loads (median)", f"{statistics.median(ttft_loads):.2f} s"),
        ("RSS before load (router process)", f"{rss_before / MIB:.0f} MiB"),
        ("RSS loaded (router + worker)", f"{rss_loaded / MIB:.0f} MiB"),
        ("  of which the worker", f"{worker_rss / MIB:.0f} MiB"),
        ("RSS after unload", f"{rss_after / MIB:.0f} MiB"),
    ]

    # Decode speed: in-process engine vs worker, alternated.
    _, config = router.registry.planned(router.registry.get("gemma"))
    engine = await asyncio.to_thread(Engine.load, config)
    remote = await router.load("gemma")

    async def local_submit(request: GenerationRequest) -> Any:
        return engine.submit(request)

    direct: dict[int, list[float]] = {1: [], 4: []}
    routed: dict[int, list[float]] = {1: [], 4: []}
    try:
        for _ in range(args.rounds):
            for streams in (1, 4):
                direct[streams].append(await aggregate_tps(local_submit, streams, args.tokens))
                routed[streams].append(
                    await aggregate_tps(remote.worker.asubmit, streams, args.tokens)
                )
    finally:
        engine.close()
        await router.close()
    for streams in (1, 4):
        d, r = statistics.median(direct[streams]), statistics.median(routed[streams])
        rows.append(
            (
                f"tok/s, {streams} stream{'s' if streams > 1 else ''}: in-process / worker",
                f"{d:.1f} / {r:.1f} ({r / d:.2f}x)",
            )
        )
    width = max(len(name) for name, _ in rows)
    print(f"embedded model, {args.threads} threads, {args.tokens} tokens, {args.rounds} rounds")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    model.unlink()
    tmp.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
