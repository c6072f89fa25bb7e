"""Serving benchmark on the embedded model: localllm vs a direct llama-cpp-python loop vs
llama-cpp-python's own server (`python -m llama_cpp.server`). Prints one table.

    .venv/bin/python scripts/bench_serve.py [--threads 2] [--tokens 64]

`--stall` runs the other scenario instead (issue 25, docs/scheduling.md): one user streams while
another sends a --prompt-tokens long prompt; the streaming user's gaps between two tokens while
the prompt is read, the prompt's time to first token and the stream's tokens/s then, for
localllm with prefill pacing on (--stall-ms) and off, and llama-server beside them (4 slots,
`-np 4 -t THREADS --no-repack`). The three servers run at once and their runs alternate, so load
from other work on the machine falls on all of them alike; each cell is the median of --reps.

    .venv/bin/python scripts/bench_serve.py --stall [--reps 5] [--llama-server PATH]

Needs llama-cpp-python's server extras for the comparison (sse-starlette, starlette-context,
PyYAML); without them that column is skipped. Both servers get the same thread count. The
client runs on the same machine, so on few cores absolute numbers include its overhead.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in a faraway city.",
    "Tell the history of a small fishing village over one hundred years.",
    "Write a letter from a lighthouse keeper to his sister.",
    "Describe the life cycle of a star, step by step.",
    "Write a travel diary of a journey across the mountains.",
    "Tell a tale about a robot who wants to become a chef.",
]
SYSTEM = "You are a patient assistant who answers questions about farm animals in detail. " * 12

# llama.cpp's AMX weight repacking crashes llama_decode on this (virtualised) CPU; the localllm
# engine turns it off on AMX CPUs, so the llama-cpp-python runs get the same setting.
_NO_EXTRA_BUFTS = (
    "import llama_cpp.llama_cpp as _l\n"
    "_orig = _l.llama_model_default_params\n"
    "def _params():\n"
    "    p = _orig(); p.use_extra_bufts = False; return p\n"
    "_l.llama_model_default_params = _params\n"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class StreamResult:
    ttft_s: float
    tokens: int
    decode_s: float  # first to last content chunk
    wall_s: float


def _stream(url: str, path: str, body: dict[str, object]) -> StreamResult:
    started = time.perf_counter()
    first = last = 0.0
    chunks = 0
    usage_tokens = 0
    with httpx.stream("POST", url + path, json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage_tokens = data["usage"].get("completion_tokens", 0)
            for choice in data.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
    end = time.perf_counter()
    return StreamResult(first - started, usage_tokens or chunks, last - first, end - started)


def _completion_body(i: int, tokens: int) -> dict[str, object]:
    return {
        "model": "m",
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": tokens,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Level:
    streams: int
    aggregate_tps: float
    ttft_p50: float
    ttft_p95: float


def _concurrency(url: str, streams: int, tokens: int, rounds: int) -> Level:
    ttfts: list[float] = []
    total_tokens = 0
    total_wall = 0.0
    for r in range(rounds):
        results: list[StreamResult] = []

        def one(i: int, results: list[StreamResult] = results) -> None:
            results.append(_stream(url, "/v1/completions", _completion_body(i, tokens)))

        started = time.perf_counter()
        threads = [threading.Thread(target=one, args=(100 * r + i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total_wall += time.perf_counter() - started
        total_tokens += sum(x.tokens for x in results)
        ttfts += [x.ttft_s for x in results]
    return Level(
        streams, total_tokens / total_wall, _percentile(ttfts, 0.5), _percentile(ttfts, 0.95)
    )


def _single_stream_tps(url: str, tokens: int, runs: int = 3) -> float:
    rates = []
    for i in range(runs):
        result = _stream(url, "/v1/completions", _completion_body(1000 + i, tokens))
        if result.tokens > 1 and result.decode_s > 0:
            rates.append((result.tokens - 1) / result.decode_s)
    return statistics.median(rates)


def _chat_turns(url: str) -> tuple[float, float]:
    """TTFT of a first chat turn (long system prompt) and of the next turn."""
    messages: list[dict[str, str]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What do goats eat?"},
    ]
    body: dict[str, object] = {
        "model": "m",
        "messages": messages,
        "max_tokens": 16,
        "stream": True,
        "temperature": 0.8,
        "seed": 1,
    }
    first = _stream(url, "/v1/chat/completions", body)
    # The assistant's answer is not needed for the prefix to match; a fixed one keeps it simple.
    messages += [
        {"role": "assistant", "content": "Goats eat hay."},
        {"role": "user", "content": "And sheep?"},
    ]
    second = _stream(url, "/v1/chat/completions", {**body, "messages": messages})
    return first.ttft_s, second.ttft_s


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                health = httpx.get(url + "/health", timeout=1)
                if health.status_code in (200, 404):  # llama-cpp-python has no /health
                    return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not come up")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class ServerRun:
    single_tps: float
    levels: list[Level]
    turn1_ttft: float
    turn2_ttft: float


def _measure(url: str, tokens: int, levels: list[int], rounds: int) -> ServerRun:
    _stream(url, "/v1/completions", _completion_body(0, 8))  # warm-up
    single = _single_stream_tps(url, tokens)
    results = [_concurrency(url, n, tokens, rounds) for n in levels]
    turn1, turn2 = _chat_turns(url)
    return ServerRun(single, results, turn1, turn2)


def start_localllm(
    model: Path, config_dir: str, threads: int, n_ctx: int, parallel: int, extra: str = ""
) -> tuple[subprocess.Popen[bytes], str]:
    """`localllm serve` in a subprocess with only these settings (no config file); ready."""
    port = _free_port()
    config = Path(config_dir) / "none.toml"
    config.write_text("")
    code = (
        "from localllm.server.run import serve\nfrom localllm.settings import Settings\n"
        f"serve(Settings(port={port}, model={str(model)!r}, model_alias='m', n_ctx={n_ctx}, "
        f"parallel={parallel}, threads={threads}, log_level='warning'{extra}))\n"
    )
    env = {**os.environ, "LOCALLLM_CONFIG": str(config)}
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process)
    except BaseException:
        _stop(process)
        raise
    return process, f"http://127.0.0.1:{port}"


def run_localllm(
    model: Path, threads: int, tokens: int, levels: list[int], rounds: int
) -> ServerRun:
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_localllm(model, tmp, threads, 1024 * max(levels), max(levels))
        try:
            return _measure(url, tokens, levels, rounds)
        finally:
            _stop(process)


def run_llama_cpp_server(
    model: Path, threads: int, tokens: int, levels: list[int], rounds: int
) -> ServerRun | None:
    try:
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
    except ImportError:
        print("llama-cpp-python server extras missing: skipping its column", file=sys.stderr)
        return None
    port = _free_port()
    code = (
        _NO_EXTRA_BUFTS
        + "import sys, runpy\n"
        + f"sys.argv = ['llama_cpp.server', '--model', {str(model)!r}, '--model_alias', 'm', "
        + f"'--port', '{port}', "
        + f"'--n_threads', '{threads}', '--n_threads_batch', '{threads}', '--n_ctx', '2048', "
        # Its default interrupts a running stream when a new request arrives; queue instead.
        + "'--interrupt_requests', 'False', '--verbose', 'False']\n"
        + "runpy.run_module('llama_cpp.server', run_name='__main__')\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process)
        return _measure(f"http://127.0.0.1:{port}", tokens, levels, rounds)
    finally:
        _stop(process)


def direct_tps(model: Path, threads: int, tokens: int) -> float:
    """Decode tok/s of a plain llama-cpp-python generate loop (no server), in a subprocess."""
    code = (
        _NO_EXTRA_BUFTS
        + "import time, llama_cpp\n"
        + f"llm = llama_cpp.Llama({str(model)!r}, n_ctx=2048, n_threads={threads}, "
        + f"n_threads_batch={threads}, verbose=False)\n"
        + "rates = []\n"
        + "for i in range(3):\n"
        + f"    tokens = llm.tokenize({PROMPTS[0]!r}.encode())\n"
        + "    llm.reset()\n"
        + "    n = 0\n"
        + "    for token in llm.generate(tokens, temp=0.8, top_k=40, top_p=0.95, min_p=0.05):\n"
        + "        if n == 0: start = time.perf_counter()\n"
        + "        n += 1\n"
        + f"        if n == {tokens} or llm.token_eos() == token: break\n"
        + "    rates.append((n - 1) / (time.perf_counter() - start))\n"
        + "rates.sort(); print(rates[1])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


STALL_STREAM = "Write a long story about a dragon who learns to paint, chapter by chapter."
LEDGER = (
    "The harbour office kept a ledger of every ship that came in, with its cargo, its captain "
    "and the weather on the day it docked. Clerks copied the entries twice a week. "
)


@dataclass
class StallRun:
    worst_gap_s: float  # the streaming user's, while the long prompt was read
    p99_gap_s: float  # the same gaps' 99th percentile
    median_gap_s: float  # the streaming user's, over the whole stream
    ttft_s: float  # the long prompt's, seen by its client
    stream_tps: float  # the stream's tokens/s while the long prompt was read
    covered: bool  # the stream was still running when the long prompt's first token came


def _stall_run(url: str, prompt: str) -> StallRun:
    """Stream STALL_STREAM; after 10 chunks send `prompt` (max_tokens 1); stop the stream once
    the prompt's answer is back."""
    times: list[float] = []
    streaming, done = threading.Event(), threading.Event()
    body = {
        "model": "m",
        "prompt": STALL_STREAM,
        "max_tokens": 1000,
        "temperature": 0,
        "stream": True,
    }

    def consume() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[6:]).get("choices") or []
                    if any(c.get("text") for c in choices):
                        times.append(time.perf_counter())
                        if len(times) == 10:
                            streaming.set()
                    if done.is_set():
                        break  # closing the connection cancels the stream
        finally:
            streaming.set()

    reader = threading.Thread(target=consume)
    reader.start()
    streaming.wait(600)
    sent = time.perf_counter()
    response = httpx.post(
        url + "/v1/completions",
        json={"model": "m", "prompt": prompt, "max_tokens": 1, "temperature": 0},
        timeout=600,
    )
    answered = time.perf_counter()
    response.raise_for_status()
    done.set()
    reader.join(600)
    pairs = list(zip(times, times[1:], strict=False))
    gaps = [b - a for a, b in pairs]
    during = [b - a for a, b in pairs if b >= sent and a <= answered] or [0.0]
    in_window = [t for t in times if sent <= t <= answered]
    return StallRun(
        worst_gap_s=max(during),
        p99_gap_s=_percentile(during, 0.99),
        median_gap_s=statistics.median(gaps) if gaps else 0.0,
        ttft_s=answered - sent,
        stream_tps=len(in_window) / (answered - sent),
        covered=bool(times) and times[-1] >= answered,
    )


def _ledger_prompt(model: Path, n_tokens: int, rep: int) -> str:
    """About `n_tokens` tokens of text, with a first line no server has cached."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    text = f"Ledger {rep} of {time.time_ns()}.\n" + LEDGER * (n_tokens // 30 + 1)
    tokens = vocab.tokenize(text.encode(), add_bos=False)[:n_tokens]
    return vocab.detokenize(tokens).decode(errors="ignore")


def start_llama_server(
    binary: str, model: Path, threads: int, n_ctx: int, parallel: int
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    process = subprocess.Popen(
        [
            binary,
            "-m",
            str(model),
            "-np",
            str(parallel),
            "-t",
            str(threads),
            "--no-repack",
            "-c",
            str(n_ctx),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-a",
            "m",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process)
    except BaseException:
        _stop(process)
        raise
    return process, f"http://127.0.0.1:{port}"


def stall_table(model: Path, args: argparse.Namespace) -> None:
    n_ctx = 4 * (args.prompt_tokens + 1024)
    load_before = os.getloadavg()[0]
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    runs: dict[str, list[StallRun]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for label, stall_ms in (
                (f"localllm, pacing {args.stall_ms:g} ms", args.stall_ms),
                ("localllm, pacing off", 0.0),
            ):
                servers[label] = start_localllm(
                    model, tmp, args.threads, n_ctx, 4, f", max_decode_stall_ms={stall_ms}"
                )
            if args.llama_server:
                servers["llama-server"] = start_llama_server(
                    args.llama_server, model, args.threads, n_ctx, 4
                )
            for _, url in servers.values():  # warm-up
                _stream(url, "/v1/completions", _completion_body(0, 8))
            labels = list(servers)
            for rep in range(args.reps):
                # Alternate the order too, so no server always runs first after a pause.
                for label in labels[rep % len(labels) :] + labels[: rep % len(labels)]:
                    prompt = _ledger_prompt(model, args.prompt_tokens, rep)
                    run = _stall_run(servers[label][1], prompt)
                    runs.setdefault(label, []).append(run)
                    print(
                        f"  rep {rep + 1} {label}: worst gap {run.worst_gap_s * 1000:.0f} ms, "
                        f"TTFT {run.ttft_s:.2f} s, load {os.getloadavg()[0]:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for process, _ in servers.values():
                _stop(process)
    if not args.llama_server:
        print("llama-server: give --llama-server PATH for its row", file=sys.stderr)
    med = statistics.median
    header = (
        "",
        "worst gap ms",
        "median gap ms",
        "p99 gap ms",
        "long TTFT s",
        "stream tok/s",
        "covered",
    )
    rows = [header]
    for label, rs in runs.items():
        rows.append(
            (
                label,
                f"{med(r.worst_gap_s for r in rs) * 1000:.0f}",
                f"{med(r.median_gap_s for r in rs) * 1000:.0f}",
                f"{med(r.p99_gap_s for r in rs) * 1000:.0f}",
                f"{med(r.ttft_s for r in rs):.2f}",
                f"{med(r.stream_tps for r in rs):.1f}",
                f"{sum(r.covered for r in rs)}/{len(rs)}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(
        f"median of {args.reps} runs each, alternating; about {args.prompt_tokens}-token "
        f"prompt; 4 slots; {args.threads} threads; gaps while the prompt was read; load "
        f"average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on "
        f"{os.cpu_count()} CPUs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="repetitions per concurrency level")
    parser.add_argument("--stall", action="store_true", help="the long-prompt stall scenario")
    parser.add_argument("--reps", type=int, default=5, help="--stall: runs per server")
    parser.add_argument("--prompt-tokens", type=int, default=4800, help="--stall: long prompt")
    parser.add_argument(
        "--stall-ms",
        type=float,
        default=200.0,
        help="--stall: localllm's max_decode_stall_ms for the pacing row",
    )
    parser.add_argument("--llama-server", metavar="PATH", help="--stall: a llama-server binary")
    args = parser.parse_args()
    from localllm.models import embedded_model_path

    model = embedded_model_path(REPO / "models")
    if args.stall:
        stall_table(model, args)
        return
    levels = [1, 2, 4, 8]
    print(
        f"model {model.name}, {args.threads} threads, {args.tokens} tokens per request, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    direct = direct_tps(model, args.threads, args.tokens)
    print(f"direct llama-cpp-python: {direct:.1f} tok/s", flush=True)
    ours = run_localllm(model, args.threads, args.tokens, levels, args.rounds)
    theirs = run_llama_cpp_server(model, args.threads, args.tokens, levels, args.rounds)

    def cell(run: ServerRun | None, fmt: str, value: object) -> str:
        return "-" if run is None else fmt.format(value)

    print()
    print(f"{'measure':42} {'localllm':>12} {'llama_cpp.server':>17}")
    print(f"{'direct llama-cpp-python decode tok/s':42} {direct:12.1f} {'':>17}")
    print(
        f"{'single-stream decode tok/s':42} {ours.single_tps:12.1f} "
        f"{cell(theirs, '{:17.1f}', theirs.single_tps if theirs else 0)}"
    )
    print(
        f"{'  ratio to direct':42} {ours.single_tps / direct:12.2f} "
        f"{cell(theirs, '{:17.2f}', theirs.single_tps / direct if theirs else 0)}"
    )
    for i, level in enumerate(ours.levels):
        other = theirs.levels[i] if theirs else None
        name = f"{level.streams} streams aggregate tok/s"
        print(
            f"{name:42} {level.aggregate_tps:12.1f} "
            f"{cell(other, '{:17.1f}', other.aggregate_tps if other else 0)}"
        )
        name = f"{level.streams} streams TTFT p50 / p95 s"
        ours_ttft = f"{level.ttft_p50:.2f}/{level.ttft_p95:.2f}"
        their_ttft = f"{other.ttft_p50:.2f}/{other.ttft_p95:.2f}" if other else "-"
        print(f"{name:42} {ours_ttft:>12} {their_ttft:>17}")

    def scaling(run: ServerRun) -> float:
        four = next(x for x in run.levels if x.streams == 4).aggregate_tps
        return four / run.levels[0].aggregate_tps

    their_scaling = f"{scaling(theirs):17.2f}" if theirs else f"{'-':>17}"
    print(f"{'4 streams / 1 stream aggregate':42} {scaling(ours):12.2f} {their_scaling}")
    print(
        f"{'chat turn 1 TTFT s (long system prompt)':42} {ours.turn1_ttft:12.3f} "
        f"{cell(theirs, '{:17.3f}', theirs.turn1_ttft if theirs else 0)}"
    )
    print(
        f"{'chat turn 2 TTFT s (prefix reused)':42} {ours.turn2_ttft:12.3f} "
        f"{cell(theirs, '{:17.3f}', theirs.turn2_ttft if theirs else 0)}"
    )


if __name__ == "__main__":
    main()
