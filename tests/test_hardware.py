"""Hardware: the card table, size parsing, overrides, NVML absence, the cached host probe."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from localllm import hardware
from localllm.errors import SettingsError
from localllm.hardware import (
    CONSUMER_GPUS,
    GIB,
    TYPICAL_HOST,
    detect_gpus,
    hardware_for,
    lookup_gpu,
    parse_gpu_names,
    parse_size,
    parse_vram,
    probe_host,
)


def test_parse_vram_and_sizes() -> None:
    assert parse_vram("24GiB,24GiB") == (24 * GIB, 24 * GIB)
    assert parse_vram("16") == (16 * GIB,)
    assert parse_size("24576MiB") == 24 * GIB
    assert parse_size("24 GB") == 24 * 1000**3
    with pytest.raises(SettingsError):
        parse_vram("lots")
    with pytest.raises(SettingsError):
        parse_vram("")


def test_card_table_lookup() -> None:
    assert lookup_gpu("rtx4090") is CONSUMER_GPUS["rtx4090"]
    assert lookup_gpu("NVIDIA GeForce RTX 3090") is CONSUMER_GPUS["rtx3090"]
    assert lookup_gpu("4090") is CONSUMER_GPUS["rtx4090"]
    assert CONSUMER_GPUS["rtx3090"].bandwidth_bytes_s == 936e9
    assert CONSUMER_GPUS["rtx5090"].vram_bytes == 32 * GIB
    two = parse_gpu_names("2xrtx3090")
    assert [g.index for g in two] == [0, 1]
    with pytest.raises(SettingsError, match="known cards"):
        parse_gpu_names("voodoo2")


def test_no_nvml_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("pynvml")

    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert detect_gpus() == ()


def test_nvml_bandwidth_from_clock_and_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    class Memory:
        total, free = 24 * GIB, 20 * GIB

    fake: Any = types.ModuleType("pynvml")
    fake.NVML_CLOCK_MEM = 2
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None
    fake.nvmlSystemGetDriverVersion = lambda: b"570.86"
    fake.nvmlDeviceGetCount = lambda: 1
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetName = lambda h: "NVIDIA GeForce RTX 3090"
    fake.nvmlDeviceGetMemoryInfo = lambda h: Memory()
    fake.nvmlDeviceGetMaxClockInfo = lambda h, kind: 9751
    fake.nvmlDeviceGetMemoryBusWidth = lambda h: 384
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    (gpu,) = detect_gpus()
    assert gpu.free_bytes == 20 * GIB and gpu.driver == "570.86"
    assert gpu.bandwidth_bytes_s == pytest.approx(936e9, rel=0.001)


def test_hardware_for_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "detect_gpus", lambda: ())

    class S:
        gpu: str | None = None
        vram: str | None = None
        threads: int | None = 4

    hw = hardware_for(S(), host=TYPICAL_HOST)
    # nothing detected, nothing named: the CPU alone, and the note says how to plan for a card
    assert hw.gpus == () and not hw.assumed and hw.threads == 4
    assert any("planning for the CPU alone" in n and "--gpu" in n for n in hw.notes)
    S.gpu = "rtx4090"
    named = hardware_for(S(), host=TYPICAL_HOST)
    assert named.gpus[0].name.endswith("RTX 4090") and named.assumed
    S.vram = "16GiB,8GiB"
    hw = hardware_for(S(), host=TYPICAL_HOST)
    assert [g.free_bytes for g in hw.gpus] == [16 * GIB, 8 * GIB]
    assert hw.gpus[1].bandwidth_bytes_s == CONSUMER_GPUS["rtx4090"].bandwidth_bytes_s


def test_probe_host_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    monkeypatch.setattr(hardware, "measure_memory_bandwidth", lambda: calls.append("bw") or 2e10)
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda: calls.append("mm") or 8e10)
    cache = tmp_path / "probe.json"
    first = probe_host(cache_path=cache)
    assert first.source == "probe" and first.memory_bandwidth_bytes_s == 2e10
    assert first.ram_total_bytes > 0 and first.logical_cores >= first.physical_cores >= 1
    second = probe_host(cache_path=cache)
    assert second.source == "cache" and second.matmul_flops == 8e10
    assert calls == ["bw", "mm"]
    assert json.loads(cache.read_text())["bandwidth"] == 2e10
    assert probe_host(cache_path=cache, refresh=True).source == "probe"
