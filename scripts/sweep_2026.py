"""The fitter on the architectures of 2026: memory against llama.cpp's dry run, and speed against
published llama.cpp figures (prints the two markdown tables of docs/fitter.md).

    .venv/bin/python scripts/sweep_2026.py [--speed-only]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localllm.fitter import FitRequest, fit_header  # noqa: E402
from localllm.fitter.search import _Fitter  # noqa: E402
from localllm.gguf_header import read_header  # noqa: E402
from localllm.hardware import TYPICAL_HOST, Hardware, parse_gpu_names  # noqa: E402
from tests.arch_2026 import MODELS, write_model  # noqa: E402

# Published llama.cpp decode figures (tokens/s, tg128 or a chat's first tokens, Q4_K_M unless
# said): (model, card or "cpu", experts on the CPU, figure, source). Figures recalled from the
# sources named, not re-measured here.
PUBLISHED: list[tuple[str, str, bool, float, str]] = [
    ("Qwen3-30B-A3B", "rtx3090ti", False, 167.0,
     "llama.cpp users' benchmarks as quoted in issue 20 (3090 Ti, all layers on the GPU)"),
    ("Qwen3-32B", "rtx4090", False, 38.0,
     "recalled: llama.cpp CUDA dense 32B Q4_K_M on a 4090, community llama-bench runs ~35-40"),
    ("gpt-oss-20b", "rtx4090", False, 215.0,
     "recalled: ggml-org discussion 'guide: running gpt-oss with llama.cpp' (#15396), ~200+"),
    ("Qwen3-30B-A3B", "rtx3090", True, 25.0,
     "recalled: r/LocalLLaMA reports, --n-cpu-moe all experts, dual-channel DDR5 desktop ~20-30"),
    ("Mistral-Small-3.2-24B", "rtx3090", False, 45.0,
     "recalled: llama.cpp 24B Q4_K_M on a 3090, community llama-bench ~40-50"),
]


# Hybrids: predictions only (no llama.cpp figure for these found offline).
PREDICTED_ONLY: list[tuple[str, str]] = [
    ("Qwen3.5-27B", "rtx4090"),
    ("Qwen3.5-35B-A3B", "rtx4090"),
    ("Nemotron-Nano-9B-v2", "rtx4090"),
    ("Gemma-4-31B", "rtx4090"),
]


def speed_rows(folder: Path) -> list[str]:
    rows = []
    headers = {}
    for name, card, cpu_moe, figure, source in PUBLISHED:
        if name not in headers:
            headers[name] = read_header(write_model(folder / f"{name}.gguf", MODELS[name],
                                                    n_vocab=151936))
        header = headers[name]
        hardware = Hardware(parse_gpu_names(card), TYPICAL_HOST, 8, cpu_repack=False)
        request = FitRequest(n_ctx=4096)
        if cpu_moe:  # llama-server --n-cpu-moe N: every layer's experts in host memory
            plan = _Fitter(header, hardware, request).plan(
                (4096, 1), header.n_layer + 1, header.n_layer)
        else:
            plan = fit_header(header, hardware, request)
        where = "experts on CPU" if cpu_moe else (
            "all on GPU" if plan.full_offload else f"{plan.n_gpu_layers} layers on GPU")
        err = 100 * (plan.decode_tok_s - figure) / figure
        rows.append(f"| {name} | {card} ({where}) | {plan.decode_tok_s:.0f} | {figure:.0f} | "
                    f"{err:+.0f}% | {source} |")
    for name, card in PREDICTED_ONLY:
        header = read_header(write_model(folder / f"{name}.gguf", MODELS[name], n_vocab=151936))
        hardware = Hardware(parse_gpu_names(card), TYPICAL_HOST, 8, cpu_repack=False)
        plan = fit_header(header, hardware, FitRequest(n_ctx=4096, swa_full=False))
        rows.append(f"| {name} | {card} (all on GPU) | {plan.decode_tok_s:.0f} | - | - | "
                    "no published llama.cpp figure found offline |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--speed-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.speed_only:
            from tests.test_fit_sweep import report

            print("| model (arch) | config | weights GiB fitter / file | KV + state MiB fitter / "
                  "llama.cpp | compute MiB fitter / llama.cpp |")
            print("|---|---|---|---|---|")
            for row in report(folder):
                print(row, flush=True)
            print()
        print("| model | card | predicted tok/s | published | error | source |")
        print("|---|---|---|---|---|---|")
        for row in speed_rows(folder):
            print(row, flush=True)


if __name__ == "__main__":
    main()
