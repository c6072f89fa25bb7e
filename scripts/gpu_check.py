"""GPU truth: load real architectures with the fitter's plans, measure what llama.cpp allocates
and how fast it runs, and write both side by side.

    python scripts/gpu_check.py OUT_DIR            # on a CUDA build with a GPU (under 8 minutes)
    python scripts/gpu_check.py OUT_DIR --cpu      # the same, end to end, on the CPU backend

What it does, in order, as far as the time budget (--budget-s) allows:

1. 24 GiB plans: models of real architectures (Llama-3.1-8B, Qwen2.5-32B, Gemma-3-27B with its
   sliding window, Mixtral-8x7B, Llama-2-70B) written on the spot as sparse GGUF files (a real
   header, the tensor data a hole that reads as zeros: sizes and speed are those of the real
   model, nothing heavy is stored). For each, the plan the fitter picks for an RTX 4090 at
   Q4_K_M and at the quant it picks from a whole ladder, loaded with exactly that plan through
   localllm's engine.
2. A grid of explicit configurations of Llama-3.1-8B Q4_K_M (GPU layers none/half/all, context
   4k/32k, q8_0 cache, flash attention on/off, 1 and 4 slots).
3. The engine's decode against llama-cpp-python's own `Llama` generate loop on the same model.

Every load runs in its own process, so the GPU memory it takes (NVML: device free memory
before the process touches CUDA, after the load, after a prompt and a decode) includes the CUDA
context, cuBLAS and the memory pool. Each row holds the prediction per buffer (weights, KV
cache, compute, output, overhead) and device, llama.cpp's own buffer lines, and decode and
prompt tok/s predicted for the card the load ran on (the fitter given the card NVML sees) and
measured. Output: OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md; tests/test_gpu_measurements.py
compares the fitter with the files committed under benchmarks/gpu/.

--cpu runs the same steps on the CPU backend with small models (the embedded Gemma 3 270M and
small sparse ones of the same families), so the script is proven before GPU time is spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localllm.engine.dry_run import parse_load_log  # noqa: E402
from localllm.fitter import FitRequest, Plan, fit_header, fit_ladder  # noqa: E402
from localllm.gguf_header import ModelHeader, read_header  # noqa: E402
from localllm.hardware import (  # noqa: E402
    TYPICAL_HOST,
    GPUInfo,
    Hardware,
    HostInfo,
    detect_gpus,
    parse_gpu_names,
    probe_host,
    process_gpu_bytes,
)
from tests import gguf_factory as gf  # noqa: E402

SCHEMA = 1
MIB = 1024 * 1024
GIB = 1024**3
PLAN_CARD = "rtx4090"  # the card the 24 GiB plans are made for
PLAN_QUANT = "Q4_K_M"
GRID_MODEL = {"gpu": "llama-3.1-8b", "cpu": "tiny-llama"}
EMBEDDED = "embedded"  # the model name of localllm's embedded Gemma 3 270M
PROMPT_TOKENS = 512
# Decode from a prompt a real model continues for long (the embedded one would soon end a random
# prompt); a sparse model's zero weights never end anything.
DECODE_PROMPT = "Count from one to one thousand in words: one, two, three, four, five,"
WARMUP_TOKENS = 8

# llama.cpp's "%10s KV buffer size = %8.2f MiB" lines (two spaces before "output").
_BUFFER_RE = re.compile(r"\b(\S+)\s+(model|KV|compute|output) buffer size =\s*([\d.]+) MiB")


# --------------------------------------------------------------------------- models and plans


def model_header(name: str, quant: str, work: Path) -> ModelHeader:
    """The header of a check model: the embedded one, or a sparse file written into `work`."""
    if name == EMBEDDED:
        from localllm.models import embedded_model_path

        return read_header(embedded_model_path(work / "models"))
    path = work / f"{name}-{quant}.gguf"
    spec = gf.CHECK_MODELS[name]
    if not path.is_file():
        gf.write_gguf(path, spec, quant)
    return read_header(path)


def plan_hardware() -> Hardware:
    """The machine the 24 GiB plans are for: an RTX 4090 in a typical desktop."""
    return Hardware(gpus=parse_gpu_names(PLAN_CARD), host=TYPICAL_HOST, threads=8)


def request_for(config: dict[str, Any]) -> FitRequest:
    """The explicit FitRequest that predicts exactly `config` (a row's load configuration)."""
    return FitRequest(
        n_ctx=config["n_ctx"] // config["n_parallel"],  # the request counts per conversation
        n_parallel=config["n_parallel"],
        n_gpu_layers=config["n_gpu_layers"],
        type_k=config["type_k"],
        type_v=config["type_v"],
        flash_attn=config["flash_attn"],
        swa_full=config["swa_full"],
        n_ubatch=config["n_ubatch"],
        n_batch=config["n_batch"],
    )


def config_of(plan: Plan) -> dict[str, Any]:
    params = plan.llama_params()
    return {
        "n_gpu_layers": params["n_gpu_layers"],
        "n_ctx": params["n_ctx"],
        "n_parallel": params["n_parallel"],
        "type_k": params["type_k"],
        "type_v": params["type_v"],
        "flash_attn": params["flash_attn"],
        "swa_full": params["swa_full"],
        "n_ubatch": params["n_ubatch"],
        "n_batch": params["n_batch"],
        "tensor_overrides": [list(o) for o in params["tensor_overrides"]],
    }


def hardware_record(hardware: Hardware) -> dict[str, Any]:
    return {
        "gpus": [dataclasses.asdict(g) for g in hardware.gpus],
        "host": dataclasses.asdict(hardware.host),
        "threads": hardware.threads,
        "cpu_repack": hardware.cpu_repack,
    }


def hardware_from_record(record: dict[str, Any]) -> Hardware:
    return Hardware(
        gpus=tuple(GPUInfo(**g) for g in record["gpus"]),
        host=HostInfo(**record["host"]),
        threads=int(record["threads"]),
        cpu_repack=bool(record["cpu_repack"]),
    )


def predicted(plan: Plan) -> dict[str, Any]:
    return {
        "devices": {
            d.name: {
                "weights": d.weights_bytes,
                "kv": d.kv_bytes,
                "compute": d.compute_bytes,
                "output": d.output_bytes,
                "overhead": d.overhead_bytes,
                "margin": d.margin_bytes,
                "total": d.total_bytes,
                "capacity": d.capacity_bytes,
                "fits": d.fits,
            }
            for d in plan.devices
        },
        "decode_tok_s": plan.decode_tok_s,
        "prompt_tok_s": plan.prompt_tok_s,
        "n_cpu_moe": plan.n_cpu_moe,
        "fits": plan.fits,
    }


def explicit_prediction(header: ModelHeader, hardware: Hardware, config: dict[str, Any]) -> Plan:
    return fit_header(header, hardware, request_for(config))


# --------------------------------------------------------------------------- the worker


def parse_buffers(lines: list[str]) -> dict[str, dict[str, int]]:
    """llama.cpp's `<buffer> <kind> buffer size = X MiB` lines, summed per device and kind.

    CUDA<n> buffers are that GPU's; every other buffer (CPU, CPU_Mapped, CPU_REPACK, CUDA_Host
    pinned memory) is host memory."""
    devices: dict[str, dict[str, int]] = {}
    names = {"model": "weights", "KV": "kv", "compute": "compute", "output": "output"}
    for line in lines:
        if m := _BUFFER_RE.search(line):
            device = m[1] if re.fullmatch(r"CUDA\d+", m[1]) else "host"
            kinds = devices.setdefault(device, {k: 0 for k in names.values()})
            kinds[names[m[2]]] += round(float(m[3]) * MIB)
    return devices


class DeviceMemoryProbe:
    """Free memory of GPU 0 through NVML (which itself takes no GPU memory)."""

    def __init__(self) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def free(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).free)


def _prompt(n_vocab: int, n: int, rng: random.Random) -> tuple[int, ...]:
    # Plain vocabulary tokens, a fresh draw each time so no request reuses another's KV cells.
    return tuple(rng.randrange(300, n_vocab) for _ in range(n))


def _engine_speeds(engine: Any, n_decode: int, rng: random.Random) -> dict[str, float]:
    from localllm.engine import GenerationRequest, SamplingParams

    greedy = SamplingParams(temperature=0.0)
    n_vocab = engine.backend.n_vocab

    def run(n_prompt: int, max_tokens: int) -> tuple[float, Any]:
        prompt = _prompt(n_vocab, n_prompt, rng) if n_prompt else DECODE_PROMPT
        request = GenerationRequest(prompt=prompt, max_tokens=max_tokens, sampling=greedy)
        started = time.perf_counter()
        completion = engine.submit(request).result()
        return time.perf_counter() - started, completion

    run(32, WARMUP_TOKENS)  # first use: CUDA graphs, kernel loading, pool growth
    prompt_s, _ = run(PROMPT_TOKENS, 1)
    total_s, completion = run(0, n_decode)
    tokens = completion.usage.completion_tokens
    decode_s = total_s - completion.time_to_first_token_s
    return {
        "prompt_tok_s": PROMPT_TOKENS / prompt_s,
        "decode_tok_s": (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else 0.0,
        "decode_tokens": tokens,
    }


def _llama_loop_decode(path: Path, config: dict[str, Any], threads: int, n_decode: int,
                       use_extra_bufts: bool, use_mmap: bool) -> float:
    """llama-cpp-python's own `Llama.generate` loop (greedy) on the same file and configuration."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    default_params = bindings.llama_model_default_params

    def params() -> Any:
        # Llama() takes no use_extra_bufts; match the engine's (repacked weights crash on AMX VMs).
        p = default_params()
        p.use_extra_bufts = use_extra_bufts
        return p

    bindings.llama_model_default_params = params
    types = {"f16": 1, "q4_0": 2, "q8_0": 8}
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_gpu_layers=config["n_gpu_layers"],
            n_ctx=config["n_ctx"],
            n_batch=config["n_batch"],
            n_ubatch=config["n_ubatch"],
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=bool(config["flash_attn"]),
            swa_full=config["swa_full"],
            type_k=types[config["type_k"]],
            type_v=types[config["type_v"]],
            use_mmap=use_mmap,
            verbose=False,
        )
    finally:
        bindings.llama_model_default_params = default_params
    rng = random.Random(7)
    prompt = list(_prompt(llm.n_vocab(), 16, rng))
    for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0)):  # warm-up
        if i + 1 >= WARMUP_TOKENS:
            break
    started = 0.0
    count = 0
    for _ in llm.generate(llm.tokenize(DECODE_PROMPT.encode()), top_k=1, temp=0.0):
        if count == 0:
            started = time.perf_counter()
        count += 1
        if count >= n_decode:
            break
    elapsed = time.perf_counter() - started
    llm.close()
    return (count - 1) / elapsed if elapsed > 0 else 0.0


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One load in this (fresh) process: memory before/after, buffer lines, speeds."""
    import psutil

    gpu = job["mode"] == "gpu"
    probe = DeviceMemoryProbe() if gpu else None
    rss = psutil.Process()
    free_before = probe.free() if probe else None
    rss_before = rss.memory_info().rss

    from localllm.engine import Engine, EngineConfig

    config = job["config"]
    use_extra_bufts = bool(job["cpu_repack"])
    engine_config = EngineConfig(
        model_path=Path(job["path"]),
        n_ctx=config["n_ctx"],
        n_parallel=config["n_parallel"],
        n_gpu_layers=config["n_gpu_layers"],
        type_k=config["type_k"],
        type_v=config["type_v"],
        flash_attn=config["flash_attn"],
        swa_full=config["swa_full"],
        n_batch=config["n_batch"],
        n_ubatch=config["n_ubatch"],
        n_threads=job["threads"],
        tensor_overrides=tuple((p, b) for p, b in config["tensor_overrides"]),
        use_extra_bufts=use_extra_bufts,
        use_mmap=job["use_mmap"],
        seed=1,
    )
    started = time.perf_counter()
    engine = Engine.load(engine_config)
    load_s = time.perf_counter() - started
    result: dict[str, Any] = {"load_s": load_s, "use_mmap": job["use_mmap"]}
    try:
        if probe:
            result["device_used_after_load"] = free_before - probe.free()  # type: ignore[operator]
        result["host_rss_after_load"] = rss.memory_info().rss - rss_before
        result["buffers"] = parse_buffers(engine.load_log)
        logged = parse_load_log(engine.load_log)
        result["kv_caches"] = [dataclasses.asdict(kv) for kv in logged.kv_caches]
        result["flash_attn"] = logged.flash_attn
        result["buffer_lines"] = [line.strip() for line in engine.load_log
                                  if _BUFFER_RE.search(line) or "llama_kv_cache: size" in line]
        result.update(_engine_speeds(engine, job["n_decode"], random.Random(job["seed"])))
        if probe:
            result["device_used_after_run"] = free_before - probe.free()  # type: ignore[operator]
            result["device_process_bytes"] = process_gpu_bytes()  # NVML's own per-process count
    finally:
        engine.close()
    if job.get("compare_llama"):
        result["llama_loop_decode_tok_s"] = _llama_loop_decode(
            Path(job["path"]), config, job["threads"], job["n_decode"], use_extra_bufts,
            job["use_mmap"],
        )
    return result


# --------------------------------------------------------------------------- the runner


@dataclasses.dataclass
class Job:
    row_id: str
    kind: str  # "plan" (the fitter's own plan for the plan card), "grid" (explicit)
    model: str
    quant: str
    path: Path
    config: dict[str, Any]
    predicted_memory: Plan  # the plan whose per-buffer figures are compared
    predicted_speed: Plan | None  # the fitter given the card the load runs on
    plan_hardware: Hardware
    compare_llama: bool = False
    note: str = ""


def environment(mode: str) -> dict[str, Any]:
    import llama_cpp

    env: dict[str, Any] = {
        "mode": mode,
        "llama_cpp_python": getattr(llama_cpp, "__version__", None),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        **_ggml_version(llama_cpp),
    }
    if mode == "gpu":
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        env.update(
            card=_text(pynvml.nvmlDeviceGetName(handle)),
            card_memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            driver=_text(pynvml.nvmlSystemGetDriverVersion()),
            cuda_driver=f"{cuda // 1000}.{cuda % 1000 // 10}",
            cuda_runtime=_cudart_version(),
        )
    return env


def _ggml_version(llama_cpp: Any) -> dict[str, str]:
    """The vendored llama.cpp's ggml version and commit (libggml-base sits next to libllama)."""
    import ctypes

    folder = Path(llama_cpp.llama_cpp._lib._name).parent
    for path in sorted(folder.glob("libggml-base.*")):
        lib = ctypes.CDLL(str(path))
        lib.ggml_version.restype = lib.ggml_commit.restype = ctypes.c_char_p
        return {"ggml_version": lib.ggml_version().decode(),
                "ggml_commit": lib.ggml_commit().decode()}
    return {}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cudart_version() -> str | None:
    """The CUDA runtime llama.cpp's library loaded (found by its soname, as the loader did)."""
    import ctypes

    for name in ("libcudart.so.13", "libcudart.so.12"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int()
        if lib.cudaRuntimeGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    return None


def real_hardware(mode: str, work: Path) -> Hardware:
    import psutil

    from localllm.engine.build import repack_supported

    # Repacked CPU weights as the engine will load them (its probe, run once per machine), tried
    # on a small sparse model: the GPU machine has no embedded model.
    probe_model = model_header("tiny-llama", PLAN_QUANT, work).paths[0]
    cpu_repack = repack_supported(model_path=probe_model).supported
    threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    gpus = detect_gpus() if mode == "gpu" else ()
    if mode == "gpu" and not gpus:
        raise SystemExit("gpu_check: NVML sees no GPU; run with --cpu on a machine without one")
    return Hardware(gpus=gpus, host=probe_host(), threads=int(threads), cpu_repack=cpu_repack)


def plan_jobs(mode: str, work: Path, real: Hardware, only: set[str] | None) -> list[Job]:
    """The 24 GiB plans: per model the Q4_K_M plan and the ladder's pick, for the plan card."""
    jobs: list[Job] = []
    names = list(gf.GPU_CHECK_MODELS) if mode == "gpu" else [EMBEDDED, *gf.CPU_CHECK_MODELS]
    hardware = plan_hardware() if mode == "gpu" else real
    for name in names:
        if only and name not in only:
            continue
        if name == EMBEDDED:
            header = model_header(name, PLAN_QUANT, work)
            plans = [("plan", header, fit_header(header, hardware))]
        else:
            quants = gf.LADDER_QUANTS if mode == "gpu" else ("Q8_0", "Q4_K_M")
            headers = {q: model_header(name, q, work) for q in quants}
            plans = [(f"plan {PLAN_QUANT}", headers[PLAN_QUANT],
                      fit_header(headers[PLAN_QUANT], hardware))]
            pick = fit_ladder(list(headers.values()), hardware)
            if pick.quant != PLAN_QUANT:
                plans.append((f"ladder pick {pick.quant}", headers[pick.quant],
                               fit_header(headers[pick.quant], hardware)))
        for label, header, plan in plans:
            config = config_of(plan)
            speed = None if plan.n_cpu_moe else explicit_prediction(header, real, config)
            jobs.append(Job(
                row_id=f"{name} {label}", kind="plan", model=name, quant=plan.quant,
                path=plan.file, config=config, predicted_memory=plan, predicted_speed=speed,
                plan_hardware=hardware, compare_llama=name == EMBEDDED,
                note="" if speed else "n_cpu_moe plan: FitRequest has no explicit n_cpu_moe, so "
                "no speed prediction for the real card",
            ))
    return jobs


def grid_jobs(mode: str, work: Path, real: Hardware) -> list[Job]:
    """Explicit configurations of one model, most telling first (the budget may cut the tail)."""
    name = GRID_MODEL[mode]
    header = model_header(name, PLAN_QUANT, work)
    all_layers, half = header.n_layer + 1, (header.n_layer + 1) // 2
    # (GPU layers, context per conversation, K and V cache, flash attention, slots)
    grid: list[tuple[int, int, str, bool, int]] = [
        (all_layers, 4096, "f16", True, 1),
        (all_layers, 32768, "f16", True, 1),
        (half, 4096, "f16", True, 1),
        (0, 4096, "f16", True, 1),
        (all_layers, 32768, "q8_0", True, 1),
        (all_layers, 32768, "f16", False, 1),
        (all_layers, 32768, "f16", True, 4),
        (half, 32768, "q8_0", True, 4),
        (0, 32768, "f16", False, 1),
        (half, 4096, "f16", False, 4),
        (all_layers, 4096, "q8_0", False, 4),  # K only: a quantized V cache needs flash attention
    ]
    if mode == "cpu":  # one device: GPU layers change nothing, the other axes still do
        grid = [g for g in grid if g[0] == all_layers]
    jobs = []
    compared: set[int] = set()
    for ngl, n_ctx, cache, fa, slots in grid:
        type_v = cache if fa else "f16"
        request = FitRequest(n_ctx=n_ctx, n_parallel=slots, n_gpu_layers=ngl, type_k=cache,
                             type_v=type_v, flash_attn=fa)
        plan = fit_header(header, real, request)
        layers = "all" if ngl == all_layers else "none" if ngl == 0 else "half"
        # The engine against llama-cpp-python's loop: once with full, once with partial offload.
        compare = ngl != 0 and ngl not in compared
        compared.add(ngl)
        jobs.append(Job(
            row_id=f"{name} grid: {layers} layers, {slots} x ctx {n_ctx}, K {cache}/V {type_v}, "
            f"fa {'on' if fa else 'off'}",
            kind="grid", model=name, quant=PLAN_QUANT, path=plan.file, config=config_of(plan),
            predicted_memory=plan, predicted_speed=plan, plan_hardware=real,
            compare_llama=compare,
        ))
    return jobs


def _expected_speeds(job: Job) -> tuple[float, float]:
    """Decode and prompt tok/s to expect: for the card at hand, else the plan card's figures."""
    plan = job.predicted_speed or job.predicted_memory
    return max(plan.decode_tok_s, 0.5), max(plan.prompt_tok_s, 5.0)


def estimate_s(job: Job, mode: str) -> float:
    """A pessimistic guess of a job's time, to stop before the budget runs out."""
    decode, prompt = _expected_speeds(job)
    read_rate = 1.5e9 if mode == "gpu" else 0.5e9  # bytes/s of a sparse file read as zeros
    seconds = (
        5  # a fresh process: Python, llama.cpp, the CUDA context
        + job.path.stat().st_size / read_rate
        + (n_decode(job) + WARMUP_TOKENS + 16) / decode
        + (PROMPT_TOKENS + 32) / prompt
    )
    return seconds * (2 if job.compare_llama else 1)


def n_decode(job: Job) -> int:
    """About 1.5 s of decoding, at least 16 tokens and at most 128."""
    return max(16, min(128, int(_expected_speeds(job)[0] * 1.5)))


def run_job(job: Job, mode: str, real: Hardware, timeout_s: float, log: Path) -> dict[str, Any]:
    spec = {
        "mode": mode,
        "path": str(job.path),
        "config": job.config,
        "threads": real.threads,
        "cpu_repack": real.cpu_repack,
        "n_decode": n_decode(job),
        "seed": zlib.crc32(job.row_id.encode()),
        "compare_llama": job.compare_llama,
        # The product maps the file. A GPU run reads it instead: the big sparse files' holes then
        # read as zeros fast, and only the host's own weight buffers are laid out differently.
        "use_mmap": mode == "cpu",
    }
    with log.open("a") as stderr:
        stderr.write(f"\n===== {job.row_id}\n")
        stderr.flush()
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            return result
    return {"error": f"worker exited {done.returncode} without a result (see {log.name})"}


def row_of(job: Job, measured: dict[str, Any], mode: str, real: Hardware) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": job.row_id,
        "kind": job.kind,
        "model": job.model,
        "quant": job.quant,
        "file_bytes": job.path.stat().st_size,
        "config": job.config,
        "plan_hardware": hardware_record(job.plan_hardware),
        "plan_card": job.plan_hardware.gpus[0].name if job.plan_hardware.gpus else "host",
        "predicted": predicted(job.predicted_memory),
        "measured": measured,
    }
    if job.predicted_speed is not None:
        row["predicted_speed"] = {
            "card": real.gpus[0].name if real.gpus else "host",
            "decode_tok_s": job.predicted_speed.decode_tok_s,
            "prompt_tok_s": job.predicted_speed.prompt_tok_s,
            "full_offload": job.predicted_speed.full_offload,
        }
    if job.note:
        row["note"] = job.note
    for device, entry in device_comparison(row).items():
        if device != "host" and "total" in entry["measured"]:
            # The central claim: what the load really took stays inside the card minus the margin.
            pred = entry["predicted"]
            row["inside_plan_card"] = (
                entry["measured"]["total"] + pred["margin"] <= pred["capacity"]
            )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="folder for gpu_check.json and .md")
    parser.add_argument("--cpu", action="store_true", help="CPU backend, small models")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting loads after this many seconds (default 420)")
    parser.add_argument("--work", type=Path, help="folder for the sparse GGUF files")
    parser.add_argument("--only", action="append", help="only this model (repeatable)")
    parser.add_argument("--no-grid", action="store_true", help="skip the configuration grid")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.out is None:
        parser.error("give the output folder")
    started = time.monotonic()
    mode = "cpu" if args.cpu else "gpu"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("")

    if mode == "gpu":
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():
            raise SystemExit("gpu_check: this llama-cpp-python has no GPU offload (a CPU build, "
                             "or no NVIDIA driver); build it with scripts/install-cuda-backend.sh, "
                             "or pass --cpu")
    real = real_hardware(mode, work)
    env = environment(mode)
    print(f"gpu_check ({mode}): {env.get('card', env['cpu'])}; planning models", flush=True)
    only = set(args.only) if args.only else None
    jobs = plan_jobs(mode, work, real, only)
    if not args.no_grid and (only is None or GRID_MODEL[mode] in only):
        jobs += grid_jobs(mode, work, real)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    probe = DeviceMemoryProbe() if mode == "gpu" else None
    idle_free = probe.free() if probe else 0
    for job in jobs:
        if probe:  # the last worker's memory goes back when its process is gone; wait for it
            deadline = time.monotonic() + 10
            while probe.free() < idle_free - 64 * MIB and time.monotonic() < deadline:
                time.sleep(0.2)
        elapsed = time.monotonic() - started
        left = args.budget_s - elapsed
        if estimate_s(job, mode) > left:
            skipped.append(f"{job.row_id}: time budget ({left:.0f} s left)")
            continue
        measured = run_job(job, mode, real, left + 30, log)
        rows.append(row_of(job, measured, mode, real))
        status = measured.get("error") or (
            f"decode {measured['decode_tok_s']:.1f} tok/s, loaded in {measured['load_s']:.1f} s")
        print(f"  {job.row_id}: {status} [{time.monotonic() - started:.0f} s]", flush=True)

    report = {
        "schema": SCHEMA,
        "mode": mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": env,
        "hardware": hardware_record(real),
        "budget_s": args.budget_s,
        "elapsed_s": round(time.monotonic() - started, 1),
        "rows": rows,
        "skipped": skipped,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print((out / "gpu_check.md").read_text())
    failed = [r["id"] for r in rows if "error" in r["measured"]]
    return 1 if failed or not rows else 0


# --------------------------------------------------------------------------- the table


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:,.0f}"


def _pair(pred: float | None, meas: float | None, fmt: str = "{:,.0f}") -> str:
    p = "-" if pred is None else fmt.format(pred)
    m = "-" if meas is None else fmt.format(meas)
    if pred is None or meas is None or meas == 0:
        return f"{p} / {m}"
    return f"{p} / {m} ({100 * (pred - meas) / meas:+.0f}%)"


def device_comparison(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per device: predicted and measured bytes of each buffer kind, plus overheads."""
    measured = row["measured"]
    out: dict[str, dict[str, Any]] = {}
    for device, pred in row["predicted"]["devices"].items():
        meas = measured.get("buffers", {}).get(device, {})
        entry: dict[str, Any] = {"predicted": pred, "measured": dict(meas)}
        if device != "host" and "device_used_after_run" in measured:
            buffers = sum(meas.get(k, 0) for k in ("weights", "kv", "compute", "output"))
            entry["measured"]["overhead"] = measured["device_used_after_run"] - buffers
            entry["measured"]["total"] = measured["device_used_after_run"]
        out[device] = entry
    return out


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# gpu_check ({report['mode']}), {report['created']}", ""]
    if report["mode"] == "gpu":
        lines.append(f"Card: {env['card']} ({env['card_memory_bytes'] / GIB:.1f} GiB), driver "
                     f"{env['driver']}, CUDA driver {env['cuda_driver']}, runtime "
                     f"{env['cuda_runtime']}; ")
    lines.append(f"llama-cpp-python {env['llama_cpp_python']} (ggml {env.get('ggml_version')}, "
                 f"commit {env.get('ggml_commit')}); CPU {env['cpu']}; "
                 f"{report['elapsed_s']} s of a {report['budget_s']:.0f} s budget.")
    lines += ["", "MiB predicted / measured (error). Device: the GPU (CUDA0), or the host on a "
              "CPU-only run. Speeds: predicted for the card the load ran on / measured."]
    if report["mode"] == "cpu":
        lines.append("A CPU run proves the script and the memory rules; its speeds swing by "
                     "several times on a machine whose cores other jobs share.")
    lines.append("")
    lines.append("| row | device | weights | KV | compute | overhead | total used | "
                 "decode tok/s | prompt tok/s | Llama loop tok/s |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        measured = row["measured"]
        if "error" in measured:
            lines.append(f"| {row['id']} | - | {measured['error']} | | | | | | | |")
            continue
        comparison = device_comparison(row)
        device = next((d for d in comparison if d != "host"), "host")
        c = comparison[device]
        p, m = c["predicted"], c["measured"]
        speed = row.get("predicted_speed", {})
        compute_pred = p["compute"] + (p["output"] if device == "host" else 0)
        compute_meas = m.get("compute", 0) + (m.get("output", 0) if device == "host" else 0)
        cells = [
            row["id"] + (f" ({row['plan_card']} plan)" if row["kind"] == "plan" else ""),
            device,
            _pair(p["weights"] / MIB, m.get("weights", 0) / MIB),
            _pair(p["kv"] / MIB, m.get("kv", 0) / MIB),
            _pair(compute_pred / MIB, compute_meas / MIB),
            _pair(p["overhead"] / MIB, m["overhead"] / MIB if "overhead" in m else None),
            _pair(p["total"] / MIB, m["total"] / MIB if "total" in m else None),
            _pair(speed.get("decode_tok_s"), measured.get("decode_tok_s"), "{:.1f}"),
            _pair(speed.get("prompt_tok_s"), measured.get("prompt_tok_s"), "{:.0f}"),
            f"{measured['llama_loop_decode_tok_s']:.1f}"
            if "llama_loop_decode_tok_s" in measured else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
