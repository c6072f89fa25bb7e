"""`./scripts/dev` picks llama.cpp's backend: cpu, or cuda for exactly the cards present.

scripts/backend.py decides from NVML (libnvidia-ml.so.1 through ctypes), the CUDA toolkit and
the opt-out/opt-in variables, before llama-cpp-python is installed. Here the detection is faked
(a Machine built by hand, or a fake libnvidia-ml.so.1 compiled for the test) and the exact
commands that would run are checked; nothing is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "backend.py"
CUDA_SCRIPT = ROOT / "scripts" / "install-cuda-backend.sh"
VERSION = "0.3.36"


def load_backend() -> ModuleType:
    spec = importlib.util.spec_from_file_location("localllm_dev_backend", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


backend = load_backend()
Gpu, Machine = backend.Gpu, backend.Machine
RTX4090 = Gpu("NVIDIA GeForce RTX 4090", "89")
RTX3090 = Gpu("NVIDIA GeForce RTX 3090", "86")
TOOLKIT = "/usr/local/cuda-12.8/bin/nvcc"


def gpu_machine(*gpus: Any, nvcc: str | None = None, driver: tuple[int, int] = (13, 0)) -> Any:
    return Machine(gpus=gpus, driver_cuda=driver, nvcc=nvcc,
                   nvcc_version=(12, 8) if nvcc else None, cores=16)


def planned(machine: Any, env: dict[str, str], venv: Path = Path("/v")) -> list[list[str]]:
    decision = backend.decide(machine, env)
    return list(backend.commands(decision, venv, VERSION, machine))


def test_no_nvidia_driver_keeps_the_cpu_build() -> None:
    machine = Machine(nvml_error="no NVIDIA driver (libnvidia-ml.so.1 not found)")
    decision = backend.decide(machine, {})
    assert (decision.backend, decision.stamp) == ("cpu", "cpu")
    assert planned(machine, {}) == []  # pip's CPU build, as before
    assert "no NVIDIA driver" in backend.describe(decision, machine)


def test_a_card_and_a_toolkit_build_for_that_architecture_only() -> None:
    machine = gpu_machine(RTX4090, nvcc=TOOLKIT)
    assert planned(machine, {}) == [[
        str(CUDA_SCRIPT), "--venv", "/v", "--version", VERSION, "--arch", "89", "--nvcc", TOOLKIT,
    ]]  # fmt: skip
    decision = backend.decide(machine, {})
    said = backend.describe(decision, machine)
    assert "cuda for sm_89" in said and "RTX 4090" in said and "minutes" in said


def test_without_a_toolkit_nvcc_comes_from_nvidias_wheels() -> None:
    machine = gpu_machine(RTX4090, RTX3090, RTX4090)
    assert planned(machine, {}) == [[
        str(CUDA_SCRIPT), "--venv", "/v", "--version", VERSION, "--arch", "86,89",
        "--cuda-wheels", "always", "--cuda-major", "13",
    ]]  # fmt: skip
    decision = backend.decide(machine, {})
    assert decision.stamp == "cuda 86;89"
    assert "NVIDIA's PyPI wheels" in backend.describe(decision, machine)


def test_an_old_driver_without_a_toolkit_stays_on_the_cpu_and_says_why() -> None:
    machine = gpu_machine(RTX3090, driver=(12, 4))
    decision = backend.decide(machine, {})
    assert decision.backend == "cpu"
    assert "CUDA 12.4" in decision.reason and "install the CUDA toolkit 12.x" in decision.reason
    with pytest.raises(SystemExit, match="LOCALLLM_BACKEND=cuda, but the driver runs CUDA 12.4"):
        backend.decide(machine, {"LOCALLLM_BACKEND": "cuda"})
    # With a toolkit the old driver is fine: the toolkit matches it.
    assert backend.decide(gpu_machine(RTX3090, nvcc=TOOLKIT, driver=(12, 4)), {}).archs == ("86",)


def test_opt_out_force_and_wheel_index() -> None:
    machine = gpu_machine(RTX4090, nvcc=TOOLKIT)
    assert backend.decide(machine, {"LOCALLLM_BACKEND": "cpu"}).backend == "cpu"
    # Forced on a machine whose driver is not visible (a build host): the architectures asked
    # for, else the consumer default.
    bare = Machine(nvml_error="no NVIDIA driver", nvcc=TOOLKIT, nvcc_version=(12, 8))
    forced = {"LOCALLLM_BACKEND": "cuda", "LOCALLLM_CUDA_ARCH": "90"}
    assert planned(bare, forced)[0][5:] == ["--arch", "90", "--nvcc", TOOLKIT]
    assert backend.decide(bare, {"LOCALLLM_BACKEND": "cuda"}).archs == ("86", "89", "120")
    index = "https://wheels.example.org/cu124"
    assert planned(machine, {"LOCALLLM_WHEEL_INDEX": index}, Path("/v")) == [[
        "/v/bin/python", "-m", "pip", "install", "--force-reinstall", "--no-deps",
        "--only-binary", "llama-cpp-python", "--index-url", index, f"llama-cpp-python=={VERSION}",
    ]]  # fmt: skip
    with pytest.raises(SystemExit, match="not one of cpu, cuda, auto"):
        backend.decide(machine, {"LOCALLLM_BACKEND": "rocm"})


def test_the_decision_is_stamped_and_a_rerun_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[list[str]] = []

    def run(command: list[str], **_: Any) -> Any:
        ran.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(backend.subprocess, "run", run)
    venv = tmp_path / "venv"
    venv.mkdir()
    machine = gpu_machine(RTX4090)
    assert backend.main(["--venv", str(venv)], env={}, machine=machine) == 0
    assert [c[c.index("--arch") + 1] for c in ran] == ["89"]
    assert json.loads((venv / ".localllm-backend").read_text())["installed"] == "cuda 89"
    assert "about" in capsys.readouterr().err

    def no_probe(env: dict[str, str]) -> Any:
        raise AssertionError("a stamped venv is not probed again")

    monkeypatch.setattr(backend, "probe", no_probe)
    assert backend.main(["--venv", str(venv)], env={}) == 0 and len(ran) == 1
    assert capsys.readouterr().err == ""
    # The opt-out afterwards: back to pip's CPU build of the same version.
    assert backend.main(["--venv", str(venv)], env={"LOCALLLM_BACKEND": "cpu"},
                        machine=machine) == 0
    assert ran[-1] == [str(venv / "bin" / "python"), "-m", "pip", "install", "--force-reinstall",
                       "--no-deps", f"llama-cpp-python=={VERSION}"]
    assert json.loads((venv / ".localllm-backend").read_text())["installed"] == "cpu"


def test_the_set_up_variables_are_not_called_unknown_settings() -> None:
    from localllm.settings import unknown_env_vars

    env = {"LOCALLLM_BACKEND": "cpu", "LOCALLLM_CUDA_ARCH": "89", "LOCALLLM_WHEEL_INDEX": "u"}
    assert unknown_env_vars(env) == []


def test_a_failed_build_is_not_stamped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        backend.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 1)
    )
    assert backend.main(["--venv", str(tmp_path)], env={}, machine=gpu_machine(RTX4090)) == 1
    assert not (tmp_path / ".localllm-backend").exists()  # the next set-up tries again


# --- NVML itself, faked by a library of the same name ---------------------------------------

FAKE_NVML = r"""
#include <string.h>
typedef struct { int index; } device;
static device cards[2] = {{0}, {1}};
static const char *names[2] = {"NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090"};
static const int ccs[2][2] = {{8, 6}, {8, 9}};
int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
int nvmlSystemGetCudaDriverVersion_v2(int *v) { *v = 13000; return 0; }
int nvmlDeviceGetCount_v2(unsigned *n) { *n = 2; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned i, device **h) { *h = &cards[i]; return 0; }
int nvmlDeviceGetName(device *h, char *name, unsigned n) {
    strncpy(name, names[h->index], n); return 0; }
int nvmlDeviceGetCudaComputeCapability(device *h, int *major, int *minor) {
    *major = ccs[h->index][0]; *minor = ccs[h->index][1]; return 0; }
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for a fake NVML")
def test_a_faked_nvidia_driver_takes_the_cuda_path(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    source = tmp_path / "nvml.c"
    source.write_text(FAKE_NVML)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib / "libnvidia-ml.so.1"), str(source)],
                   check=True, timeout=120)
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(lib), "CUDA_HOME": "/nonexistent",
           "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--venv", str(tmp_path / "venv"), "--dry-run"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(
        "backend: cuda for sm_86, sm_89 (NVIDIA driver with NVIDIA GeForce RTX 3090, NVIDIA "
        "GeForce RTX 4090): building llama-cpp-python with CUDA using nvcc, cuBLAS and the CUDA "
        "runtime from NVIDIA's PyPI wheels"
    ), lines
    assert lines[1] == (
        f"+ {CUDA_SCRIPT} --venv {tmp_path / 'venv'} --version {VERSION} --arch 86,89 "
        "--cuda-wheels always --cuda-major 13"
    )
    assert not (tmp_path / "venv" / ".localllm-backend").exists()  # a dry run stamps nothing
    # And without the fake driver: the CPU build, saying why.
    del env["LD_LIBRARY_PATH"]
    cpu = subprocess.run([sys.executable, str(SCRIPT), "--venv", str(tmp_path / "venv"),
                          "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert cpu.stderr.strip() == "backend: cpu (no NVIDIA driver (libnvidia-ml.so.1 not found))"


# --- install-cuda-backend.sh with nvcc from the wheels ------------------------------------------


def fake_venv(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "lib").mkdir()
    (path / "bin" / "python").symlink_to(sys.executable)
    return path


def no_toolkit_env(tmp_path: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "CUDA_HOME": str(tmp_path / "no-cuda"), "CUDACXX": "",
            "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}


def test_without_a_toolkit_the_script_takes_nvcc_from_the_wheels(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path / "venv")
    result = subprocess.run(
        [str(CUDA_SCRIPT), "--venv", str(venv), "--version", VERSION, "--arch", "89",
         "--cuda-wheels", "always", "--cuda-major", "13", "--dry-run"],
        capture_output=True, text=True, env=no_toolkit_env(tmp_path), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    assert "-m pip install --quiet --no-deps nvidia-cuda-nvcc==13.*\n" in out
    # nvcc's companions at its own minor version (a newer nvvm writes PTX its ptxas rejects).
    assert "nvidia-nvvm==13.N.* nvidia-cuda-crt==13.N.* nvidia-cuda-runtime==13.N.*" in out
    assert f"+ ln -s lib {site}/nvidia/cu13/lib64\n" in out
    (command,) = [line for line in out.splitlines() if line.startswith("+ CMAKE_ARGS=")]
    assert "-DCMAKE_CUDA_ARCHITECTURES=89 " in command
    assert f"-DCMAKE_CUDA_COMPILER={site}/nvidia/cu13/bin/nvcc " in command
    assert f"-DCUDAToolkit_ROOT={site}/nvidia/cu13 " in command
    assert f"CUDACXX={site}/nvidia/cu13/bin/nvcc " in command
    assert command.split()[-1] == f"llama-cpp-python=={VERSION}"


@pytest.mark.skipif(
    not os.environ.get("LOCALLLM_TEST_CUDA_CONFIGURE"),
    reason="set LOCALLLM_TEST_CUDA_CONFIGURE=1 to CMake-configure the CUDA build with the nvcc "
    "of NVIDIA's wheels (about 1 GB of wheels and the 77 MB sdist from PyPI unless "
    "LOCALLLM_TEST_CUDA_WHEELS_VENV and LOCALLLM_TEST_LLAMA_SDIST name them; 2 minutes)",
)
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.timeout(3600)  # a gigabyte of wheels, then CMake at nice 19
def test_cuda_configure_with_the_wheels_nvcc(tmp_path: Path) -> None:
    """CMake's configure step of llama.cpp's CUDA build, sm_89, with no CUDA toolkit: nvcc,
    cuBLAS and the runtime from NVIDIA's wheels. Nothing CUDA is compiled but CMake's own
    compiler check; no GPU needed."""
    given = os.environ.get("LOCALLLM_TEST_CUDA_WHEELS_VENV")
    if given:
        venv = Path(given)
    else:
        venv = tmp_path / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    args = [str(CUDA_SCRIPT), "--venv", str(venv), "--version", VERSION, "--arch", "89",
            "--cuda-wheels", "always", "--cuda-major", "13", "--configure-only",
            "--build-dir", str(tmp_path / "build")]
    sdist = os.environ.get("LOCALLLM_TEST_LLAMA_SDIST")
    if sdist:
        args += ["--sdist", sdist]
    started = time.monotonic()
    result = subprocess.run(["nice", "-n", "19", *args], capture_output=True, text=True,
                            env=no_toolkit_env(tmp_path), timeout=3600)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no CUDA toolkit: taking nvcc 13 from NVIDIA's wheels" in result.stdout
    log = (tmp_path / "build" / "configure.log").read_text()
    assert "The CUDA compiler identification is NVIDIA 13." in log
    assert "Using CMAKE_CUDA_ARCHITECTURES=89" in log and "Including CUDA backend" in log
    print(f"configured the CUDA build with the wheels' nvcc in {seconds:.0f} s")
