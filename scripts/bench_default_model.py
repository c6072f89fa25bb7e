"""The embedded models side by side, as a first user meets them: five one-line questions through
the chat template at temperature 0, each answer, its length and the decode speed; the size; and
the decode speed over a longer plain-text continuation (the same for both models).

This is how the default model was chosen (docs/models.md has the table):

    .venv/bin/python scripts/bench_default_model.py [--threads 2] [--max-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from localllm.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from localllm.models import EMBEDDED_MODELS, embedded_path

QUESTIONS = (
    "What is the capital of France? Answer in one sentence.",
    "Say hi",
    "What is 2 + 3?",
    "Name three colours.",
    "Translate 'thank you' into French.",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--speed-tokens", type=int, default=128,
                        help="Length of the plain-text continuation timed for decode speed.")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON.")
    args = parser.parse_args()
    rows = []
    for model in EMBEDDED_MODELS:
        path = embedded_path(model, Path("models"))
        config = EngineConfig(model_path=path, n_ctx=1024, n_parallel=1, n_threads=args.threads)
        with Engine.load(config) as engine:
            for question in QUESTIONS:
                prompt = engine.chat_prompt([{"role": "user", "content": question}])
                result = engine.submit(
                    GenerationRequest(
                        prompt=prompt,
                        max_tokens=args.max_tokens,
                        add_special=False,
                        sampling=SamplingParams(temperature=0),
                    )
                ).result()
                rows.append(
                    {
                        "model": model.name,
                        "size_bytes": path.stat().st_size,
                        "question": question,
                        "answer": result.text,
                        "tokens": result.usage.completion_tokens,
                        "finish_reason": result.finish_reason,
                        "decode_tokens_per_s": round(result.decode_tokens_per_s, 1),
                    }
                )
            speed = engine.submit(
                GenerationRequest(
                    prompt="The history of the city begins",
                    max_tokens=args.speed_tokens,
                    sampling=SamplingParams(temperature=0),
                )
            ).result()
            rows.append(
                {
                    "model": model.name,
                    "size_bytes": path.stat().st_size,
                    "question": "(plain-text continuation, for speed)",
                    "answer": speed.text,
                    "tokens": speed.usage.completion_tokens,
                    "finish_reason": speed.finish_reason,
                    "decode_tokens_per_s": round(speed.decode_tokens_per_s, 1),
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        answer = " ".join(str(row["answer"]).split())
        print(
            f"{row['model']:<28} {row['tokens']:>3} tok {row['decode_tokens_per_s']:>6} tok/s "
            f"{row['finish_reason']:<6} {row['question']!r} -> {answer[:120]!r}"
        )


if __name__ == "__main__":
    main()
