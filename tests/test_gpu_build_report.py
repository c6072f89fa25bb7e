"""What GPU build llama.cpp has (doctor) and where a model's layers went (the serve log).

Faked where this GPU-less machine cannot show it: a CUDA build's system info, llama.cpp's load
log of an offloaded model, a plan for named cards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from localllm import loading
from localllm.doctor import doctor_report, format_doctor
from localllm.engine import build, logs
from localllm.engine.build import BackendDevice, BuildInfo, RepackProbe
from localllm.fitter import FitRequest, fit
from localllm.hardware import GPUInfo, GPUProbe, Hardware, HostInfo, parse_gpu_names
from localllm.settings import Settings, load_settings
from localllm.units import GIB
from tests.gguf_factory import LLAMA_7B, scaled, write_gguf

CPU_DEVICE = BackendDevice("CPU", "AMD EPYC", "cpu", 24 * GIB, 24 * GIB)
CUDA0 = BackendDevice("CUDA0", "NVIDIA GeForce RTX 4090", "gpu", 24 * GIB, 23 * GIB)
CUDA1 = BackendDevice("CUDA1", "NVIDIA GeForce RTX 3090", "gpu", 24 * GIB, 23 * GIB)
# llama_print_system_info of a CUDA build: ggml-cuda's features, ARCHS from __CUDA_ARCH_LIST__.
CUDA_INFO = "CUDA : ARCHS = 860,890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | CPU : AVX2 = 1"
CUDA_BUILD = BuildInfo("0.3.36", True, ("CUDA", "CPU"), (CUDA0, CUDA1, CPU_DEVICE), CUDA_INFO)
HOST = HostInfo(32 * GIB, 28 * GIB, 8, 16, 20e9, 400e9, "probe")
TWO_GPUS = GPUProbe((
    GPUInfo("NVIDIA GeForce RTX 4090", 24 * GIB, 23 * GIB, 1008e9, 110e12, "580.65"),
    GPUInfo("NVIDIA GeForce RTX 3090", 24 * GIB, 23 * GIB, 936e9, 71e12, "580.65"),
))  # fmt: skip
TINY = scaled(LLAMA_7B, n_layer=4, n_embd=512, n_head=8, n_head_kv=8, n_ff=1024, n_vocab=2048)


def test_the_cuda_build_and_its_architectures() -> None:
    assert CUDA_BUILD.cuda and CUDA_BUILD.cuda_architectures == ("86", "89")
    assert build.describe_cuda_build(CUDA_BUILD, None) == "CUDA build: yes, for sm_86, sm_89"
    # Built with CUDA, no card answering (no driver loaded): said, not called CPU-only.
    no_card = BuildInfo("0.3.36", False, ("CUDA", "CPU"), (CPU_DEVICE,), "CUDA : ARCHS = 900")
    assert build.describe_cuda_build(no_card, None) == (
        "CUDA build: yes, for sm_90 (no CUDA device answers: is the NVIDIA driver loaded?)"
    )
    # A CUDA build that cannot even be imported (libcuda.so.1 missing): its library says so.
    broken = BuildInfo(None, False, error="llama_cpp cannot be imported: libcuda.so.1")
    assert build.describe_cuda_build(broken, Path("/v/llama_cpp/lib/libggml-cuda.so")) == (
        "CUDA build: yes (but it cannot load here: see above)"
    )


def test_this_machine_has_the_cpu_build() -> None:
    info = build.probe_build()
    assert not info.cuda and build.cuda_library() is None
    assert build.describe_cuda_build(info, None).startswith("CUDA build: no")


def test_doctor_shows_the_gpu_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("localllm.settings.USER_CONFIG", tmp_path / "none.toml")
    monkeypatch.setattr("localllm.settings.SYSTEM_CONFIG", tmp_path / "none.toml")
    settings = load_settings(None, models_dir=tmp_path)
    report = doctor_report(
        settings, None, (), build=CUDA_BUILD, gpus=TWO_GPUS, host=HOST,
        repack=RepackProbe(True, "cache", "decoded 4 tokens"), venv=tmp_path, rpc_hosts=(),
    )  # fmt: skip
    text = format_doctor(report)
    assert "  CUDA build: yes, for sm_86, sm_89\n" in text
    data = json.loads(json.dumps(report.to_dict(), default=str))
    assert data["cuda_build"] == {"built": True, "architectures": ["86", "89"]}


def test_the_load_log_line_says_what_llama_cpp_placed() -> None:
    load_log = [
        "load_tensors: offloading 32 repeating layers to GPU",
        "load_tensors: offloaded 33/33 layers to GPU",
        "load_tensors:        CUDA0 model buffer size =  2301.50 MiB",
        "load_tensors:        CUDA1 model buffer size =  1900.00 MiB",
        "load_tensors:   CPU_Mapped model buffer size =    70.31 MiB",
        "llama_kv_cache:        CUDA0 KV buffer size =   256.00 MiB",
    ]
    assert logs.placement(load_log) == (
        "offloaded 33/33 layers to GPU; "
        "weights: CUDA0 2301.50 MiB, CUDA1 1900.00 MiB, CPU_Mapped 70.31 MiB"
    )
    # A CPU build says nothing about offloading: the weights' buffers alone.
    assert logs.placement(["load_tensors:   CPU_Mapped model buffer size =   235.16 MiB"]) == (
        "weights: CPU_Mapped 235.16 MiB"
    )


def test_the_plan_names_the_layers_on_each_gpu(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "big.gguf", scaled(LLAMA_7B, n_layer=48))
    hardware = Hardware(parse_gpu_names("rtx4090,rtx3090"), HOST, 16)
    plan = fit(model, hardware, FitRequest())
    line = loading.layer_placement(plan)
    counts = {d.name: d.n_layers for d in plan.devices}
    assert line == (
        f"CUDA0 (NVIDIA GeForce RTX 4090) {counts['CUDA0']}, "
        f"CUDA1 (NVIDIA GeForce RTX 3090) {counts['CUDA1']}, host {counts['host']} of 48"
    )
    assert counts["CUDA0"] > 0 and counts["CUDA1"] > 0 and sum(counts.values()) == 48


def test_serving_logs_the_layers_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loading, "repack_supported", lambda: RepackProbe(False, "cache", "x"))
    model = write_gguf(tmp_path / "tiny.gguf", TINY)
    with caplog.at_level(logging.INFO, logger="localllm.loading"):
        loading.plan_engine_config(model, Settings(cpu_only=True))
    assert "repeating layers: host 4 of 4" in caplog.messages
