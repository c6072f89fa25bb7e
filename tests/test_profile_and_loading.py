"""`localllm profile` and the server's loader on this CPU-only machine with the real model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from localllm.engine.build import gpu_offload
from localllm.loading import plan_engine_config
from localllm.profile import allocated_bytes, device_of
from localllm.settings import Settings


def test_buffer_lines_are_attributed_to_devices() -> None:
    log = [
        "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB",
        "load_tensors:        CUDA0 model buffer size =  4096.00 MiB",
        "llama_kv_cache:        CUDA0 KV buffer size =    24.00 MiB",
        "llama_context:  CUDA_Host  output buffer size =     4.00 MiB",
        "sched_reserve:      CUDA0 compute buffer size =   514.50 MiB",
        "sched_reserve:  CUDA_Host compute buffer size =    20.00 MiB",
    ]
    got = allocated_bytes(log)
    mib = 2**20
    assert got[("host", "weights")] == round(235.16 * mib)
    assert got[("CUDA0", "weights")] == 4096 * mib
    assert got[("CUDA0", "kv")] == 24 * mib
    assert got[("host", "output")] == 4 * mib
    assert got[("CUDA0", "compute")] == round(514.5 * mib)
    assert got[("host", "compute")] == 20 * mib
    assert device_of("CUDA1") == "CUDA1" and device_of("CPU_REPACK") == "host"


def test_cpu_only_build_plans_for_the_cpu_and_says_so_loudly(embedded_model_path: Path) -> None:
    assert not gpu_offload()  # this machine's llama.cpp is a CPU build
    settings = Settings(n_gpu_layers=10, n_ctx=1024, parallel=2, threads=1)
    config, summary, warnings = plan_engine_config(embedded_model_path, settings)
    assert config.n_gpu_layers == 0
    assert config.n_ctx == 2048 and config.n_parallel == 2 and config.n_ctx_slot == 1024
    assert summary["source"] == "fit" and summary["gpu_build"] is False
    assert any("n_gpu_layers=10 asked for" in w and "no GPU backend" in w for w in warnings)


def test_profile_command_matches_llama_cpp(embedded_model_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "localllm",
            "profile",
            str(embedded_model_path),
            "--json",
            "--n-ctx",
            "4096",
            "--parallel",
            "2",
            "--threads",
            "1",
            "--tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {(r["device"], r["kind"]): r for r in report["rows"]}
    for kind, tolerance in (("weights", 1), ("kv", 1), ("output", 1), ("compute", 10)):
        row = rows[("host", kind)]
        assert row["actual_bytes"] > 0, kind
        assert row["gap_percent"] == pytest.approx(0, abs=tolerance), row
    assert report["peak_rss_bytes"] > rows[("host", "kv")]["actual_bytes"]
    assert report["generated_tokens"] == 8 and report["decode_tok_s"] > 0
