"""The repack probe runs only where an engine is about to load; planning never starts it.

A child process decides whether repacked CPU weights run here (some VMs advertise AMX and then
kill the process with SIGILL). Planning commands (`fit`, `pull`'s choice, an argument error)
must not pay for that child, nor print its answer: they take the cached answer, else
llama.cpp's default for this CPU. The answer is reported at INFO in the serve log and doctor.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localllm.cli import main as cli_main
from localllm.engine import build
from localllm.errors import LocalLLMError
from localllm.loading import plan_for_serving
from localllm.settings import Settings
from tests.gguf_factory import LLAMA_7B, scaled, write_gguf

TINY = scaled(LLAMA_7B, n_layer=4, n_embd=512, n_head=8, n_head_kv=8, n_ff=1024, n_vocab=2048)
# The child dies the way a CPU whose repack kernels crash kills it.
SEGFAULTING_CHILD = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A first run: no cached probe answer."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "localllm" / "repack_probe.json"


@pytest.fixture(autouse=True)
def cli_logging() -> Iterator[None]:
    """The CLI points the root logger at this test's stderr: put it back afterwards."""
    root, repack = logging.getLogger(), logging.getLogger(build.REPACK_LOGGER)
    saved = root.handlers[:], root.level, repack.level
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    repack.setLevel(saved[2])


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every repack probe started, its child faked to die of SIGSEGV."""
    started: list[list[str]] = []
    real_run = subprocess.run

    def run(args: list[str], **kwargs: Any) -> Any:
        started.append(list(args))
        return real_run(args, **kwargs)

    monkeypatch.setattr(build, "_PROBE_CHILD", SEGFAULTING_CHILD)
    monkeypatch.setattr(build.subprocess, "run", run)
    return started


def test_fit_of_a_missing_file_prints_one_line_and_starts_no_probe(
    fresh_cache: Path, children: list[list[str]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["fit", "missing.gguf"]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0, err
    assert "missing.gguf" in err and "repack" not in err
    assert children == []
    assert not fresh_cache.parent.exists()  # nor was the host probed for an argument error


def test_a_command_that_only_plans_starts_no_probe(
    fresh_cache: Path, children: list[list[str]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = write_gguf(tmp_path / "tiny.gguf", TINY)
    assert cli_main(["fit", str(model), "--cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "repack" not in err and children == []
    # Planned with llama.cpp's default for this CPU, which the plan's host weights follow.
    assert json.loads(out)["n_gpu_layers"] == 0


def test_planning_takes_the_cached_answer_else_the_default(
    fresh_cache: Path, children: list[list[str]],
) -> None:
    default = build.repack_planned()
    assert default.source == "default" and "not probed yet" in default.detail
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text(json.dumps({
        "version": build._REPACK_PROBE_VERSION, "key": build._probe_key(),
        "supported": False, "detail": "killed by SIGILL",
    }))  # fmt: skip
    assert build.repack_planned() == build.RepackProbe(False, "cache", "killed by SIGILL")
    assert children == []


def test_serving_probes_once_and_reports_at_info(
    fresh_cache: Path, children: list[list[str]], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(cpu_only=True)
    with pytest.raises(LocalLLMError):  # a missing file fails before the probe
        plan_for_serving(tmp_path / "missing.gguf", settings)
    assert children == []
    model = write_gguf(tmp_path / "tiny.gguf", TINY)
    with caplog.at_level(logging.INFO):
        plan, config, _ = plan_for_serving(model, settings)
        again = plan_for_serving(model, settings)[1]
    assert len(children) == 1  # then the cached answer
    assert config.use_extra_bufts is False and again.use_extra_bufts is False
    (record,) = [r for r in caplog.records if "repacked CPU weights" in r.getMessage()][:1]
    assert record.levelno == logging.INFO and record.name == build.REPACK_LOGGER
    assert "repacked CPU weights: off (killed by SIGSEGV; probe)" in record.getMessage()
    assert not any(r.levelno >= logging.WARNING and "repack" in r.getMessage()
                   for r in caplog.records)
