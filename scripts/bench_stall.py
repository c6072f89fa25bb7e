"""How long a streaming user waits behind another user's long prompt (issue 25), in-process on the
embedded Gemma 3 270M: 4 slots, --threads 2. One user streams a story; once it has produced
tokens, another sends a --prompt-tokens long prompt. Prints, with prefill pacing on
(--stall-ms, the engine's max_decode_stall_ms) and off (0: fixed n_ubatch chunks), the streaming
user's worst and median gap between two tokens and the long prompt's time to first token,
each the median of --reps runs (the two engines loaded at once, their runs alternating), and
the load average the runs saw; on stderr, every run's steps beside the stream.

    .venv/bin/python scripts/bench_stall.py [--reps 3] [--threads 2] [--prompt-tokens 4800]

For llama-server beside it, over HTTP: scripts/bench_serve.py --stall --llama-server PATH.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localllm.engine import (  # noqa: E402
    Engine,
    EngineConfig,
    GenerationRequest,
    SamplingParams,
    TextEvent,
)
from localllm.errors import CancelledError  # noqa: E402
from localllm.models import embedded_model_path  # noqa: E402

STREAM_PROMPT = "Write a long story about a dragon who learns to paint, chapter by chapter."
PARAGRAPH = (
    "The harbour office kept a ledger of every ship that came in, with its cargo, its captain "
    "and the weather on the day it docked. Clerks copied the entries twice a week. "
)
GREEDY = SamplingParams(temperature=0)


@dataclass
class Run:
    worst_gap_s: float  # the streaming user's, while the long prompt was prefilled
    median_gap_s: float  # the streaming user's, over the whole stream
    ttft_s: float  # the long prompt's
    covered: bool  # the stream was still running when the long prompt's first token came


def long_prompt(engine: Engine, n_tokens: int, rep: int) -> tuple[int, ...]:
    # A different first line per run: no slot holds a prefix of it.
    text = f"Ledger {rep} of {time.time_ns()}.\n" + PARAGRAPH * (n_tokens // 30 + 1)
    return tuple(engine.tokenize(text)[:n_tokens])


def one_run(engine: Engine, prompt: tuple[int, ...]) -> Run:
    times: list[float] = []
    streaming = threading.Event()
    handle = engine.submit(GenerationRequest(STREAM_PROMPT, max_tokens=1000, sampling=GREEDY))

    def consume() -> None:
        try:
            for event in handle:
                if isinstance(event, TextEvent):
                    times.append(time.perf_counter())
                    if len(times) == 10:
                        streaming.set()
        except CancelledError:
            pass  # cancelled once the long prompt answered
        streaming.set()

    reader = threading.Thread(target=consume)
    reader.start()
    streaming.wait(600)
    sent = time.perf_counter()
    finish = engine.submit(GenerationRequest(prompt, max_tokens=1, sampling=GREEDY)).result()
    first_token = sent + finish.time_to_first_token_s
    handle.cancel()
    reader.join()
    pairs = list(zip(times, times[1:], strict=False))
    gaps = [b - a for a, b in pairs]
    during = [b - a for a, b in pairs if b >= sent and a <= first_token]
    return Run(
        worst_gap_s=max(during or [0.0]),
        median_gap_s=statistics.median(gaps),
        ttft_s=finish.time_to_first_token_s,
        covered=bool(times) and times[-1] > first_token,
    )


def bench(args: argparse.Namespace) -> dict[str, tuple[list[Run], list[int]]]:
    """Both engines loaded at once, their runs alternating: load from other work on the machine
    falls on both alike."""
    engines: dict[str, Engine] = {}
    runs: dict[str, list[Run]] = {}
    chunks: dict[str, list[int]] = {}
    try:
        for label, stall_ms in (
            (f"localllm, pacing {args.stall_ms:g} ms", args.stall_ms),
            ("localllm, pacing off", 0.0),
        ):
            config = EngineConfig(
                model_path=embedded_model_path(REPO / "models"),
                n_ctx=4 * (args.prompt_tokens + 1024),
                n_parallel=4,
                n_threads=args.threads,
                max_decode_stall_ms=stall_ms,
            )
            engines[label] = Engine.load(config)
            engines[label].generate("Warm up.", max_tokens=8, temperature=0)
        labels = list(engines)
        for rep in range(args.reps):
            for label in labels[rep % 2 :] + labels[: rep % 2]:
                engine = engines[label]
                before = len(engine.recent_steps)
                run = one_run(engine, long_prompt(engine, args.prompt_tokens, rep))
                engine.wait_idle(60)
                runs.setdefault(label, []).append(run)
                steps = list(engine.recent_steps)[before:]
                chunks.setdefault(label, []).extend(p for g, p, _ in steps if g and p >= 16)
                print(
                    f"  rep {rep + 1} {label}: worst gap {run.worst_gap_s * 1000:.0f} ms, "
                    f"TTFT {run.ttft_s:.2f} s, load {os.getloadavg()[0]:.2f}; steps beside "
                    f"the stream (tokens, ms): "
                    f"{[(p, round(t * 1000)) for g, p, t in steps if g and p]}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for engine in engines.values():
            engine.close()
    return {label: (runs[label], chunks[label]) for label in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=4800)
    parser.add_argument("--stall-ms", type=float, default=200.0)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    for label, (runs, chunks) in bench(args).items():
        med = statistics.median
        rows.append(
            (
                label,
                f"{med(r.worst_gap_s for r in runs) * 1000:.0f}",
                f"{med(r.median_gap_s for r in runs) * 1000:.0f}",
                f"{med(r.ttft_s for r in runs):.2f}",
                f"{min(chunks, default=0)}-{max(chunks, default=0)}",
                f"{sum(r.covered for r in runs)}/{len(runs)}",
            )
        )
    header = (
        "",
        "worst gap ms",
        "median gap ms",
        "long TTFT s",
        "chunk beside decode",
        "stream covered",
    )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(
        f"median of {args.reps} runs each; {args.prompt_tokens}-token prompt; "
        f"{args.threads} threads; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
