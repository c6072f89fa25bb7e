"""What a decoding stream costs a long prompt, step by step (issue 25's stall limit), in-process.

Decodes the same ~4,600-token prompt three ways on the embedded Gemma 3 270M (2 threads, 4 slots,
a KV stream per slot as the engine runs it): in 512-token chunks, in 128-token chunks, and in
128-token chunks with one generated token of another slot in every step (what pacing does while a
user streams). llama.cpp (llama_kv_cache::init_batch) splits a batch that mixes sequences into
micro-batches holding equally many tokens of each sequence (`split_equal`), so the stream's one
token becomes a micro-batch of its own: a whole extra pass over the weights per step. That pass,
paid once per paced step, is what bounds the trade between the stream's worst gap and the prompt's
time to first token. (One shared KV stream, llama.cpp's kv_unified, avoids the split, but then
every token attends over every slot's cells: measured slower still, 14.9 s against 11.3 s.)

    .venv/bin/python scripts/bench_mixed_step.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from localllm.engine import EngineConfig
from localllm.engine.backend import BatchItem, LlamaBackend
from localllm.models import embedded_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = embedded_model_path(Path(tempfile.gettempdir()) / "localllm-bench-models")
    config = EngineConfig(
        model_path=model, n_ctx=4 * 6144, n_parallel=4, n_threads=args.threads, n_batch=512,
        n_ubatch=512, use_extra_bufts=False,
    )
    backend = LlamaBackend(config)
    text = "The quick brown fox jumps over the lazy dog. " * 600
    tokens = backend.tokenize(text, True, False)[:4600]
    stream = [0]

    def run(seq: int, chunk: int, mixed: bool) -> tuple[float, int]:
        pos = steps = 0
        seconds = 0.0
        while pos < len(tokens):
            n = min(chunk, len(tokens) - pos)
            items = [BatchItem(tokens[pos + i], pos + i, seq, i == n - 1) for i in range(n)]
            if mixed:  # another slot's generated token, as in a paced step
                items.append(BatchItem(tokens[stream[0]], stream[0], 3, True))
                stream[0] += 1
            started = time.perf_counter()
            if backend.decode(items) != 0:
                raise SystemExit("llama_decode failed")
            seconds += time.perf_counter() - started
            pos += n
            steps += 1
        return seconds, steps

    rows = []
    for seq, chunk, mixed in ((0, 512, False), (1, 128, False), (2, 128, True)):
        seconds, steps = run(seq, chunk, mixed)
        rows.append((chunk, mixed, steps, seconds))
    base = rows[0][3]
    print(f"{'chunk':>5}  {'stream token in each step':<26} {'steps':>5}  {'prompt s':>8}  "
          f"{'vs 512':>6}  {'per step extra ms':>17}")
    for chunk, mixed, steps, seconds in rows:
        extra = (seconds - rows[1][3]) / steps * 1000 if mixed else 0.0
        print(f"{chunk:>5}  {'yes' if mixed else 'no':<26} {steps:>5}  {seconds:>8.2f}  "
              f"{seconds / base:>6.2f}  {extra:>17.1f}")
    print(f"{len(tokens)}-token prompt, {args.threads} threads, a KV stream per slot")
    backend.close()


if __name__ == "__main__":
    main()
