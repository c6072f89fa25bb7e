"""`localllm bench`: a bounded load test of any OpenAI-compatible chat server.

For each (prompt length, output length, concurrency) point it keeps `concurrency` streaming chat
requests in flight until `requests` have finished or `time_limit_s` passed, and measures from the
client's side: time to first token, inter-token latency (gaps between streamed chunks), tokens per
second per stream and in aggregate, requests per second, errors. It only ever talks to the URL it
is given, refuses non-loopback hosts unless told otherwise, and stops by itself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import secrets
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from localllm.errors import BenchError

WORDS = (
    "the river carried small boats past the old mill while children counted clouds and a baker "
    "sold warm bread to travellers who spoke of distant mountains snow and quiet harbours"
).split()


@dataclass(frozen=True)
class BenchPoint:
    concurrency: int
    prompt_words: int
    max_tokens: int
    requests_done: int
    errors: int
    error_samples: list[str]
    wall_s: float
    requests_per_s: float
    aggregate_tok_s: float
    per_stream_tok_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    itl_p99_ms: float


@dataclass
class BenchResult:
    url: str
    model: str
    points: list[BenchPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "points": [asdict(p) for p in self.points]}


@dataclass
class _Sample:
    ttft_s: float
    gaps_s: list[float]
    tokens: int
    duration_s: float


def check_target(url: str, allow_remote: bool) -> None:
    """Refuse anything but loopback unless the user said the target is theirs to load."""
    host = urlparse(url).hostname
    if not host:
        raise BenchError(f"{url!r} is not an http(s) URL")
    if allow_remote:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise BenchError(f"cannot resolve {host}: {exc}") from None
    if not all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses):
        raise BenchError(
            f"{host} is not a loopback address; load-test only servers you own, and pass "
            "--allow-remote to say so"
        )


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q) - 1))]


def make_prompt(words: int, salt: str) -> str:
    # A different opening per request (and per run), so no server answers from its prompt cache.
    body = " ".join(WORDS[(i * 7 + len(salt)) % len(WORDS)] for i in range(words))
    return f"Request {salt}. Continue this story: {body}"


async def _one_request(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int
) -> _Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    last = start
    gaps: list[float] = []
    chunks = 0
    usage_tokens: int | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:200]
            raise BenchError(f"HTTP {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens")
            choices = event.get("choices") or []
            if not choices or not (choices[0].get("delta") or {}).get("content"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
            chunks += 1
    end = time.perf_counter()
    return _Sample(
        ttft_s=(first or end) - start,
        gaps_s=gaps,
        tokens=usage_tokens if usage_tokens is not None else chunks,
        duration_s=end - start,
    )


async def _run_point(
    client: httpx.AsyncClient,
    model: str,
    concurrency: int,
    prompt_words: int,
    max_tokens: int,
    requests: int,
    time_limit_s: float,
    run_id: str,
) -> BenchPoint:
    samples: list[_Sample] = []
    errors: list[str] = []
    issued = 0
    deadline = time.perf_counter() + time_limit_s
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            salt = f"{run_id}-{concurrency}-{prompt_words}-{max_tokens}-{issued}"
            try:
                samples.append(
                    await asyncio.wait_for(
                        _one_request(client, model, make_prompt(prompt_words, salt), max_tokens),
                        timeout=max(1.0, deadline - time.perf_counter()),
                    )
                )
            except (httpx.HTTPError, BenchError, TimeoutError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(s.tokens for s in samples)
    ttfts = sorted(s.ttft_s * 1000 for s in samples)
    gaps = sorted(g * 1000 for s in samples for g in s.gaps_s)
    per_stream = [
        (s.tokens - 1) / (s.duration_s - s.ttft_s)
        for s in samples
        if s.tokens > 1 and s.duration_s > s.ttft_s
    ]
    return BenchPoint(
        concurrency=concurrency,
        prompt_words=prompt_words,
        max_tokens=max_tokens,
        requests_done=len(samples),
        errors=len(errors),
        error_samples=errors[:3],
        wall_s=round(wall, 3),
        requests_per_s=len(samples) / wall if wall else 0.0,
        aggregate_tok_s=tokens / wall if wall else 0.0,
        per_stream_tok_s=statistics.fmean(per_stream) if per_stream else 0.0,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p95_ms=percentile(ttfts, 95),
        ttft_p99_ms=percentile(ttfts, 99),
        itl_p50_ms=percentile(gaps, 50),
        itl_p95_ms=percentile(gaps, 95),
        itl_p99_ms=percentile(gaps, 99),
    )


async def run_bench_async(
    url: str,
    concurrency: Sequence[int] = (1, 2, 4, 8),
    prompt_words: Sequence[int] = (64,),
    max_tokens: Sequence[int] = (64,),
    requests_per_point: int | None = None,
    time_limit_s: float = 60.0,
    model: str | None = None,
    api_key: str | None = None,
    allow_remote: bool = False,
) -> BenchResult:
    check_target(url, allow_remote)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(time_limit_s + 30, connect=10)
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), headers=headers, timeout=timeout
    ) as client:
        if model is None:
            try:
                listing = (await client.get("/v1/models")).json()
                model = str(listing["data"][0]["id"])
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                raise BenchError(f"{url}: cannot list models ({exc}); pass --model") from None
        result = BenchResult(url=url, model=model)
        run_id = secrets.token_hex(4)
        for words in prompt_words:
            for tokens in max_tokens:
                for level in concurrency:
                    count = requests_per_point or max(4, 2 * level)
                    result.points.append(
                        await _run_point(
                            client, model, level, words, tokens, count, time_limit_s, run_id
                        )
                    )
        return result


def run_bench(url: str, **options: Any) -> BenchResult:
    try:
        return asyncio.run(run_bench_async(url, **options))
    except asyncio.CancelledError:
        # asyncio.run answers Ctrl-C by cancelling the load test; when httpx's own cancel
        # scopes were cancelling at that moment too, the CancelledError escapes instead of a
        # KeyboardInterrupt. Either way the user pressed Ctrl-C.
        raise KeyboardInterrupt from None


def format_bench(result: BenchResult) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"localllm bench: {result.model} at {result.url}")
    for column in (
        "streams",
        "prompt words",
        "max tok",
        "req",
        "err",
        "req/s",
        "agg tok/s",
        "tok/s/stream",
        "TTFT p50 ms",
        "p95",
        "p99",
        "ITL p50 ms",
        "p95",
        "p99",
    ):
        table.add_column(column, justify="right")
    for p in result.points:
        table.add_row(
            str(p.concurrency),
            str(p.prompt_words),
            str(p.max_tokens),
            str(p.requests_done),
            str(p.errors),
            f"{p.requests_per_s:.2f}",
            f"{p.aggregate_tok_s:.1f}",
            f"{p.per_stream_tok_s:.1f}",
            f"{p.ttft_p50_ms:.0f}",
            f"{p.ttft_p95_ms:.0f}",
            f"{p.ttft_p99_ms:.0f}",
            f"{p.itl_p50_ms:.1f}",
            f"{p.itl_p95_ms:.1f}",
            f"{p.itl_p99_ms:.1f}",
        )
    out = StringIO()
    Console(file=out, width=160, force_terminal=False).print(table)
    for p in result.points:
        for sample in p.error_samples:
            out.write(f"error at {p.concurrency} streams: {sample}\n")
    return out.getvalue()


def require_chart_support() -> None:
    """`--chart` needs matplotlib, an optional extra; say so before the load test runs."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--chart needs matplotlib: pip install 'localllm[chart]'")


def plot_bench(result: BenchResult, path: Path) -> Path:
    """A PNG: aggregate and per-stream tok/s, and TTFT / ITL p50 and p95, against concurrency."""
    require_chart_support()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, ttft, itl) = plt.subplots(1, 3, figsize=(14, 4.4))
    series = sorted({(p.prompt_words, p.max_tokens) for p in result.points})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (words, tokens) in enumerate(series):
        pts = sorted(
            (p for p in result.points if (p.prompt_words, p.max_tokens) == (words, tokens)),
            key=lambda p: p.concurrency,
        )
        x = [p.concurrency for p in pts]
        color = colors[index % len(colors)]
        label = f"{words} words in, {tokens} out"
        # one colour per workload; solid = aggregate or p50, dotted = per stream or p95
        speed.plot(x, [p.aggregate_tok_s for p in pts], "o-", color=color, label=f"{label}: all")
        speed.plot(
            x, [p.per_stream_tok_s for p in pts], "s:", color=color, label=f"{label}: per stream"
        )
        ttft.plot(x, [p.ttft_p50_ms for p in pts], "o-", color=color, label=f"{label}: p50")
        ttft.plot(x, [p.ttft_p95_ms for p in pts], "s:", color=color, label=f"{label}: p95")
        itl.plot(x, [p.itl_p50_ms for p in pts], "o-", color=color, label=f"{label}: p50")
        itl.plot(x, [p.itl_p95_ms for p in pts], "s:", color=color, label=f"{label}: p95")
    speed.set(
        title="Throughput (higher is better)", xlabel="concurrent streams", ylabel="tokens / s"
    )
    ttft.set(
        title="Time to first token (lower is better)",
        xlabel="concurrent streams",
        ylabel="milliseconds",
    )
    itl.set(
        title="Inter-token latency (lower is better)",
        xlabel="concurrent streams",
        ylabel="milliseconds",
    )
    for axis in (speed, ttft, itl):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({p.concurrency for p in result.points}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"{result.model} at {result.url}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
