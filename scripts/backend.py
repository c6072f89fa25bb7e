#!/usr/bin/env python3
"""Which llama.cpp backend `./scripts/dev` installs: cpu, or cuda for the cards in this machine.

Runs with the standard library alone, before llama-cpp-python (or localllm) is installed:

    python3 scripts/backend.py --venv .venv             # decide, say so, install, stamp the venv
    python3 scripts/backend.py --venv .venv --dry-run   # decide and print the commands only

The decision:
- `LOCALLLM_BACKEND=cpu`: the CPU build, whatever the machine has (the opt-out);
- `LOCALLLM_WHEEL_INDEX=URL`: llama-cpp-python from a prebuilt wheel index the user trusts
  (`pip install --index-url URL`), no compiling;
- an NVIDIA driver (NVML, libnvidia-ml.so.1, answers) with at least one card, or
  `LOCALLLM_BACKEND=cuda` (forces it; architectures from LOCALLLM_CUDA_ARCH, else the cards,
  else the consumer default): llama-cpp-python built with CUDA for exactly those compute
  capabilities by scripts/install-cuda-backend.sh, with the CUDA toolkit's nvcc when there is
  one, else NVIDIA's compiler, runtime and cuBLAS wheels from PyPI;
- otherwise the CPU build (pip's default: nothing to do here).

The decision is stamped in the venv (`.localllm-backend`): a rerun does nothing unless
LOCALLLM_BACKEND or LOCALLLM_WHEEL_INDEX asks for something else.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = ".localllm-backend"
# What install-cuda-backend.sh builds when it knows no card: RTX 30xx, 40xx, 50xx.
DEFAULT_ARCHS = ("86", "89", "120")
# NVIDIA's compiler wheels form a usable toolkit from CUDA 13 (one nvidia/cu13 tree); a CUDA 13
# build needs a driver that supports 13.0 (580 or newer).
WHEEL_CUDA_MAJOR = 13
# Compiling llama.cpp's CUDA kernels for one architecture took about 36 CPU-minutes (sm_90, a
# 2-core machine, measured 2026-11-27: 72 minutes of wall time); each more adds most of that.
CPU_MINUTES_PER_ARCH = 36


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "89" for 8.9


@dataclass(frozen=True)
class Machine:
    """What the decision depends on; `probe()` reads it, tests build it by hand."""

    gpus: tuple[Gpu, ...] = ()
    nvml_error: str | None = None  # why NVML gave nothing, when it did not
    driver_cuda: tuple[int, int] | None = None  # the newest CUDA the driver runs, (12, 8)
    nvcc: str | None = None  # a CUDA toolkit's compiler
    nvcc_version: tuple[int, int] | None = None
    cores: int = 1


@dataclass(frozen=True)
class Decision:
    backend: str  # "cpu", "cuda" or "wheel-index"
    reason: str
    archs: tuple[str, ...] = ()
    compiler: str = ""  # "toolkit" or "wheels" (cuda only)
    index_url: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def stamp(self) -> str:
        """The line kept in the venv: what was installed."""
        if self.backend == "cuda":
            return f"cuda {';'.join(self.archs)}"
        if self.backend == "wheel-index":
            return f"wheel-index {self.index_url}"
        return "cpu"


# --- Probing ------------------------------------------------------------------------------------


def probe_nvml() -> tuple[tuple[Gpu, ...], tuple[int, int] | None, str | None]:
    """The cards NVML lists with their compute capability, and the driver's CUDA version."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return (), None, "no NVIDIA driver (libnvidia-ml.so.1 not found)"
    if nvml.nvmlInit_v2() != 0:
        return (), None, "the NVIDIA driver did not initialise (nvmlInit failed)"
    try:
        version = ctypes.c_int(0)
        driver_cuda = None
        if nvml.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(version)) == 0 and version.value:
            driver_cuda = (version.value // 1000, version.value % 1000 // 10)
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return (), driver_cuda, "NVML could not count the GPUs"
        gpus = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                continue
            name = ctypes.create_string_buffer(96)
            nvml.nvmlDeviceGetName(handle, name, 96)
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            if nvml.nvmlDeviceGetCudaComputeCapability(
                handle, ctypes.byref(major), ctypes.byref(minor)
            ) != 0:
                continue
            gpus.append(Gpu(name.value.decode(errors="replace"), f"{major.value}{minor.value}"))
        return tuple(gpus), driver_cuda, None if gpus else "NVML lists no GPU"
    finally:
        nvml.nvmlShutdown()


def find_nvcc(env: dict[str, str]) -> str | None:
    """A CUDA toolkit's nvcc, looked for as install-cuda-backend.sh does."""
    candidates = [env.get("CUDACXX", ""), shutil.which("nvcc", path=env.get("PATH")) or ""]
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(f"{home}/bin/nvcc")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(found[1]), int(found[2])) if found else None


def probe(env: dict[str, str]) -> Machine:
    gpus, driver_cuda, error = probe_nvml()
    nvcc = find_nvcc(env)
    version = nvcc_version(nvcc) if nvcc else None
    return Machine(gpus, error, driver_cuda, nvcc if version else None, version,
                   os.cpu_count() or 1)


# --- Deciding -----------------------------------------------------------------------------------


def decide(machine: Machine, env: dict[str, str]) -> Decision:
    """The backend for this machine and these opt-outs/opt-ins; no I/O."""
    asked = env.get("LOCALLLM_BACKEND", "").strip().lower()
    if asked not in ("", "auto", "cpu", "cuda"):
        raise SystemExit(f"backend: LOCALLLM_BACKEND={asked} is not one of cpu, cuda, auto")
    if asked == "cpu":
        return Decision("cpu", "LOCALLLM_BACKEND=cpu")
    index = env.get("LOCALLLM_WHEEL_INDEX", "").strip()
    if index:
        return Decision("wheel-index", f"LOCALLLM_WHEEL_INDEX={index}", index_url=index)
    if not machine.gpus and asked != "cuda":
        return Decision("cpu", machine.nvml_error or "no NVIDIA GPU")
    forced = [a for a in re.split(r"[,;\s]+", env.get("LOCALLLM_CUDA_ARCH", "")) if a]
    archs = tuple(forced) or tuple(sorted({g.compute_capability for g in machine.gpus}, key=int))
    names = ", ".join(sorted({g.name for g in machine.gpus}))
    reason = f"NVIDIA driver with {names}" if machine.gpus else "LOCALLLM_BACKEND=cuda"
    if not archs:
        archs = DEFAULT_ARCHS
    if machine.nvcc:
        return Decision("cuda", reason, archs, "toolkit")
    if machine.driver_cuda is not None and machine.driver_cuda < (WHEEL_CUDA_MAJOR, 0):
        advice = (
            f"the driver runs CUDA {machine.driver_cuda[0]}.{machine.driver_cuda[1]} and no CUDA "
            f"toolkit (nvcc) is installed; NVIDIA's compiler wheels need CUDA "
            f"{WHEEL_CUDA_MAJOR} (driver 580+): install the CUDA toolkit "
            f"{machine.driver_cuda[0]}.x, update the driver, or set LOCALLLM_WHEEL_INDEX"
        )
        if asked == "cuda":
            raise SystemExit(f"backend: LOCALLLM_BACKEND=cuda, but {advice}")
        return Decision("cpu", f"{reason}, but {advice}")
    return Decision("cuda", reason, archs, "wheels")


def llama_version(root: Path = ROOT) -> str:
    """The llama-cpp-python version localllm pins."""
    found = re.search(r'"llama-cpp-python==([^"]+)"', (root / "pyproject.toml").read_text())
    if not found:
        raise SystemExit("backend: pyproject.toml pins no llama-cpp-python version")
    return found[1]


def commands(decision: Decision, venv: Path, version: str, machine: Machine) -> list[list[str]]:
    """The exact commands that install the decided backend into `venv`."""
    python = str(venv / "bin" / "python")
    if decision.backend == "wheel-index":
        return [[python, "-m", "pip", "install", "--force-reinstall", "--no-deps",
                 "--only-binary", "llama-cpp-python", "--index-url", decision.index_url,
                 f"llama-cpp-python=={version}"]]
    if decision.backend == "cuda":
        command = [str(ROOT / "scripts" / "install-cuda-backend.sh"), "--venv", str(venv),
                   "--version", version, "--arch", ",".join(decision.archs)]
        if decision.compiler == "toolkit" and machine.nvcc:
            command += ["--nvcc", machine.nvcc]
        else:
            command += ["--cuda-wheels", "always", "--cuda-major", str(WHEEL_CUDA_MAJOR)]
        return [command]
    return []  # cpu: `pip install .[dev]` brings llama-cpp-python's CPU build


def estimate_minutes(decision: Decision, machine: Machine) -> int:
    """About how long the CUDA build takes here (compile time spreads over the cores)."""
    cpu_minutes = CPU_MINUTES_PER_ARCH * len(decision.archs)
    return max(3, round(cpu_minutes / max(1, machine.cores) * 1.2) + 2)


def describe(decision: Decision, machine: Machine) -> str:
    if decision.backend == "cpu":
        return f"backend: cpu ({decision.reason})"
    if decision.backend == "wheel-index":
        return f"backend: llama-cpp-python from the wheel index {decision.index_url}"
    compiler = (f"the CUDA toolkit's nvcc {machine.nvcc}" if decision.compiler == "toolkit"
                else f"nvcc, cuBLAS and the CUDA runtime from NVIDIA's PyPI wheels (CUDA "
                     f"{WHEEL_CUDA_MAJOR}, about 1 GB)")
    archs = ", ".join(f"sm_{a}" for a in decision.archs)
    return (
        f"backend: cuda for {archs} ({decision.reason}): building llama-cpp-python with CUDA "
        f"using {compiler}; about {estimate_minutes(decision, machine)} minutes on "
        f"{machine.cores} cores, once (LOCALLLM_BACKEND=cpu skips it)"
    )


# --- Running ------------------------------------------------------------------------------------


def read_stamp(venv: Path) -> str | None:
    try:
        return json.loads((venv / STAMP).read_text())["installed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_stamp(venv: Path, decision: Decision) -> None:
    record = {"installed": decision.stamp, "reason": decision.reason}
    (venv / STAMP).write_text(json.dumps(record) + "\n")


def main(argv: list[str] | None = None, env: dict[str, str] | None = None,
         machine: Machine | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    env = dict(os.environ) if env is None else env
    venv = args.venv.absolute()
    stamp = read_stamp(venv)
    explicit = env.get("LOCALLLM_BACKEND", "").strip().lower() not in ("", "auto") or bool(
        env.get("LOCALLLM_WHEEL_INDEX", "").strip()
    )
    if stamp is not None and not explicit:
        return 0  # decided once: a driver that is down today does not swap the build
    machine = machine or probe(env)
    decision = decide(machine, env)
    if stamp == decision.stamp:
        return 0
    print(describe(decision, machine), file=sys.stderr)
    todo = commands(decision, venv, llama_version(), machine)
    if stamp is not None and decision.backend == "cpu":
        # Back from a GPU build to pip's CPU build of the same version.
        python = str(venv / "bin" / "python")
        todo = [[python, "-m", "pip", "install", "--force-reinstall", "--no-deps",
                 f"llama-cpp-python=={llama_version()}"]]
    for command in todo:
        print("+ " + shlex.join(command), file=sys.stderr)
        if args.dry_run:
            continue
        if subprocess.run(command).returncode != 0:
            print(f"backend: {decision.backend} set-up failed (see above); the CPU build is "
                  "installed instead. Rerun ./scripts/dev to try again, or LOCALLLM_BACKEND=cpu",
                  file=sys.stderr)
            return 1
    if not args.dry_run:
        write_stamp(venv, decision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
