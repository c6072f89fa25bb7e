"""Router benchmark on the embedded model: load times, time to first token through a load,
decode speed through a worker process vs the engine in-process, memory before/loaded/after, and
the same over HTTP: `localllm serve` over a folder vs `localllm serve MODEL`.

    .venv/bin/python scripts/bench_router.py [--threads 2] [--tokens 64] [--rounds 3] [--no-http]

- cold load: the model file's pages are dropped from the page cache first (posix_fadvise
  DONTNEED, no root needed), then the router loads it (spawn + import + llama.cpp load);
- warm reload: unload and load again with the file page-cached;
- TTFT through a load: a request for a model not loaded, timed to its first token;
- tok/s: the same greedy requests on the engine in this process (what `serve MODEL` runs) and
  through the router's worker process (pipe per event), alternated round by round so that load
  on a shared machine hits both alike; 1 stream and 4 concurrent streams;
- memory: this process's RSS plus its children's before loading, while loaded, after unloading;
- HTTP: both servers as child processes on loopback, streamed /v1/completions alternated between
  them, 1 and 4 concurrent streams; the folder server starts with nothing loaded, so its first
  request's time to first token includes the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(settings: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    code = (
        "from localllm.server.run import serve\n"
        "from localllm.settings import Settings\n"
        f"serve(Settings({settings}, port={port}, models_dir={str(folder)!r}))\n"
    )
    (folder / "none.toml").write_text("")
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "LOCALLLM_CONFIG": str(folder / "none.toml")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server with {settings} did not become healthy")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def http_stream(url: str, model: str | None, prompt: str, tokens: int) -> tuple[float, int]:
    """(seconds to first text, completion tokens) of one streamed greedy completion."""
    body: dict[str, object] = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    started = time.perf_counter()
    first = 0.0
    used = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                used = data["usage"]["completion_tokens"]
            if not first and any(c.get("text") for c in data.get("choices") or []):
                first = time.perf_counter() - started
    return first, used


def http_tps(url: str, streams: int, tokens: int) -> float:
    results: list[tuple[float, int]] = []

    def one(i: int) -> None:
        results.append(http_stream(url, None, PROMPTS[i % len(PROMPTS)] + f" ({i})", tokens))

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(n for _, n in results) / (time.perf_counter() - started)


def bench_http(args: argparse.Namespace) -> list[tuple[str, str]]:
    folder = Path(tempfile.mkdtemp(prefix="bench-router-http-"))
    source = embedded_model_path(REPO / "models")
    model = folder / source.name  # the default model's file name: the folder server's default
    model.write_bytes(source.read_bytes())
    common = f"n_ctx=1024, parallel=4, threads={args.threads}, n_batch=512, n_ubatch=512"
    rows: list[tuple[str, str]] = []
    router_process, router_url = start_server(common + ", load_on_start=False", folder)
    try:
        ttft, _ = http_stream(router_url, source.stem, PROMPTS[0], 4)
        rows.append(("HTTP: TTFT of the request that loads the model", f"{ttft:.2f} s"))
        one_process, one_url = start_server(common + f", model={str(model)!r}", folder)
        try:
            direct: dict[int, list[float]] = {1: [], 4: []}
            routed: dict[int, list[float]] = {1: [], 4: []}
            for _ in range(args.rounds):
                for streams in (1, 4):
                    direct[streams].append(http_tps(one_url, streams, args.tokens))
                    routed[streams].append(http_tps(router_url, streams, args.tokens))
        finally:
            stop_server(one_process)
    finally:
        stop_server(router_process)
    for streams in (1, 4):
        d, r = statistics.median(direct[streams]), statistics.median(routed[streams])
        rows.append(
            (
                f"HTTP tok/s, {streams} stream{'s' if streams > 1 else ''}: serve MODEL / folder",
                f"{d:.1f} / {r:.1f} ({r / d:.2f}x)",
            )
        )
    model.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-http", action="store_true", help="Skip the HTTP comparison.")
    args = parser.parse_args()
    asyncio.run(main_async(args))
    if not args.no_http:
        for name, value in bench_http(args):
            print(f"{name:<56}  {value}")


if __name__ == "__main__":
    main()
