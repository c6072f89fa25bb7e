"""`localllm profile`: the memory baseline, predicted vs actual.

Loads the model exactly as `serve` would (the fitter's plan through the engine), runs a short
generation so the compute buffers are really used, then puts the fitter's prediction for each
device next to what llama.cpp allocated (read from its own load log: model, KV, compute and
output buffers), plus the process's peak RSS and, on a GPU, the VRAM NVML says the process uses.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localllm.engine.logs import buffer_lines
from localllm.hardware import process_gpu_bytes
from localllm.settings import Settings
from localllm.units import MIB

KINDS = ("weights", "kv", "compute", "output")

# "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB", "CUDA0 KV buffer size = ...",
# "CPU  output buffer size", "CUDA0 compute buffer size".
_KIND = {"model": "weights", "KV": "kv", "output": "output", "compute": "compute"}


@dataclass(frozen=True)
class ProfileRow:
    device: str  # "CUDA0", ..., or "host"
    kind: str  # weights | kv | compute | output
    predicted_bytes: int
    actual_bytes: int

    @property
    def gap_percent(self) -> float | None:
        if self.actual_bytes == 0:
            return None if self.predicted_bytes == 0 else float("inf")
        return 100.0 * (self.predicted_bytes - self.actual_bytes) / self.actual_bytes


@dataclass(frozen=True)
class ProfileReport:
    model: str
    plan: str
    rows: list[ProfileRow]
    peak_rss_bytes: int
    predicted_host_bytes: int
    gpu_used_bytes: dict[str, int] = field(default_factory=dict)  # NVML, this process
    predicted_gpu_bytes: dict[str, int] = field(default_factory=dict)
    load_s: float = 0.0
    generated_tokens: int = 0
    decode_tok_s: float = 0.0
    predicted_decode_tok_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["rows"] = [{**asdict(r), "gap_percent": r.gap_percent} for r in self.rows]
        return result


def device_of(buffer: str) -> str:
    """llama.cpp buffer name -> our device name: CUDA0 stays, every host buffer is 'host'."""
    if buffer.startswith("CUDA") and not buffer.startswith("CUDA_Host"):
        return buffer.split("_", 1)[0]
    return "host"


def allocated_bytes(load_log: Sequence[str]) -> dict[tuple[str, str], int]:
    """(device, kind) -> bytes, from llama.cpp's `... buffer size = X MiB` lines."""
    totals: dict[tuple[str, str], int] = {}
    for line in buffer_lines(load_log):
        key = (device_of(line.buffer), _KIND[line.kind])
        totals[key] = totals.get(key, 0) + line.bytes
    return totals


def profile_model(model_path: Path, settings: Settings, tokens: int = 32) -> ProfileReport:
    from localllm.engine import Engine
    from localllm.fitter import plan_summary_line
    from localllm.loading import plan_for_serving

    plan, config, warnings = plan_for_serving(model_path, settings)
    started = time.perf_counter()
    with Engine.load(config) as engine:
        load_s = time.perf_counter() - started
        decode_started = time.perf_counter()
        completion = engine.generate(
            "The history of the lighthouse begins", max_tokens=tokens, temperature=0.0
        )
        decode_s = time.perf_counter() - decode_started
        actual = allocated_bytes(engine.load_log)
        gpu_used = process_gpu_bytes()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    rows = []
    names = [f"CUDA{i}" for i in range(len(plan.gpus))] + ["host"]
    for name, device in zip(names, (*plan.gpus, plan.host), strict=True):
        predicted = {
            "weights": device.weights_bytes,
            "kv": device.kv_bytes,
            "compute": device.compute_bytes,
            "output": device.output_bytes,
        }
        for kind in KINDS:
            rows.append(ProfileRow(name, kind, predicted[kind], actual.get((name, kind), 0)))
    generated = completion.usage.completion_tokens
    return ProfileReport(
        model=str(model_path),
        plan=plan_summary_line(plan),
        rows=rows,
        peak_rss_bytes=peak_rss,
        predicted_host_bytes=plan.host.total_bytes,
        gpu_used_bytes=gpu_used,
        predicted_gpu_bytes={n: d.total_bytes for n, d in zip(names, plan.gpus, strict=False)},
        load_s=round(load_s, 3),
        generated_tokens=generated,
        decode_tok_s=generated / decode_s if decode_s else 0.0,
        predicted_decode_tok_s=plan.decode_tok_s,
        warnings=list(warnings),
    )


def format_profile(report: ProfileReport) -> str:
    def mib(n: int) -> str:
        return f"{n / MIB:10.2f}"

    lines = [
        f"model: {report.model}",
        f"plan:  {report.plan}",
        "",
        f"{'device':<8} {'buffer':<8} {'predicted MiB':>13} {'llama.cpp MiB':>13} {'gap':>8}",
    ]
    for row in report.rows:
        gap = row.gap_percent
        gap_text = "-" if gap is None else ("n/a" if gap == float("inf") else f"{gap:+.1f}%")
        lines.append(
            f"{row.device:<8} {row.kind:<8} {mib(row.predicted_bytes):>13} "
            f"{mib(row.actual_bytes):>13} {gap_text:>8}"
        )
    lines.append("")
    lines.append(
        f"host total predicted {report.predicted_host_bytes / MIB:.0f} MiB (incl. runtime "
        f"overhead); peak RSS {report.peak_rss_bytes / MIB:.0f} MiB (weights are mmap'd: RSS "
        "counts the pages touched)"
    )
    for name, used in report.gpu_used_bytes.items():
        predicted = report.predicted_gpu_bytes.get(name, 0)
        lines.append(
            f"{name} NVML used by this process {used / MIB:.0f} MiB, "
            f"predicted {predicted / MIB:.0f} MiB"
        )
    lines.append(
        f"load {report.load_s:.2f} s; decode {report.decode_tok_s:.1f} tok/s measured over "
        f"{report.generated_tokens} tokens, {report.predicted_decode_tok_s:.1f} predicted"
    )
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)
