"""The systemd unit, the example config and the install scripts.

`systemd-analyze verify` comes from Debian's `systemd` package (.ci/run installs it). verify
also checks that ExecStart's binary exists, and /opt/localllm/.venv/bin/localllm exists only
after install-service.sh ran, so the test verifies a copy whose ExecStart names an executable
that exists here, after asserting that the original differs in that one line only.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from localllm.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "localllm.service"
EXAMPLE = ROOT / "systemd" / "config.example.toml"
INSTALL = ROOT / "scripts" / "install-service.sh"
CUDA = ROOT / "scripts" / "install-cuda-backend.sh"
EXEC_START = "/opt/localllm/.venv/bin/localllm serve --config /etc/localllm/config.toml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze missing: apt-get install systemd (Debian package 'systemd')",
)


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) pairs in order; systemd keys repeat (DeviceAllow=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            key, _, value = line.partition("=")
            sections[current].append((key, value))
    return sections


def service_value(key: str) -> str | None:
    values = [v for k, v in unit_entries(UNIT.read_text())["Service"] if k == key]
    return values[-1] if values else None


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


# --- The unit -----------------------------------------------------------------------------------


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert text.count(f"ExecStart={EXEC_START}\n") == 1
    # Only ExecStart changes: /usr/bin/env exists everywhere and takes the same arguments.
    copy = tmp_path / "localllm.service"
    copy.write_text(
        text.replace("ExecStart=/opt/localllm/.venv/bin/localllm", "ExecStart=/usr/bin/env")
    )
    diff = [
        (a, b)
        for a, b in zip(text.splitlines(), copy.read_text().splitlines(), strict=True)
        if a != b
    ]
    assert len(diff) == 1
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 even for unknown keys ("Unknown key ..., ignoring"): demand silence too.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_systemd_analyze
def test_systemd_analyze_verify_catches_mistakes(tmp_path: Path) -> None:
    # The check above would be worthless if verify let a typo through silently.
    copy = tmp_path / "localllm.service"
    copy.write_text(
        UNIT.read_text()
        .replace("ExecStart=/opt/localllm/.venv/bin/localllm", "ExecStart=/usr/bin/env")
        .replace("LockPersonality=yes", "LockPersonalty=yes")
    )
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Unknown key" in result.stdout + result.stderr


@needs_systemd_analyze
def test_security_exposure_is_low(tmp_path: Path) -> None:
    copy = tmp_path / "localllm.service"
    copy.write_text(UNIT.read_text().replace("/opt/localllm/.venv/bin/localllm", "/usr/bin/env"))
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for localllm.service: ([\d.]+)", result.stdout)
    if result.returncode != 0 and match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported: {result.stderr.strip()}")
    assert match, result.stdout[-2000:]
    # 1.8 when written ("OK"); 10 is an unsandboxed service.
    assert float(match[1]) <= 2.5


def test_unit_essentials() -> None:
    service = dict(unit_entries(UNIT.read_text())["Service"])
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == EXEC_START
    assert service["Restart"] == "on-failure"
    assert service["User"] == "localllm"
    assert service["StateDirectory"] == "localllm"
    assert service["ConfigurationDirectory"] == "localllm"
    assert seconds(service["WatchdogSec"]) >= 10
    for key in ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp"):
        assert service[key] in ("strict", "yes"), key
    assert service["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert service["SystemCallFilter"] == "~@privileged"


def test_unit_keeps_the_gpu_reachable() -> None:
    entries = unit_entries(UNIT.read_text())["Service"]
    keys = {k for k, _ in entries}
    # Both would break CUDA: hidden /dev/nvidia*, and no W+X memory for JIT / ctypes trampolines.
    assert "PrivateDevices" not in keys
    assert "MemoryDenyWriteExecute" not in keys
    assert "ProcSubset" not in keys  # CUDA reads /proc/driver/nvidia
    assert service_value("DevicePolicy") == "closed"
    allowed = {v for k, v in entries if k == "DeviceAllow"}
    for device in (
        "/dev/nvidiactl rw",
        "/dev/nvidia-uvm rw",
        "/dev/nvidia-uvm-tools rw",
        "char-nvidia-frontend rw",
        "char-nvidia-uvm rw",
    ):
        assert device in allowed


def test_stop_timeout_outlasts_the_shutdown_grace() -> None:
    stop = seconds(service_value("TimeoutStopSec") or "")
    grace = Settings.model_fields["shutdown_grace_s"].default
    assert stop >= grace + 10


def test_install_script_and_unit_agree() -> None:
    script = INSTALL.read_text()
    assert "PREFIX=/opt/localllm\n" in script
    assert "CONFIG_DIR=/etc/localllm\n" in script
    assert "STATE_DIR=/var/lib/localllm\n" in script
    assert "SERVICE_USER=localllm\n" in script
    assert 'models_dir = "/var/lib/localllm/models"' in EXAMPLE.read_text()


# --- The example config -------------------------------------------------------------------------

ASSIGNMENT = re.compile(r"^#?\s*([a-z_]+)\s*=\s*(.+)$")


def example_keys() -> tuple[dict[str, str], dict[str, str]]:
    """(active, commented) assignments: key -> TOML value text."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in EXAMPLE.read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if match:
            (commented if line.startswith("#") else active)[match[1]] = match[2]
    return active, commented


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LOCALLLM_"):
            monkeypatch.delenv(name)


def test_example_config_loads(no_env: None) -> None:
    settings = load_settings(EXAMPLE)
    assert settings.models_dir == Path("/var/lib/localllm/models")


def test_example_config_lists_every_setting_once() -> None:
    active, commented = example_keys()
    assert not set(active) & set(commented)
    assert set(active) | set(commented) == set(Settings.model_fields)


def test_example_config_values_are_valid_and_defaults_are_true(
    no_env: None, tmp_path: Path
) -> None:
    # Uncomment everything: every shown value must load, and where a setting has a default
    # the comment shows that default (so the file cannot silently drift from the code).
    uncommented = tmp_path / "all.toml"
    uncommented.write_text(
        "\n".join(
            line.lstrip("# ") if ASSIGNMENT.match(line) else line
            for line in EXAMPLE.read_text().splitlines()
        )
    )
    settings = load_settings(uncommented)
    _, commented = example_keys()
    for key, text in commented.items():
        field = Settings.model_fields[key]
        default = field.get_default(call_default_factory=True)
        if default is None:
            continue
        shown = tomllib.loads(f"v = {text}")["v"]
        assert getattr(settings, key) == default == type(default)(shown), key


def test_example_config_describes_every_setting() -> None:
    # Each assignment is preceded by a comment line (its description).
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        match = ASSIGNMENT.match(line)
        if match and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), match[1]
        elif match:
            previous = lines[i - 1]
            assert previous.startswith("#") and previous.strip() != "#", match[1]


# --- install-service.sh -------------------------------------------------------------------------


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_install_dry_run_changes_nothing() -> None:
    result = run_script(str(INSTALL), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "+ install -D -m 0644" in out and "/etc/systemd/system/localllm.service" in out
    assert "/opt/localllm/.venv" in out
    assert "config.example.toml /etc/localllm/config.example.toml" in out
    assert "daemon-reload" in out  # run, or skipped where systemd is not running
    if not os.path.exists("/etc/localllm/config.toml"):
        assert "config.example.toml /etc/localllm/config.toml" in out
    assert not Path("/opt/localllm").exists() or Path("/opt/localllm/.venv").exists()


def test_install_is_idempotent_and_keeps_the_config(tmp_path: Path) -> None:
    first = run_script(str(INSTALL), "--destdir", str(tmp_path), "--no-pip")
    assert first.returncode == 0, first.stderr
    unit = tmp_path / "etc/systemd/system/localllm.service"
    config = tmp_path / "etc/localllm/config.toml"
    assert unit.read_text() == UNIT.read_text()
    assert config.read_text() == EXAMPLE.read_text()
    assert (tmp_path / "var/lib/localllm/models").is_dir()
    assert os.access(tmp_path / "opt/localllm/scripts/install-cuda-backend.sh", os.X_OK)

    config.write_text('port = 9999\nmodels_dir = "/srv/models"\n')
    second = run_script(str(INSTALL), "--destdir", str(tmp_path), "--no-pip")
    assert second.returncode == 0, second.stderr
    assert f"keeping existing {config}" in second.stdout
    assert "is up to date" in second.stdout
    assert config.read_text() == 'port = 9999\nmodels_dir = "/srv/models"\n'


def test_install_rejects_unknown_options() -> None:
    result = run_script(str(INSTALL), "--frobnicate")
    assert result.returncode == 2
    assert "unknown option" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck() -> None:
    result = subprocess.run(
        ["shellcheck", str(INSTALL), str(CUDA)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


# --- install-cuda-backend.sh --------------------------------------------------------------------

VENV = Path(sys.prefix)
NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None
)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no CUDA toolkit (nvcc) on this machine")


def installed_llama_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def fake_cublas(root: Path) -> Path:
    # Enough for the script's checks; --dry-run builds nothing.
    (root / "include").mkdir(parents=True)
    (root / "lib").mkdir()
    for name in ("include/cublas_v2.h", "lib/libcublas.so", "lib/libcublasLt.so"):
        (root / name).write_text("")
    return root


def test_cuda_script_without_nvcc_explains_and_fails(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CUDA_HOME": str(tmp_path / "no-cuda"), "CUDACXX": ""}
    result = run_script(str(CUDA), "--venv", str(VENV), env=env)
    assert result.returncode == 1
    assert "no CUDA toolkit found" in result.stderr
    assert "--nvcc PATH" in result.stderr


@needs_nvcc
def test_cuda_script_dry_run_shows_the_rebuild(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    cublas = fake_cublas(tmp_path / "cublas")
    result = run_script(str(CUDA), "--venv", str(VENV), "--cublas-root", str(cublas), "--dry-run")
    assert result.returncode == 0, result.stderr
    (command,) = [line for line in result.stdout.splitlines() if line.startswith("+ CMAKE_ARGS=")]
    assert '"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86;89;120 ' in command
    assert " FORCE_CMAKE=1 " in command
    assert " -m pip install --no-cache-dir --force-reinstall --no-deps " in command
    assert f"llama-cpp-python=={installed_llama_version()}" in command
    assert f" {VENV}/bin/python -m pip install " in command


@needs_nvcc
def test_cuda_script_arch_option(tmp_path: Path) -> None:
    cublas = fake_cublas(tmp_path / "cublas")
    result = run_script(
        str(CUDA), "--venv", str(VENV), "--cublas-root", str(cublas), "--arch", "89", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert "-DCMAKE_CUDA_ARCHITECTURES=89 " in result.stdout
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None or subprocess.run([nvidia_smi, "-L"], capture_output=True).returncode:
        native = run_script(str(CUDA), "--venv", str(VENV), "--arch", "native", "--dry-run")
        assert native.returncode == 1
        assert "--arch native needs a working NVIDIA GPU" in native.stderr


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cuda_configure_only(tmp_path: Path) -> None:
    """CMake-configures llama.cpp's CUDA build from the sdist: about 10 s, no GPU needed.

    Needs cuBLAS: from the toolkit, or LOCALLLM_TEST_CUBLAS_ROOT (e.g. the unpacked
    nvidia-cublas wheel's nvidia/cu13). A toolkit without it must fail fast, saying so.
    """
    pytest.importorskip("llama_cpp")
    args = [str(CUDA), "--venv", str(VENV), "--configure-only", "--build-dir", str(tmp_path)]
    cublas = os.environ.get("LOCALLLM_TEST_CUBLAS_ROOT")
    if cublas:
        args += ["--cublas-root", cublas]
    elif not os.environ.get("LOCALLLM_TEST_CUDA_WHEELS"):
        # NVIDIA's cuBLAS wheels weigh 600 MB: fetched only when asked for.
        args += ["--cuda-wheels", "never"]
    sdist = os.environ.get("LOCALLLM_TEST_LLAMA_SDIST")
    if sdist:
        args += ["--sdist", sdist]
    result = run_script(*args)
    if "has no cuBLAS" in result.stderr:
        assert result.returncode == 1
        assert not list(tmp_path.iterdir())  # failed before downloading anything
        pytest.skip(
            "this CUDA toolkit has no cuBLAS; set LOCALLLM_TEST_CUBLAS_ROOT (a cuBLAS folder) or "
            "LOCALLLM_TEST_CUDA_WHEELS=1 (take NVIDIA's wheels, 600 MB) to configure"
        )
    if "could not download the sdist" in result.stderr:
        pytest.skip("no network for the llama-cpp-python sdist (set LOCALLLM_TEST_LLAMA_SDIST)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "configured llama.cpp" in result.stdout
    log = (tmp_path / "configure.log").read_text()
    assert "Including CUDA backend" in log
    assert (tmp_path / "build" / "CMakeCache.txt").is_file()


@needs_nvcc
def test_cuda_script_takes_cublas_from_nvidia_wheels(tmp_path: Path) -> None:
    """Without cuBLAS in the toolkit: NVIDIA's wheels into the venv, link-time names in a folder
    of the venv, and an $ORIGIN-relative RPATH so nothing has to set LD_LIBRARY_PATH."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib").mkdir()
    (venv / "bin" / "python").symlink_to(sys.executable)
    result = run_script(
        str(CUDA), "--venv", str(venv), "--version", "0.3.36", "--cuda-wheels", "always",
        "--arch", "86,89", "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    major = re.search(r"CUDA toolkit (\d+)\.", out)
    assert major is not None, out
    cu = major[1]
    wheels = (f"nvidia-cublas=={cu}.* nvidia-cuda-runtime=={cu}.*" if int(cu) >= 13
              else f"nvidia-cublas-cu{cu} nvidia-cuda-runtime-cu{cu}")
    assert f"-m pip install --quiet --no-cache-dir {wheels}" in out
    link = f"{venv}/share/localllm/cuda-link"
    assert f"/libcublas.so.{cu} {link}/lib/libcublas.so" in out
    (command,) = [line for line in out.splitlines() if line.startswith("+ CMAKE_ARGS=")]
    assert "-DCMAKE_CUDA_ARCHITECTURES=86;89 " in command
    assert f"-DCUDA_cublas_LIBRARY={link}/lib/libcublas.so " in command
    assert f"-DCMAKE_CUDA_FLAGS=-I{link}/include " in command
    # pip splits CMAKE_ARGS like a shell line: the quotes keep the backslash CMake needs.
    assert f"'-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath,\\$ORIGIN/../../nvidia/cu{cu}/lib'" in command
    assert command.split()[-1] == "llama-cpp-python==0.3.36"


@pytest.mark.skipif(
    not os.environ.get("LOCALLLM_TEST_CUDA_VENV"),
    reason="set LOCALLLM_TEST_CUDA_VENV to a venv built by install-cuda-backend.sh to check it",
)
def test_cuda_build_finds_cublas_without_ld_library_path() -> None:
    """A real build: libggml-cuda's RUNPATH leads to the wheels' cuBLAS and CUDA runtime."""
    venv = Path(os.environ["LOCALLLM_TEST_CUDA_VENV"])
    (lib,) = venv.glob("lib/python3*/site-packages/llama_cpp/lib/libggml-cuda.so")
    dynamic = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "$ORIGIN/../../nvidia/cu" in dynamic
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, env=env).stdout
    for name in ("libcublas.so", "libcublasLt.so", "libcudart.so"):
        (line,) = [line for line in ldd.splitlines() if name + "." in line]
        assert "not found" not in line and "/nvidia/cu" in line, line
