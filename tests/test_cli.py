"""The command line as a user runs it: a real process, its exit code and what it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.gguf_factory import LLAMA_7B, write_gguf


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args], capture_output=True, text=True, timeout=60
    )


def test_inspect_json(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "llama.gguf", LLAMA_7B)
    result = run_cli("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["architecture"] == "llama"
    assert summary["n_layer"] == 32
    assert summary["n_head_kv"] == 32
    assert summary["file_type"] == "Q4_K_M"


def test_inspect_text(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "llama.gguf", LLAMA_7B)
    result = run_cli("inspect", str(path))
    assert result.returncode == 0
    assert "llama" in result.stdout and "Q4_K_M" in result.stdout


def test_inspect_hostile_file_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**60).to_bytes(8, "little") * 2)
    result = run_cli("inspect", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0] and "Traceback" not in result.stderr


def test_unknown_model_name(tmp_path: Path) -> None:
    result = run_cli("inspect", "no-such-model", "--models-dir", str(tmp_path))
    assert result.returncode == 2
    assert "no model 'no-such-model'" in result.stderr


def test_bad_setting_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("port = 80\nnot_a_setting = 1\n")
    result = run_cli("inspect", "--config", str(config))
    assert result.returncode == 2
    assert "not_a_setting" in result.stderr
