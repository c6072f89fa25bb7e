"""The CLI's surface as a new user meets it: bad input of every kind gives one line naming the
flag or variable at fault (never a traceback), one vocabulary of flags across commands, help
that shows each command's own flags with defaults, tables, and llama.cpp's own dry run."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gguf_factory import LLAMA_7B, write_gguf
from tests.test_cli import clean_env, one_line_error, run_cli

GIB = 1024**3


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("one") / "llama-7b.Q4_K_M.gguf", LLAMA_7B)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ladder")
    for quant in ("Q2_K", "Q4_K_M", "Q8_0"):
        write_gguf(folder / f"llama-7b.{quant}.gguf", LLAMA_7B, quant=quant)
    return folder


# ---------------------------------------------------------------------------------------------
# Bad input: one line, the flag or variable named, exit 2


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--vram", "1.2.3GiB"], ["--vram 1.2.3GiB", "cannot read the size"]),
        (["--vram", "."], ["--vram .", "cannot read the size"]),
        (["--vram=-4GiB"], ["--vram -4GiB", "cannot read the size"]),
        (["--vram", "25769803776"], ["--vram 25769803776", "write 25769803776B (24.0 GiB)"]),
        (["--vram", "1.5TiB"], ["--vram 1.5TiB", "more than any GPU"]),
        (["--gpu", "64xrtx4090"], ["--gpu 64xrtx4090", "at most 16"]),
        (["--gpu", "voodoo5"], ["--gpu voodoo5", "unknown GPU 'voodoo5'", "rtx4090"]),
        (["--gpu", "none"], ["--gpu none", "--cpu"]),
        (["-c", "100"], ["--ctx-size 100", "at least 256 tokens"]),
        (["--ctx", "lots"], ["--ctx", "invalid int value"]),
        (["-ctk", "q5_1"], ["--cache-type-k/-ctk", "invalid choice"]),
        (["-fa", "maybe"], ["--flash-attn/-fa", "expected on, off or auto"]),
        (["--config", "/nonexistent/c.toml"], ["--config", "does not exist"]),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(args: list[str], needles: list[str]) -> None:
    one_line_error(run_cli("fit", *args), 2, *needles)


@pytest.mark.parametrize(
    ("command", "env", "needles"),
    [
        (["models"], {"LOCALLLM_VRAM": "lots"}, ["LOCALLLM_VRAM=lots", "cannot read"]),
        (["doctor"], {"LOCALLLM_GPU": "rtx9999"}, ["LOCALLLM_GPU=rtx9999", "unknown GPU"]),
        (["serve"], {"LOCALLLM_PORT": "http"}, ["LOCALLLM_PORT=http", "integer"]),
    ],
)
def test_bad_env_values_name_the_variable(
    command: list[str], env: dict[str, str], needles: list[str], tmp_path: Path
) -> None:
    # doctor fails exactly where models would: the settings are checked at start, by every command
    result = run_cli(*command, "--models-dir", str(tmp_path), env=env)
    one_line_error(result, 2, *needles)


def test_bad_config_value_names_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('vram = "24 gigs"\n')
    result = run_cli("models", "--config", str(config))
    one_line_error(result, 2, "setting 'vram'", str(config), "cannot read the size")


def test_misspelled_variable_is_reported_by_every_command(llama: Path) -> None:
    result = run_cli("inspect", str(llama), env={"LOCALLLM_NCTX": "4096"})
    assert result.returncode == 0
    assert result.stderr.strip() == (
        "localllm: warning: LOCALLLM_NCTX is not a localllm setting and is ignored "
        "(did you mean LOCALLLM_N_CTX?)"
    )
    doctor = run_cli("doctor", "--json", env={"LOCALLLM_NCTX": "4096"})
    advice = json.loads(doctor.stdout)["advice"]
    [entry] = [a for a in advice if "LOCALLLM_NCTX" in a["message"]]
    assert entry["level"] == "warning" and entry["fix"] == "rename it to LOCALLLM_N_CTX"


def test_missing_files_and_bad_numbers_elsewhere(llama: Path, tmp_path: Path) -> None:
    one_line_error(run_cli("eval", str(llama), "--text", str(tmp_path / "no.txt")), 1,
                   "--text", "No such file")
    one_line_error(run_cli("bench", "--concurrency", "1,x"), 2, "--concurrency", "'x'")
    one_line_error(run_cli("bench", "--time-limit", "0"), 2, "--time-limit", "above 0")
    one_line_error(run_cli("profile", "--tokens", "-3"), 2, "--tokens")
    one_line_error(run_cli("fitt"), 2, "invalid choice: 'fitt'")


def test_closed_pipe_is_quiet(llama: Path) -> None:
    # `localllm inspect --json | head -0`: the reader is gone before the first write.
    proc = subprocess.Popen(
        [sys.executable, "-m", "localllm", "inspect", str(llama), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read().decode()
    assert stderr == "" and code == 1


def test_ctrl_c_is_quiet(tmp_path: Path) -> None:
    # A server that accepts and never answers: bench waits until Ctrl-C.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "localllm", "bench", url, "--concurrency", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        listener.settimeout(240)  # a loaded machine starts Python slowly
        connection, _ = listener.accept()
        # Bench is waiting for an answer once its whole request has arrived (a Ctrl-C while it
        # still connects meets other code): wait for that, not for a time.
        connection.settimeout(240)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = connection.recv(4096)
            assert chunk, f"bench closed the connection: {request!r}"
            request += chunk
        # One Ctrl-C should do; a person whose first press went unheard presses again.
        for _ in range(5):
            proc.send_signal(signal.SIGINT)
            try:
                _, stderr = proc.communicate(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            proc.kill()
            raise AssertionError("bench ignored five Ctrl-Cs")
        connection.close()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


# ---------------------------------------------------------------------------------------------
# Hardware named as people write it


def test_gpu_count_after_the_name_means_that_many_cards(llama: Path) -> None:
    for spelling in ("rtx4090x2", "2xrtx4090", "rtx4090,rtx4090"):
        result = run_cli("fit", str(llama), "--gpu", spelling, "--json")
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        assert [d["name"] for d in plan["devices"]] == ["CUDA0", "CUDA1", "host"], spelling
        assert plan["hardware"]["assumed"] is True  # named, not detected: labelled as such


def test_unusual_hardware_warns_and_plans(llama: Path) -> None:
    many = run_cli("fit", str(llama), "--gpu", "8xrtx4090", "--json")
    assert many.returncode == 0
    assert many.stderr.strip() == (
        "localllm: warning: --gpu 8xrtx4090 plans for 8 cards; a desktop holds 4 at most"
    )
    from_env = run_cli("fit", str(llama), "--json", env={"LOCALLLM_GPU": "8xrtx4090"})
    assert from_env.returncode == 0 and from_env.stderr.startswith(
        "localllm: warning: LOCALLLM_GPU 8xrtx4090 plans for 8 cards"
    )
    huge = run_cli("fit", str(llama), "--vram", "96GiB", "--json")
    assert huge.returncode == 0 and "more than any consumer GPU" in huge.stderr
    tiny = run_cli("fit", str(llama), "--vram", "0.5", "--cpu", "--json")
    assert tiny.returncode == 0 and "--vram 0.5 is only 512 MiB; is a unit missing" in tiny.stderr


def test_gb_versus_gib_is_explained_when_it_changes_the_choice(ladder: Path) -> None:
    common = ["fit", str(ladder), "-c", "4096", "-np", "1", "--json"]
    decimal = run_cli(*common, "--vram", "10GB")
    binary = run_cli(*common, "--vram", "10GiB")
    assert decimal.returncode == binary.returncode == 0, decimal.stderr + binary.stderr
    chosen_gb = json.loads(decimal.stdout)["quant"]
    chosen_gib = json.loads(binary.stdout)["quant"]
    assert chosen_gb != chosen_gib  # 10 GB is 9.3 GiB: one quant less
    assert f"with --vram 10GiB the choice would be {chosen_gib}" in decimal.stderr
    assert "GB = 10^9 bytes" in decimal.stderr
    assert binary.stderr == ""  # nothing to explain
    same = run_cli(*common, "--vram", "24GB")  # the choice does not change: no note
    assert same.returncode == 0 and same.stderr == ""


def test_cpu_plans_for_the_cpu_alone(llama: Path) -> None:
    for flags in (["--cpu"], ["--vram", "0"]):
        result = run_cli("fit", str(llama), *flags, "-c", "4096", "--json")
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        assert plan["n_gpu_layers"] == 0
        assert [d["name"] for d in plan["devices"]] == ["host"]


# ---------------------------------------------------------------------------------------------
# One vocabulary, help, version


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["-c", "4096"], {"n_ctx_slot": 4096}),
        (["--ctx-size", "4096"], {"n_ctx_slot": 4096}),
        (["--ctx", "4096"], {"n_ctx_slot": 4096}),
        (["--n-ctx", "4096"], {"n_ctx_slot": 4096}),
        (["-np", "2", "-c", "4096"], {"n_parallel": 2}),
        (["--cache-type", "q8_0"], {"type_k": "q8_0", "type_v": "q8_0"}),
        (["-ctk", "q8_0"], {"type_k": "q8_0", "type_v": "f16"}),
        (["--type-v", "q4_0", "-fa", "on"], {"type_v": "q4_0", "flash_attn": True}),
        (["-ub", "256"], {"n_ubatch": 256}),
        (["--ubatch", "256"], {"n_ubatch": 256}),
        (["--n-ubatch", "256"], {"n_ubatch": 256}),
        (["-ngl", "10"], {"n_gpu_layers": 10}),
        (["-fa", "off"], {"flash_attn": False}),
    ],
)
def test_llama_cpp_flag_names_and_the_old_ones(
    llama: Path, flags: list[str], expected: dict[str, object]
) -> None:
    result = run_cli("fit", str(llama), "--gpu", "rtx4090", *flags, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert {key: plan[key] for key in expected} == expected


def test_margin_alias(llama: Path) -> None:
    result = run_cli("fit", str(llama), "--gpu", "rtx4090", "--margin", "2048", "--json")
    assert json.loads(result.stdout)["devices"][0]["margin_bytes"] == 2 * GIB


def test_help_shows_each_commands_own_flags_with_defaults() -> None:
    wide = {"COLUMNS": "300"}  # one line per flag
    fit = run_cli("fit", "--help", env=wide).stdout
    for flag in ("--ctx-size", "-c", "-np", "-ngl", "--cache-type-k", "-ub", "--cpu", "--check"):
        assert flag in fit, flag
    assert "(default: 512)" in fit and "(default: 2048)" in fit
    for other in ("--host", "--api-key", "--n-ctx", "--type-k", "--margin "):
        assert other not in fit, other  # serve's flags, and hidden aliases
    serve = run_cli("serve", "--help", env=wide).stdout
    assert "--host" in serve and "(default: 8080)" in serve and "--alias" in serve
    inspect = run_cli("inspect", "--help", env=wide).stdout
    assert "--ctx-size" not in inspect and "--models-dir" in inspect


def test_version_and_verbose_after_the_command(llama: Path) -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("localllm ")
    verbose = run_cli("inspect", str(llama), "-v")
    assert verbose.returncode == 0 and "llama" in verbose.stdout


# ---------------------------------------------------------------------------------------------
# Tables and the dry run


def test_fit_quant_table(ladder: Path) -> None:
    result = run_cli("fit", str(ladder), "--vram", "8GiB", "-c", "4096", "-np", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "file size" in line)
    for column in ("quant", "GPU layers", "VRAM", "RAM", "tok/s", "verdict"):
        assert column in header
    rows = {line.split()[1] if line.startswith("->") else line.split()[0]: line
            for line in lines[lines.index(header) + 1:] if "GB" in line}
    assert set(rows) == {"Q8_0", "Q4_K_M", "Q2_K"}
    assert rows["Q4_K_M"].startswith("->") and "chosen" in rows["Q4_K_M"]
    assert "33/33" in rows["Q4_K_M"]  # every layer on the 8 GiB card
    as_json = json.loads(run_cli("fit", str(ladder), "--vram", "8GiB", "-c", "4096", "--json")
                         .stdout)
    quants = {row["quant"]: row for row in as_json["quants"]}
    assert quants["Q4_K_M"]["chosen"] and quants["Q4_K_M"]["gpu_bytes"] > 3 * GIB
    assert quants["Q2_K"]["size_bytes"] < quants["Q8_0"]["size_bytes"]


def test_models_table(ladder: Path) -> None:
    result = run_cli("models", "--models-dir", str(ladder), "--vram", "8GiB")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "size", "quant", "context"]
    # the ladder's three files, then the two embedded models (listed, not written there)
    assert len([line for line in lines if line.startswith("llama-7b")]) == 3
    assert all("GiB" in line for line in lines[1:6])
    assert lines[6].startswith("default: smollm2-135m-instruct-q4_1 (the built-in default")


def test_fit_check_runs_llama_cpps_dry_run(embedded_model_path: Path) -> None:
    result = run_cli(
        "fit", str(embedded_model_path), "--cpu", "-c", "1024", "-np", "1", "--check", "--json"
    )
    assert result.returncode == 0, result.stderr
    check = json.loads(result.stdout)["check"]
    rows = {row["buffer"]: row for row in check["rows"]}
    assert {"weights (all tensors)", "KV cache", "compute buffer host"} <= set(rows)
    for name in ("KV cache", "compute buffer host"):
        assert rows[name]["llama_cpp_bytes"] > 0
        assert abs(rows[name]["gap_percent"]) < 10, rows[name]
    text = run_cli("fit", str(embedded_model_path), "--cpu", "-c", "1024", "-np", "1", "--check")
    assert "llama.cpp's own dry run" in text.stdout and "KV cache" in text.stdout
