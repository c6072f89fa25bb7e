"""The command line as a user runs it: a real process, its exit code and what it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.gguf_factory import LLAMA_7B, write_gguf
from tests.terminal import Terminal


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without LOCALLLM_* settings (a developer's own would leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LOCALLLM_")}
    return {**env, **extra}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(**(env or {})),
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The failure is exactly one stderr line with every needle, exit `code`, nothing on stdout
    (where no JSON was asked for), and no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


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
    assert result.stdout == ""
    one_line_error(result, 1, str(bad))


def test_unknown_model_name(tmp_path: Path) -> None:
    result = run_cli("inspect", "no-such-model", "--models-dir", str(tmp_path))
    one_line_error(result, 1, "no model 'no-such-model'")
    missing = run_cli("inspect", str(tmp_path / "gone.gguf"))
    one_line_error(missing, 1, "no such file", "gone.gguf")


def test_bad_setting_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("port = 80\nnot_a_setting = 1\n")
    result = run_cli("inspect", "--config", str(config))
    one_line_error(result, 2, "unknown setting 'not_a_setting'", str(config))


def run_cli_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env)


LADDER = ("Q2_K", "Q4_K_M", "Q8_0")


def _ladder(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for quant in LADDER:
        write_gguf(folder / f"llama-7b.{quant}.gguf", LLAMA_7B, quant=quant)
    return folder


def test_fit_folder_json(tmp_path: Path) -> None:
    folder = _ladder(tmp_path / "ladder")
    result = run_cli(
        "fit", str(folder), "--json", "--vram", "8GiB", "--ctx", "4096", "--parallel", "1"
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for key in (
        "file",
        "quant",
        "n_gpu_layers",
        "n_ctx",
        "n_parallel",
        "type_k",
        "type_v",
        "flash_attn",
        "swa_full",
        "devices",
        "decode_tok_s",
        "prompt_tok_s",
        "warnings",
        "rejected",
        "llama_params",
        "llama_server_command",
    ):
        assert key in plan, key
    assert plan["quant"] == "Q4_K_M"  # Q8_0 would need the CPU on an 8 GiB card
    rejected = {entry["quant"] for entry in plan["rejected"].values()}
    assert {"Q8_0", "Q2_K"} <= rejected and all(k.endswith(".gguf") for k in plan["rejected"])
    assert plan["n_ctx"] == 4096 and plan["n_parallel"] == 1
    for device in plan["devices"]:
        assert {
            "weights_bytes",
            "kv_bytes",
            "compute_bytes",
            "output_bytes",
            "overhead_bytes",
            "total_bytes",
            "free_bytes",
        } <= set(device)


def test_fit_explicit_layers_and_text(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "llama.gguf", LLAMA_7B)
    result = run_cli("fit", str(path), "--gpu", "rtx3060", "--n-gpu-layers", "10", "--ctx", "4096")
    assert result.returncode == 0, result.stderr
    assert "10/33 layers on the GPU" in result.stdout
    assert "below the 10 tok/s floor" in result.stdout  # the plain warning
    assert "llama-server -m" in result.stdout and "-ngl 10" in result.stdout


def test_fit_does_not_fit_is_one_line(tmp_path: Path) -> None:
    from tests.gguf_factory import LLAMA_70B

    path = write_gguf(tmp_path / "llama70.gguf", LLAMA_70B, quant="F16")
    result = run_cli("fit", str(path), "--vram", "8GiB")
    one_line_error(result, 3, "does not fit", "GiB")
    assert result.stdout == ""
    as_json = run_cli("fit", str(path), "--vram", "8GiB", "--json")
    one_line_error(as_json, 3, "does not fit")
    answer = json.loads(as_json.stdout)
    assert answer["fits"] is False and answer["error"] == "does_not_fit"
    assert answer["needed_bytes"] > answer["available_bytes"] > 8 * 1024**3
    assert answer["advice"].startswith("try a smaller quant")


def test_hub_fit_pull_models_rm(tmp_path: Path, embedded_model_path: Path) -> None:
    from tests.fake_hub import FakeHub, running_hub

    folder = _ladder(tmp_path / "ladder")
    hub = FakeHub()
    for index, quant in enumerate(LADDER):
        hub.add("org/llama-GGUF", folder / f"llama-7b.{quant}.gguf", sha256=f"{index}" * 64)
    hub.add("google/gemma-3-270m-GGUF", embedded_model_path)
    models = tmp_path / "models"
    with running_hub(hub):
        env = {"HF_ENDPOINT": hub.url, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        fitted = run_cli_env(env, "fit", "org/llama-GGUF", "--vram", "8GiB", "--ctx", "4096")
        assert fitted.returncode == 0, fitted.stderr
        assert "nothing downloaded" in fitted.stdout and "Q4_K_M" in fitted.stdout
        assert hub.total_sent() < 0.01 * sum(p.stat().st_size for p in folder.iterdir())
        assert "reading" not in fitted.stderr  # no progress where stderr is not a terminal
        # On a terminal the header reads show progress on stderr.
        term = Terminal(
            [sys.executable, "-m", "localllm", "fit", "org/llama-GGUF", "--vram", "8GiB"],
            clean_env(**env),
        )
        term.read_until("reading the GGUF headers of org/llama-GGUF")
        term.read_until("llama-server equivalent")
        assert term.exit_code() == 0

        pulled = run_cli_env(
            env, "pull", "google/gemma-3-270m-GGUF", "--quiet", "--models-dir", str(models)
        )
        assert pulled.returncode == 0, pulled.stderr
        local = models / embedded_model_path.name
        assert pulled.stdout.strip() == str(local)
        assert local.stat().st_size == embedded_model_path.stat().st_size
        # chat names a hub model as pull does: the pulled file, not a second download
        sent = hub.total_sent()
        chatted = subprocess.run(
            [sys.executable, "-m", "localllm", "chat", "google/gemma-3-270m-GGUF", "--models-dir",
             str(models), "--threads", "1", "-c", "512", "--max-tokens", "4"],
            input="Hello\n", capture_output=True, text=True, timeout=300, env=clean_env(**env),
        )  # fmt: skip
        assert chatted.returncode == 0, chatted.stderr
        assert f"{local.name}: Q4_K_M" in chatted.stderr and chatted.stdout.strip()
        assert hub.total_sent() - sent < 0.01 * local.stat().st_size

        missing = run_cli_env(env, "pull", "org/nope", "--models-dir", str(models))
        one_line_error(missing, 1, "no such repo")

    listed = run_cli("models", "--models-dir", str(models), "--json")
    assert listed.returncode == 0, listed.stderr
    # the pulled file, and the embedded instruct model that is not written there yet
    entries = {entry["name"]: entry for entry in json.loads(listed.stdout)}
    assert set(entries) == {"gemma-3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"}
    entry = entries["gemma-3-270m-q4_k_m"]
    assert entry["quant"] == "Q4_K_M" and "GPU" in entry["fits"]
    removed = run_cli("rm", "gemma-3-270m-q4_k_m", "--models-dir", str(models))
    assert removed.returncode == 0 and not local.exists()
    outside = run_cli("rm", "../ladder/llama-7b.Q2_K.gguf", "--models-dir", str(models))
    one_line_error(outside, 1, "outside the models folder")
    assert (folder / "llama-7b.Q2_K.gguf").exists()
