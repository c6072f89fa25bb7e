"""Prompt reuse across the turns of a growing chat, with and without context checkpoints.

    .venv/bin/python scripts/bench_reuse.py [--turns 10] [--threads 1] [--answer-tokens 600]

Models: the embedded Gemma 3 270M (sliding window 512 on 15 of 18 layers) and a tiny random-weight
Qwen3.5 (Gated DeltaNet hybrid, tests/tiny_models.py). Each runs the same chat under:
- `checkpoints`: the small sliding-window cache, 4 context checkpoints per slot (the default);
- `none`: the small cache without checkpoints (ctx_checkpoints 0);
- `swa_full` (sliding-window models only): the full-size cache, which needs no checkpoints;
  loaded for its memory only (its turns reuse like `checkpoints` at best), unless --swa-full-chat.
A turn appends a user message to the chat and greedily generates an answer of --answer-tokens
tokens (end of generation suppressed); the answer goes back trimmed, as chat clients send it.
Then the same prompt is sent again, as a chat page's Regenerate button does: its common prefix
with the slot ends before the answer just generated, which the slot must be cut back over.
Gemma's small cache holds PAD(512 + n_ubatch, 256) = 1024 cells per slot, so a cut back into the
last 512 tokens still finds its window there; longer answers (the default 600) overwrite the
window of the prompt's end, where the next turn's prefix ends. The table prints, per turn, the
prompt tokens, the tokens computed (prompt - reused) and the time to first token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localllm.engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from localllm.models import embedded_model_path  # noqa: E402
from tests.tiny_models import write_qwen35  # noqa: E402

QUESTIONS = [
    "Tell me about the mountains of Peru and the animals that live there.",
    "What do llamas eat, and how much water do they need?",
    "How are alpacas different from llamas?",
    "Which countries raise the most alpacas today?",
    "How is alpaca wool spun and dyed?",
    "What did the Inca use llamas for?",
    "How long do llamas live, and how big do they get?",
    "Can llamas guard sheep? How?",
    "What is a guanaco?",
    "Summarise everything we discussed in three sentences.",
]


@dataclass(frozen=True)
class Turn:
    prompt_tokens: int
    computed_tokens: int  # the next turn
    ttft_s: float
    regenerate_computed_tokens: int  # the same prompt again
    regenerate_ttft_s: float


def run_chat(config: EngineConfig, turns: int, answer_tokens: int) -> tuple[list[Turn], Any]:
    with Engine.load(config) as engine:
        eos = engine.backend.eos_id
        sampling = SamplingParams(temperature=0, logit_bias=((eos, -100.0),) if eos >= 0 else ())
        messages: list[dict[str, str]] = []
        rows = []
        for turn in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            prompt = engine.chat_prompt(messages)
            request = GenerationRequest(prompt=prompt, max_tokens=answer_tokens, sampling=sampling)
            result = engine.submit(request).result()
            again = engine.submit(request).result()  # greedy: the same answer, cached again
            rows.append(
                Turn(
                    result.usage.prompt_tokens,
                    result.usage.prompt_tokens - result.usage.cached_tokens,
                    result.time_to_first_token_s,
                    again.usage.prompt_tokens - again.usage.cached_tokens,
                    again.time_to_first_token_s,
                )
            )
            messages.append({"role": "assistant", "content": result.text.strip() or "ok"})
        return rows, (engine.memory, engine.stats())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    # One thread: ggml's spinning barrier degrades badly when other jobs share few cores.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--answer-tokens", type=int, default=600,
                        help="answer length on Gemma 3 270M (the tiny hybrid answers 64)")
    parser.add_argument("--models", default="gemma3-270m,tiny-qwen35")
    parser.add_argument("--swa-full-chat", action="store_true",
                        help="also run the chat with the full-size cache (slow on few cores)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-reuse-"))
    models = {
        "gemma3-270m": (embedded_model_path(ROOT / "models"), args.answer_tokens,
                        ("checkpoints", "none", "swa_full")),
        "tiny-qwen35": (write_qwen35(folder / "tiny-qwen35.gguf").path, 64,
                        ("checkpoints", "none")),
    }
    summary = []
    for name in args.models.split(","):
        path, answer_tokens, modes = models[name]
        for mode in modes:
            # One slot that holds the whole chat (its answers and the template's turns).
            config = EngineConfig(
                model_path=path,
                n_ctx=16384,
                n_parallel=1,
                n_threads=args.threads,
                swa_full=mode == "swa_full",
                ctx_checkpoints=0 if mode == "none" else 4,
                max_tokens_default=answer_tokens,
            )
            if mode == "swa_full" and not args.swa_full_chat:
                with Engine.load(config) as engine:
                    memory = engine.memory
                summary.append((name, mode, 0, 0, 0.0, memory.get("kv_cache_mib", 0.0), 0.0))
                continue
            rows, (memory, stats) = run_chat(config, args.turns, answer_tokens)
            print(f"\n{name}, {mode}: KV cache {memory.get('kv_cache_mib', 0):.1f} MiB, "
                  f"checkpoints held {stats.checkpoint_bytes / 2**20:.2f} MiB "
                  f"(saved {stats.checkpoints_saved_total}, "
                  f"restored {stats.checkpoints_restored_total})")
            print(f"{'turn':>4}  {'prompt':>6}  {'computed':>8}  {'TTFT s':>7}  "
                  f"{'regenerate: computed':>20}  {'TTFT s':>7}")
            for index, row in enumerate(rows, start=1):
                print(f"{index:>4}  {row.prompt_tokens:>6}  {row.computed_tokens:>8}  "
                      f"{row.ttft_s:>7.2f}  {row.regenerate_computed_tokens:>20}  "
                      f"{row.regenerate_ttft_s:>7.2f}")
            later = rows[1:]
            summary.append((
                name, mode, sum(r.computed_tokens for r in later),
                sum(r.prompt_tokens for r in later),
                statistics.median(r.ttft_s for r in later) if later else 0.0,
                memory.get("kv_cache_mib", 0.0), stats.checkpoint_bytes / 2**20,
            ))
            summary.append((
                name, mode + " regen", sum(r.regenerate_computed_tokens for r in rows),
                sum(r.prompt_tokens for r in rows),
                statistics.median(r.regenerate_ttft_s for r in rows),
                memory.get("kv_cache_mib", 0.0), stats.checkpoint_bytes / 2**20,
            ))
    print(f"\nturns 2..{args.turns} (regenerate: turns 1..{args.turns}), {args.threads} "
          "threads:")
    print(f"{'model':<12} {'mode':<12} {'computed/prompt tokens':>22} {'median TTFT s':>13} "
          f"{'KV MiB':>7} {'ckpt MiB':>8}")
    for name, mode, computed, total, ttft, kv, ckpt in summary:
        tokens = f"{computed}/{total}" if total else "(memory only)"
        print(f"{name:<12} {mode:<12} {tokens:>22} {ttft:>13.2f} {kv:>7.1f} {ckpt:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
