"""MTP (nextn) drafting against plain greedy decoding, one sequence, as one table.

For each model: greedy decoding of the same prompt without and with the model's MTP block
drafting (`localllm.engine.mtp`), the tokens must be identical; the table gives decode speed,
target steps, guesses drafted and accepted. Without --model it runs the tiny random-weight
Qwen3.5 of the tests twice: with a random MTP block (nothing accepted: the pure overhead) and
with a block that agrees with the trunk (everything accepted: the best case). A real model with
an MTP block (Qwen3.5/3.6, GLM-4.x GGUFs converted with it) shows the real acceptance:

    .venv/bin/python scripts/bench_mtp.py [--model PATH ...] [--n-max 3] [--tokens 128]
        [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny models live in tests/

from localllm.engine import logs  # noqa: E402
from localllm.engine.mtp import (  # noqa: E402
    GreedyRun,
    MtpProposer,
    check_mtp_file,
    speculative_greedy,
)
from localllm.errors import LocalLLMError  # noqa: E402

PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. "
)


def _run(path: Path, n_max: int, n_tokens: int, threads: int) -> dict[str, Any]:
    import llama_cpp

    llama: Any = llama_cpp
    check_mtp_file(path)  # a trunk-only file would abort llama.cpp below
    with logs.capture():
        llama.llama_backend_init()
        mparams = llama.llama_model_default_params()
        mparams.load_mtp = True
        mparams.use_extra_bufts = False
        model = llama.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    vocab = llama.llama_model_get_vocab(model)
    text = PROMPT_TEXT.encode() * 4
    buf = (llama.llama_token * (len(text) + 8))()
    n = llama.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
    prompt = list(buf[:n])

    def context() -> Any:
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = len(prompt) + n_tokens + 64
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_seq_max = 1
        cparams.n_rs_seq = n_max  # a hybrid target rolls rejected guesses back
        cparams.n_threads = cparams.n_threads_batch = threads
        with logs.capture():
            return llama.llama_init_from_model(model, cparams)

    results: dict[str, GreedyRun] = {}
    seconds: dict[str, float] = {}
    try:
        for mode in ("warm-up", "plain", "mtp"):  # the first run pays for thread start-up
            ctx = context()
            proposer = None
            if mode == "mtp":
                with logs.capture():
                    proposer = MtpProposer(model, ctx, n_seq=1, n_batch=512, n_threads=threads)
            started = time.perf_counter()
            results[mode] = speculative_greedy(ctx, proposer, prompt, n_tokens, n_max=n_max)
            seconds[mode] = time.perf_counter() - started
            if proposer is not None:
                proposer.close()
            llama.llama_free(ctx)
    finally:
        llama.llama_model_free(model)
    plain, mtp = results["plain"], results["mtp"]
    return {
        "model": path.name,
        "n_max": n_max,
        "tokens": len(mtp.tokens),
        "identical": plain.tokens == mtp.tokens,
        "plain_tok_s": len(plain.tokens) / seconds["plain"],
        "mtp_tok_s": len(mtp.tokens) / seconds["mtp"],
        "plain_steps": plain.steps,
        "mtp_steps": mtp.steps,
        "drafted": mtp.drafted,
        "accepted": mtp.accepted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append",
                        help="A GGUF with an MTP block (repeatable); default: the tiny models.")
    parser.add_argument("--n-max", type=int, default=3, help="Guesses per step (llama.cpp: 3).")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        models = args.model
        if not models:
            from tests.tiny_models import write_qwen35_mtp

            models = [write_qwen35_mtp(Path(folder) / "tiny-qwen35-mtp-random.gguf").path,
                      write_qwen35_mtp(Path(folder) / "tiny-qwen35-mtp-agrees.gguf",
                                       agrees=True).path]
        try:
            rows = [_run(path, args.n_max, args.tokens, args.threads) for path in models]
        except LocalLLMError as exc:
            raise SystemExit(f"bench_mtp: {exc}") from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| model | n_max | tokens | same text | plain tok/s | MTP tok/s | target steps "
          "(plain / MTP) | accepted / drafted |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["accepted"] / r["drafted"] if r["drafted"] else 0.0
        print(f"| {r['model']} | {r['n_max']} | {r['tokens']} | {'yes' if r['identical'] else 'NO'}"
              f" | {r['plain_tok_s']:.1f} | {r['mtp_tok_s']:.1f} | {r['plain_steps']} / "
              f"{r['mtp_steps']} | {r['accepted']} / {r['drafted']} ({100 * rate:.0f}%) |")


if __name__ == "__main__":
    main()
