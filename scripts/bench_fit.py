"""Benchmark the fitter against llama.cpp itself (prints tables; not a test).

1. Memory: the fitter's host-side prediction (no GPU, so llama.cpp's CPU build allocates the same
   buffers) vs llama.cpp's own figures from a no_alloc dry run: weights ("file size"), KV cache,
   output buffer, compute buffer. Rows: the embedded Gemma 3 270M at several n_ctx / n_parallel /
   cache / ubatch / swa_full settings, and sparse header-only GGUFs of Llama 7B, Llama 70B (GQA),
   Mixtral 8x7B (MoE) and Gemma 3 27B (SWA) written by tests/gguf_factory.py.
2. Decode speed of the embedded model on this CPU, predicted (host probe) vs measured with
   llama-cpp-python's bindings (64 greedy tokens, 2 threads and 1 thread).
3. The time of a 7-quant ladder fit of a 70B model from header-only files.

    .venv/bin/python scripts/bench_fit.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localllm.engine.dry_run import dry_run  # noqa: E402
from localllm.fitter import FitRequest, fit, fit_header  # noqa: E402
from localllm.gguf_header import read_header  # noqa: E402
from localllm.hardware import TYPICAL_HOST, Hardware, parse_gpu_names, probe_host  # noqa: E402
from localllm.models import embedded_model_path  # noqa: E402
from tests import gguf_factory as gf  # noqa: E402

MIB = 1024 * 1024


def _quiet_stderr() -> int:
    """llama.cpp prints some lines to stderr itself; keep the table readable."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    return saved


def _restore_stderr(saved: int) -> None:
    os.dup2(saved, 2)
    os.close(saved)


def _err(predicted: int, measured: int) -> str:
    if measured == 0:
        return "   n/a" if predicted else "  0.0%"
    return f"{100 * (predicted - measured) / measured:+6.1f}%"


def memory_table(models: dict[str, Path], quick: bool) -> list[float]:
    embedded_rows: list[dict[str, Any]] = [
        {"n_ctx": 4096},
        {"n_ctx": 4096, "swa_full": False},
        {"n_ctx": 8192, "n_parallel": 4},
        {"n_ctx": 8192, "n_parallel": 4, "swa_full": False},
        {"n_ctx": 32768, "type_k": "q8_0", "type_v": "q8_0"},
        {"n_ctx": 4096, "n_ubatch": 2048},
        {"n_ctx": 2048, "n_ubatch": 128, "flash_attn": False},
        {"n_ctx": 16384, "type_k": "q4_0", "type_v": "q4_0", "swa_full": False},
    ]
    big_rows: list[dict[str, Any]] = [
        {"n_ctx": 4096},
        {"n_ctx": 16384, "n_parallel": 4},
        {"n_ctx": 8192, "flash_attn": False},
        {"n_ctx": 8192, "type_k": "q8_0", "type_v": "q8_0", "n_ubatch": 1024},
    ]
    rows: list[tuple[str, dict[str, Any]]] = [("gemma3-270m", r) for r in embedded_rows]
    for name in ("llama-7b", "llama-70b", "mixtral-8x7b", "gemma3-27b"):
        rows += [(name, r) for r in (big_rows[:2] if quick else big_rows)]
    rows += [("gemma3-27b", {"n_ctx": 8192, "swa_full": False})]
    # llama.cpp's dry run reports the file's tensor bytes; the CPU_REPACK copy is not in it.
    cpu_only = Hardware((), TYPICAL_HOST, 2, cpu_repack=False)
    print("## Memory: fitter prediction vs llama.cpp dry run (MiB; error = predicted vs llama.cpp)")
    print()
    print(f"| {'model':13} | {'settings':38} | {'weights':>9} | {'err':>6} | {'KV':>8} | "
          f"{'err':>6} | {'compute':>8} | {'err':>6} | {'output':>6} | {'err':>6} |")
    print(f"|{'-' * 15}|{'-' * 40}|{'-' * 11}|{'-' * 8}|{'-' * 10}|{'-' * 8}|{'-' * 10}|"
          f"{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    errors: list[float] = []
    headers = {name: read_header(path) for name, path in models.items()}
    for name, settings in rows:
        params = {"n_ctx": 4096, "n_parallel": 1, "n_ubatch": 512, "type_k": "f16",
                  "type_v": "f16", "flash_attn": None, "swa_full": True, **settings}
        saved = _quiet_stderr()
        try:
            measured = dry_run(models[name], n_gpu_layers=0, **params)
        finally:
            _restore_stderr(saved)
        request = FitRequest(n_ctx=params["n_ctx"] // params["n_parallel"],
                             n_parallel=params["n_parallel"],
                             n_ubatch=params["n_ubatch"], type_k=params["type_k"],
                             type_v=params["type_v"], flash_attn=params["flash_attn"],
                             swa_full=params["swa_full"], n_gpu_layers=0)
        host = fit_header(headers[name], cpu_only, request).host
        pairs = [(host.weights_bytes, measured.weights_bytes), (host.kv_bytes, measured.kv_bytes),
                 (host.compute_bytes, measured.total_compute_bytes),
                 (host.output_bytes, measured.total_output_bytes)]
        for predicted, actual in pairs:
            if actual:
                errors.append(abs(predicted - actual) / actual)
        label = " ".join(f"{k}={v}" for k, v in settings.items())
        cells = [f"{p / MIB:9.2f}" if i == 0 else f"{p / MIB:8.2f}" for i, (p, _) in
                 enumerate(pairs)]
        print(f"| {name:13} | {label:38} | {cells[0]} | {_err(*pairs[0])} | {cells[1]} | "
              f"{_err(*pairs[1])} | {cells[2]} | {_err(*pairs[2])} | "
              f"{pairs[3][0] / MIB:6.2f} | {_err(*pairs[3])} |")
    print()
    print("llama.cpp's figures (same rows): weights from its 'file size' line, KV from "
          "'llama_kv_cache: size', compute and output from the buffer lines.")
    return errors


def measure_decode_tok_s(path: Path, threads: int, n_tokens: int = 64, repeats: int = 3) -> float:
    """Greedy decode speed with llama-cpp-python's low-level bindings (verbose off), the best
    of `repeats` runs of `n_tokens` tokens.

    Loaded like localllm's engine loads: extra (repacked) weight buffers off on CPUs with AMX,
    where llama.cpp's AMX path crashes in llama_decode (the high-level `Llama` class has no
    switch for it and segfaults on such machines).
    """
    import llama_cpp as llama
    import numpy as np

    from localllm.engine import logs

    logs.install()  # llama.cpp's lines go to Python logging, not the terminal
    cpuinfo = Path("/proc/cpuinfo")
    has_amx = cpuinfo.exists() and "amx" in cpuinfo.read_text()
    llama.llama_backend_init()
    mparams = llama.llama_model_default_params()
    mparams.use_extra_bufts = not has_amx
    model = llama.llama_model_load_from_file(str(path).encode(), mparams)
    cparams = llama.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = 1024, 512, 512, 1
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.no_perf = True
    ctx = llama.llama_init_from_model(model, cparams)
    vocab = llama.llama_model_get_vocab(model)
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    batch = llama.llama_batch_init(512, 0, 1)

    def step(tokens: list[int], pos: int) -> int:
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        if llama.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    try:
        prompt = [llama.llama_vocab_bos(vocab), *range(1000, 1031)]
        token, pos = step(prompt, 0), len(prompt)
        for _ in range(4):  # warm up
            token, pos = step([token], pos), pos + 1
        elapsed = float("inf")
        for _ in range(repeats):  # best of a few: other work on a shared machine only slows it
            start = time.perf_counter()
            for _ in range(n_tokens):
                token, pos = step([token], pos), pos + 1
            elapsed = min(elapsed, time.perf_counter() - start)
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(ctx)
        llama.llama_model_free(model)
    return n_tokens / elapsed


def speed_table(embedded: Path) -> list[float]:
    host = probe_host()
    header = read_header(embedded)
    print("## Decode speed of Gemma 3 270M Q4_K_M on this CPU (tok/s, 64 greedy tokens)")
    print()
    print(f"host probe ({host.source}): {host.memory_bandwidth_bytes_s / 1e9:.1f} GB/s copy, "
          f"{host.matmul_flops / 1e9:.0f} GFLOP/s float32 matmul, {host.physical_cores} "
          f"physical / {host.logical_cores} logical cores")
    print()
    print("| threads | predicted | measured | error |")
    print("|--------:|----------:|---------:|------:|")
    errors = []
    for threads in (2, 1):
        plan = fit_header(header, Hardware((), host, threads), FitRequest(n_ctx=512))
        measured = measure_decode_tok_s(embedded, threads)
        error = (plan.decode_tok_s - measured) / measured
        errors.append(abs(error))
        predicted = plan.decode_tok_s
        print(f"| {threads:7} | {predicted:9.1f} | {measured:8.1f} | {100 * error:+5.1f}% |")
    print()
    return errors


def ladder_timing(folder: Path) -> None:
    paths = gf.write_ladder(folder, gf.LLAMA_70B)
    hardware = Hardware(parse_gpu_names("rtx3090"), TYPICAL_HOST, 16)
    start = time.perf_counter()
    plan = fit(folder, hardware, FitRequest())
    total = time.perf_counter() - start
    headers = [read_header(p) for p in paths]
    start = time.perf_counter()
    fit(headers, hardware, FitRequest())
    core = time.perf_counter() - start
    print("## 7-quant 70B ladder on one RTX 3090 (header-only files)")
    print()
    print(f"fit(folder) with header reading: {total:.3f} s; fit over read headers: {core:.3f} s; "
          f"chosen {plan.quant} ({plan.n_gpu_layers}/{plan.n_layer + 1} layers on GPU, "
          f"{plan.decode_tok_s:.1f} tok/s)")
    for quant, reason in plan.rejected:
        print(f"  rejected {quant}: {reason[:110]}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows for the big models")
    parser.add_argument("--no-speed", action="store_true", help="skip the decode measurement")
    args = parser.parse_args()
    embedded = embedded_model_path(ROOT / "models")
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        folder = Path(tmp)
        models = {"gemma3-270m": embedded}
        for name, spec in (("llama-7b", gf.LLAMA_7B), ("llama-70b", gf.LLAMA_70B),
                           ("mixtral-8x7b", gf.MIXTRAL_8X7B), ("gemma3-27b", gf.GEMMA3_27B)):
            models[name] = gf.write_gguf(folder / f"{name}.gguf", spec)
        errors = memory_table(models, args.quick)
        print(f"largest memory error: {100 * max(errors):.2f}%")
        print()
        if not args.no_speed:
            speed_errors = speed_table(embedded)
            print(f"largest decode-speed error: {100 * max(speed_errors):.1f}%")
            print()
        ladder_timing(folder / "ladder")


if __name__ == "__main__":
    main()
