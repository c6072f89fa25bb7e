"""doctor: the real probes on this (CPU-only, GPU-less) machine, and the advice for others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localllm.doctor import Advice, ModelCheck, advise, doctor_report, format_doctor
from localllm.engine import build
from localllm.engine.build import BackendDevice, BuildInfo, RepackProbe
from localllm.hardware import GPUInfo, GPUProbe, HostInfo, probe_gpus
from localllm.settings import load_settings
from localllm.units import GIB as GiB

CPU_DEVICE = BackendDevice("CPU", "Intel(R) Xeon(R)", "cpu", 24 * GiB, 24 * GiB)
CUDA_DEVICE = BackendDevice("CUDA0", "NVIDIA GeForce RTX 4090", "gpu", 24 * GiB, 23 * GiB)
CPU_BUILD = BuildInfo("0.3.36", False, ("CPU",), (CPU_DEVICE,), "CPU : AVX2 = 1")
CUDA_BUILD = BuildInfo("0.3.36", True, ("CUDA", "CPU"), (CUDA_DEVICE, CPU_DEVICE), "CUDA : ...")
RTX_4090 = GPUInfo("NVIDIA GeForce RTX 4090", 24 * GiB, 23 * GiB, 1008e9, 110e12, "570.86")
NO_GPU = GPUProbe((), "no NVIDIA driver (libnvidia-ml.so not found)")
ONE_GPU = GPUProbe((RTX_4090,))
HOST = HostInfo(32 * GiB, 28 * GiB, 8, 16, 20e9, 400e9, "probe")
REPACK_OFF = RepackProbe(False, "cache", "killed by SIGILL")
FIXED_PROBES = {"build": CPU_BUILD, "gpus": NO_GPU, "host": HOST, "repack": REPACK_OFF}
MODEL = ModelCheck("embedded Gemma 3 270M Q4_K_M", "/m/gemma.gguf", True, 253 * 2**20, "n/a")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(__import__("os").environ):
        if name.startswith("LOCALLLM_"):
            monkeypatch.delenv(name)
    # No /etc/localllm or ~/.config/localllm config of the machine running the tests.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr("localllm.settings.USER_CONFIG", tmp_path / "home" / "none.toml")
    monkeypatch.setattr("localllm.settings.SYSTEM_CONFIG", tmp_path / "etc" / "none.toml")
    return monkeypatch


def levels(advice: tuple[Advice, ...]) -> list[str]:
    return [a.level for a in advice]


# --- This machine -------------------------------------------------------------------------------


def test_report_on_this_machine_says_cpu_only(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("llama_cpp")
    gpus = probe_gpus()
    if gpus.gpus:
        pytest.skip("this machine has an NVIDIA GPU; the CPU-only assertions do not apply")
    models = tmp_path / "models"
    settings = load_settings(None, models_dir=models)
    report = doctor_report(settings, None, {"models_dir": models})

    import llama_cpp

    assert report.build.llama_cpp_version == llama_cpp.__version__
    if report.build.gpu_offload:
        pytest.skip("llama-cpp-python here is a GPU build")
    assert report.build.error is None
    assert "CPU" in report.build.backends
    assert [d.kind for d in report.build.devices] == ["cpu"]
    assert report.build.devices[0].total_bytes > 0
    assert report.build.system_info.startswith("CPU :")
    assert report.gpus.error  # why there is none, e.g. no libnvidia-ml.so
    assert report.host is not None and report.host.ram_total_bytes > 0
    assert report.host.physical_cores >= 1 and report.host.memory_bandwidth_bytes_s > 0
    # the repack probe ran (or answered from its cache) and is reported either way
    assert report.repack is not None and report.repack.source in ("probe", "cache")

    assert report.ok
    (cpu_only,) = [a for a in report.advice if a.message.startswith("CPU-only mode")]
    assert cpu_only.level == "info"
    assert "tokens/s" in cpu_only.message

    # The default model is the embedded instruct one; doctor reports it without writing it.
    assert report.model.name == "embedded SmolLM2-135M-Instruct Q4_1"
    assert report.model.present is False
    assert report.model.fit == "not checked: the model file is not there yet"
    assert not models.exists()

    text = format_doctor(report)
    assert "GPU offload: no (CPU-only build)" in text
    assert "NVIDIA GPUs\n  none: " in text
    assert "[info] CPU-only mode" in text
    assert "repacked CPU weights: " + ("on" if report.repack.supported else "off") in text
    assert "models_dir" in text and "(flag)" in text

    data = json.loads(json.dumps(report.to_dict()))
    assert set(data) == {
        "build",
        "gpus",
        "host",
        "config_path",
        "settings",
        "model",
        "advice",
        "ok",
        "repack",
        "host_error",
        "rpc_hosts",
        "cuda_library",
        "cuda_build",
    }
    assert data["cuda_build"] == {"built": False, "architectures": []}
    assert "CUDA build: no (llama.cpp was built for the CPU only)" in format_doctor(report)
    assert data["build"]["gpu_offload"] is False
    assert data["build"]["devices"][0]["kind"] == "cpu"
    assert data["gpus"]["gpus"] == []
    assert data["ok"] is True
    assert {s["name"]: s["source"] for s in data["settings"]}["models_dir"] == "flag"


def test_nvml_without_driver_is_reported_not_raised() -> None:
    probe = probe_gpus()
    if probe.gpus:
        pytest.skip("this machine has an NVIDIA driver")
    assert probe.error


# --- Where values came from, and secrets ---------------------------------------------------------


def test_settings_sources_and_hidden_keys(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'port = 9000\nmodels_dir = "{tmp_path / "models"}"\n'
        'api_keys = ["sk-secret-1", "sk-secret-2"]\n'
    )
    clean_env.setenv("LOCALLLM_HOST", "127.0.0.2")
    flags = {"n_ctx": 4096, "threads": None}
    settings = load_settings(config, **flags)
    report = doctor_report(settings, config, flags, **FIXED_PROBES)
    shown = {s.name: (s.value, s.source) for s in report.settings}
    assert shown["port"] == (9000, "config")
    assert shown["n_ctx"] == (4096, "flag")
    assert shown["threads"] == (None, "default")
    assert shown["api_keys"] == ("2 key(s), hidden", "config")
    assert shown["host"] == ("127.0.0.2", "env")
    assert report.config_path == str(config)
    dumped = json.dumps(report.to_dict()) + format_doctor(report)
    assert "sk-secret" not in dumped


def test_missing_named_model_is_an_error(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    settings = load_settings(None, models_dir=tmp_path / "models", model="nope")
    report = doctor_report(settings, None, (), **FIXED_PROBES)
    assert report.model.error and "nope" in report.model.error
    assert not report.ok
    assert any(a.level == "error" and "nope" in a.message for a in report.advice)


def test_fit_is_the_plan_serve_would_use_here(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.gguf_factory import LLAMA_7B, write_gguf

    if build.gpu_offload():
        pytest.skip("llama-cpp-python here is a GPU build")
    model = write_gguf(tmp_path / "llama-7b.gguf", LLAMA_7B)
    settings = load_settings(None, models_dir=tmp_path, model=str(model), n_ctx=4096)
    report = doctor_report(settings, None, (), **FIXED_PROBES)
    assert report.model.fit_ok is True
    # a CPU-only build: the CPU plan, not a hypothetical GPU, and the slow-speed warning
    assert report.model.fit.startswith("Q4_K_M: 0/33 layers on GPU, 4096 tokens per conversation")
    assert "below the 10 tok/s floor" in report.model.fit


# --- Advice for machines this one is not --------------------------------------------------------


def test_cpu_build_with_nvidia_gpu_gets_the_exact_fix(tmp_path: Path) -> None:
    advice = advise(CPU_BUILD, ONE_GPU, HOST, MODEL, tmp_path, "/opt/x/install-cuda-backend.sh")
    first = advice[0]
    assert first.level == "error"
    assert "CPU-only build" in first.message and "RTX 4090" in first.message
    # tmp_path is writable, so no sudo; not the service venv, so no restart.
    assert first.fix == f"/opt/x/install-cuda-backend.sh --venv {tmp_path}"
    assert not any(a.message.startswith("CPU-only mode") for a in advice)


def test_fix_for_the_service_venv_uses_sudo_and_restarts() -> None:
    if build.SERVICE_VENV.exists():
        pytest.skip("a real service venv exists here")
    fix = build.cuda_fix_command(build.SERVICE_VENV, "/opt/localllm/scripts/x.sh")
    assert fix == (
        "sudo /opt/localllm/scripts/x.sh --venv /opt/localllm/.venv"
        " && sudo systemctl restart localllm"
    )


def test_fix_names_a_script_that_exists(tmp_path: Path) -> None:
    # From a checkout, the fix points at this repository's script.
    fix = build.cuda_fix_command(tmp_path)
    script = Path(fix.split()[0])
    assert script.name == "install-cuda-backend.sh" and script.is_file()


def test_cuda_build_with_gpu_is_ok(tmp_path: Path) -> None:
    advice = advise(CUDA_BUILD, ONE_GPU, HOST, MODEL, tmp_path)
    assert levels(advice) == ["ok"]
    assert "RTX 4090" in advice[0].message


def test_cuda_build_without_gpu_warns(tmp_path: Path) -> None:
    advice = advise(CUDA_BUILD, NO_GPU, HOST, MODEL, tmp_path)
    assert levels(advice) == ["warning"]
    assert "libnvidia-ml.so" in advice[0].message


def test_cuda_build_that_registers_no_gpu_warns(tmp_path: Path) -> None:
    build = BuildInfo("0.3.36", True, ("CUDA", "CPU"), (CPU_DEVICE,), "")
    advice = advise(build, ONE_GPU, HOST, MODEL, tmp_path)
    assert levels(advice) == ["warning"]
    assert "registered no GPU device" in advice[0].message


def test_busy_gpu_is_mentioned(tmp_path: Path) -> None:
    busy = GPUInfo("NVIDIA GeForce RTX 3090", 24 * GiB, 8 * GiB, 936e9, 62e12, "570.86")
    advice = advise(CUDA_BUILD, GPUProbe((busy,)), HOST, MODEL, tmp_path)
    assert levels(advice) == ["ok", "info"]
    assert "16.0 GiB of 24.0 GiB already in use" in advice[1].message


def test_cpu_only_speed_from_measured_bandwidth(tmp_path: Path) -> None:
    host = HostInfo(32 * GiB, 28 * GiB, 8, 16, 50e9, 400e9, "probe")
    model = ModelCheck("gemma", "/m/g.gguf", True, GiB, "n/a")
    (advice,) = advise(CPU_BUILD, NO_GPU, host, model, tmp_path)
    assert advice.level == "info"
    # 50 GB/s over a 1 GiB model: at most ~47 tokens/s; an 8B Q4_K_M ~10.
    assert "at most about 47 tokens/s for gemma" in advice.message
    assert "about 10 tokens/s" in advice.message


def test_missing_llama_cpp_is_an_error(tmp_path: Path) -> None:
    broken = BuildInfo(None, False, error="llama_cpp cannot be imported: libllama.so: no such file")
    advice = advise(broken, NO_GPU, HOST, MODEL, tmp_path)
    assert levels(advice) == ["error"]
    assert advice[0].fix and "pip install --force-reinstall" in advice[0].fix


def test_does_not_fit_is_an_error(tmp_path: Path) -> None:
    model = ModelCheck("llama-70b", "/m/70b.gguf", True, 40 * GiB, "needs 41 GiB", fit_ok=False)
    advice = advise(CUDA_BUILD, ONE_GPU, HOST, model, tmp_path)
    assert levels(advice) == ["ok", "error"]


def test_format_shows_fix_lines(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = load_settings(None, models_dir=tmp_path)
    report = doctor_report(
        settings, None, (), build=CPU_BUILD, gpus=ONE_GPU, host=HOST, repack=REPACK_OFF,
        venv=tmp_path,
    )
    text = format_doctor(report)
    assert (
        "  0: NVIDIA GeForce RTX 4090, 24.0 GiB (23.0 GiB free), 1008 GB/s, driver 570.86" in text
    )
    assert "[error] llama.cpp here is a CPU-only build" in text
    assert "      fix: " in text and f"--venv {tmp_path}" in text
    assert "repacked CPU weights: off (killed by SIGILL; cache)" in text
    assert not report.ok


def test_cuda_build_without_a_device_is_not_called_cpu_only(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = load_settings(None, models_dir=tmp_path)
    no_device = BuildInfo("0.3.36", False, ("CUDA", "CPU"), (CPU_DEVICE,), "CUDA : ARCHS = 900")
    probes = {**FIXED_PROBES, "build": no_device}
    text = format_doctor(doctor_report(settings, None, (), **probes))  # type: ignore[arg-type]
    assert "GPU offload: no: a CUDA build that found no device" in text
    assert "CPU-only build" not in text.split("NVIDIA GPUs")[0]
