"""Facts about the installed llama.cpp build, asked of the build itself.

- `probe_build()`: llama-cpp-python's version, whether it can offload to a GPU, and the ggml
  backends and devices it registered (read from libggml, which llama-cpp-python does not bind);
- `gpu_offload()`: the one question the loader asks;
- `cuda_fix_command(venv)`: the command that rebuilds llama-cpp-python with CUDA in a venv;
- `repack_supported()`: whether repacked CPU weight buffers (llama.cpp's CPU_REPACK / AMX
  "extra buffer types") run on this machine, decided by a probe in a child process and cached;
  run only where an engine is about to load (and by `doctor`);
- `repack_planned()`: what planning assumes meanwhile: the cached answer, else llama.cpp's default
  for this CPU; it never starts the probe.

`localllm doctor` reports all of them; `localllm.loading` and the engine act on them.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from localllm.hardware import cache_dir, machine_key

log = logging.getLogger(__name__)

SERVICE_VENV = Path("/opt/localllm/.venv")
CUDA_SCRIPT = "install-cuda-backend.sh"
# ggml_backend_dev_type, in the order of ggml-backend.h's enum.
_DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel", "meta")
# Bump when the repack probe changes, so old answers are not reused.
_REPACK_PROBE_VERSION = 1
REPACK_PROBE_TIMEOUT_S = 180


@dataclass(frozen=True)
class BackendDevice:
    """A device a ggml backend registered (what llama.cpp can actually place tensors on)."""

    name: str
    description: str
    kind: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class BuildInfo:
    """The llama.cpp that llama-cpp-python loaded."""

    llama_cpp_version: str | None
    gpu_offload: bool
    backends: tuple[str, ...] = ()
    devices: tuple[BackendDevice, ...] = ()
    system_info: str = ""
    error: str | None = None

    @property
    def gpu_devices(self) -> tuple[BackendDevice, ...]:
        return tuple(d for d in self.devices if d.kind in ("gpu", "igpu"))

    @property
    def cuda(self) -> bool:
        """Built with llama.cpp's CUDA backend (whether or not a card answers here)."""
        return "CUDA" in self.backends or "CUDA : " in self.system_info

    @property
    def cuda_architectures(self) -> tuple[str, ...]:
        """The compute capabilities compiled in, as ggml-cuda reports them in the system info
        ("CUDA : ARCHS = 860,890 | ..."): ("86", "89"); empty when not said."""
        found = re.search(r"CUDA : ARCHS = ([\d,]+)", self.system_info)
        if not found:
            return ()
        return tuple(a[:-1] if a.endswith("0") else a for a in found[1].split(",") if a)


def gpu_offload() -> bool:
    """Whether this llama.cpp build has a GPU backend (CUDA, Metal, Vulkan...)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def probe_build() -> BuildInfo:
    """Ask the installed llama-cpp-python what it was built with; never raises."""
    try:
        import llama_cpp
    except Exception as exc:  # an ImportError, or an OSError from a broken shared library
        return BuildInfo(None, False, error=f"llama_cpp cannot be imported: {exc}")
    version = getattr(llama_cpp, "__version__", None) or _dist_version("llama-cpp-python")
    raw_info = llama_cpp.llama_print_system_info()
    system_info = raw_info.decode(errors="replace") if isinstance(raw_info, bytes) else raw_info
    try:
        backends, devices = _ggml_registry()
        error = None
    except (OSError, AttributeError) as exc:
        backends, devices, error = (), (), f"ggml backend registry not readable: {exc}"
    return BuildInfo(
        llama_cpp_version=version,
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        backends=backends,
        devices=devices,
        system_info=system_info.strip().rstrip("|").strip(),
        error=error,
    )


@cache
def ggml_library() -> Any:
    """libggml beside libllama, with the registry calls llama-cpp-python 0.3.x does not bind.

    dlopen hands back the very library llama.cpp already loaded, so this reads the live registry.
    """
    import llama_cpp

    lib_dir = Path(llama_cpp.llama_cpp._lib._name).parent
    candidates = [
        *sorted(lib_dir.glob("libggml.*")),
        *sorted(lib_dir.glob("ggml.*")),
        *sorted(lib_dir.glob("libggml-base.*")),
    ]
    if not candidates:
        raise OSError(f"no libggml next to libllama in {lib_dir}")
    ggml = ctypes.CDLL(str(candidates[0]))
    ptr, size, text = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "ggml_backend_reg_count": (size, []),
        "ggml_backend_reg_get": (ptr, [size]),
        "ggml_backend_reg_name": (text, [ptr]),
        "ggml_backend_dev_count": (size, []),
        "ggml_backend_dev_get": (ptr, [size]),
        "ggml_backend_dev_by_name": (ptr, [text]),
        "ggml_backend_dev_name": (text, [ptr]),
        "ggml_backend_dev_description": (text, [ptr]),
        "ggml_backend_dev_type": (ctypes.c_int, [ptr]),
        "ggml_backend_dev_memory": (None, [ptr, ctypes.POINTER(size), ctypes.POINTER(size)]),
        "ggml_backend_dev_buffer_type": (ptr, [ptr]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(ggml, name)
        function.restype, function.argtypes = restype, argtypes
    return ggml


def buffer_type(device_name: str) -> int | None:
    """A ggml buffer type by device name ("CPU", "CUDA0"), for tensor overrides."""
    ggml = ggml_library()
    device = ggml.ggml_backend_dev_by_name(device_name.encode())
    return int(ggml.ggml_backend_dev_buffer_type(device)) if device else None


def _ggml_registry() -> tuple[tuple[str, ...], tuple[BackendDevice, ...]]:
    ggml = ggml_library()

    def decoded(value: bytes | None) -> str:
        return (value or b"").decode(errors="replace")

    backends = tuple(
        decoded(ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)))
        for i in range(ggml.ggml_backend_reg_count())
    )
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        device = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        kind_index = ggml.ggml_backend_dev_type(device)
        kind = _DEVICE_KINDS[kind_index] if 0 <= kind_index < len(_DEVICE_KINDS) else "other"
        devices.append(
            BackendDevice(
                name=decoded(ggml.ggml_backend_dev_name(device)),
                description=decoded(ggml.ggml_backend_dev_description(device)),
                kind=kind,
                total_bytes=int(total.value),
                free_bytes=int(free.value),
            )
        )
    return backends, tuple(devices)


def cuda_fix_command(venv: Path, script: Path | str | None = None) -> str:
    """The exact command that rebuilds llama-cpp-python with CUDA in `venv`."""
    script = script or _cuda_script(venv)
    sudo = "" if os.access(venv, os.W_OK) else "sudo "
    command = f"{sudo}{script} --venv {venv}"
    if venv == SERVICE_VENV:
        command += " && sudo systemctl restart localllm"
    return command


def _cuda_script(venv: Path) -> str:
    for candidate in (
        venv.parent / "scripts" / CUDA_SCRIPT,  # the service install: /opt/localllm/scripts
        Path(__file__).resolve().parents[2] / "scripts" / CUDA_SCRIPT,  # a source checkout
    ):
        if candidate.is_file():
            return str(candidate)
    return f"scripts/{CUDA_SCRIPT}  # from a localllm checkout"


def cuda_library() -> Path | None:
    """libggml-cuda beside llama-cpp-python's libraries, found without importing llama_cpp
    (a CUDA build cannot be imported on a machine without the NVIDIA driver)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    found = sorted((Path(spec.origin).parent / "lib").glob("libggml-cuda.*"))
    return found[0] if found else None


def describe_cuda_build(info: BuildInfo, library: Path | None) -> str:
    """doctor's line about the GPU build: 'CUDA build: yes, for sm_86, sm_89' or 'no'."""
    if not info.cuda and library is None:
        return "CUDA build: no (llama.cpp was built for the CPU only)"
    archs = ", ".join(f"sm_{a}" for a in info.cuda_architectures)
    line = f"CUDA build: yes, for {archs}" if archs else "CUDA build: yes"
    if info.llama_cpp_version is None:
        line += " (but it cannot load here: see above)"
    elif not info.gpu_devices:
        line += " (no CUDA device answers: is the NVIDIA driver loaded?)"
    return line


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- repacked CPU weights -----------------------------------------------------------------------

RepackSource = Literal["probe", "cache", "setting", "default"]


@dataclass(frozen=True)
class RepackProbe:
    """Whether llama.cpp's repacked CPU weights run here, and how that was learnt."""

    supported: bool
    source: RepackSource
    detail: str  # "decoded 4 tokens", "killed by SIGILL", ...
    seconds: float = 0.0


# The child decodes a few tokens with repacking forced on. llama.cpp picks its repack kernels
# (AVX2/AVX-512/AMX) when it loads the weights, so a CPU that advertises an instruction set the
# hypervisor does not really grant dies here, in the child, with SIGILL.
_PROBE_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from localllm.engine import Engine, EngineConfig
    config = EngineConfig(model_path=Path(sys.argv[1]), n_ctx=256, n_parallel=1, n_batch=64,
                          n_ubatch=64, n_threads=1, use_extra_bufts=True)
    with Engine.load(config) as engine:
        done = engine.generate("The capital of France is", max_tokens=4, temperature=0.0)
    print("decoded", done.usage.completion_tokens, "tokens")
    """
)


def _cache_path() -> Path:
    return cache_dir() / "repack_probe.json"


def _probe_key() -> str:
    return f"{machine_key()}|llama-cpp-python {_dist_version('llama-cpp-python')}"


def _cached_repack() -> RepackProbe | None:
    """The probe's answer for this machine and llama.cpp version, when one was stored."""
    try:
        data = json.loads(_cache_path().read_text())
        if data.get("version") == _REPACK_PROBE_VERSION and data.get("key") == _probe_key():
            return RepackProbe(bool(data["supported"]), "cache", str(data["detail"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def repack_planned() -> RepackProbe:
    """What a plan assumes about repacked CPU weights, without starting the probe.

    The probe's cached answer when there is one. Otherwise llama.cpp's own default for this CPU:
    `use_extra_bufts` is on by default, and its x86 repack kernels (the ones the fitter's memory
    and speed models describe) are chosen when the CPU has AVX2; elsewhere none are assumed.
    Planning is cheap and never crashes, so it must not pay for (or be disturbed by) a child
    process; the engine runs the probe before it loads and follows the probe's answer.
    """
    cached = _cached_repack()
    if cached is not None:
        return cached
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and "avx2" in _cpu_flags():
        return RepackProbe(True, "default", "llama.cpp's default with AVX2; not probed yet")
    return RepackProbe(False, "default", "no x86 repack kernels for this CPU; not probed yet")


def repack_supported(refresh: bool = False, model_path: Path | None = None) -> RepackProbe:
    """Run (once per machine and llama.cpp version) the child-process probe of repacked weights.

    Call it only where an engine is about to load (or in `doctor`): it costs a child process
    and a few seconds the first time. Only definite answers are cached: the child decoded, or
    a signal killed it. A child that failed otherwise (no model, a timeout) answers "not
    supported" for this run only. Callers report the answer (`describe_repack`) at INFO in the
    serve log and doctor: a fact of the machine, not a warning on every command.
    """
    path = _cache_path()
    if not refresh:
        cached = _cached_repack()
        if cached is not None:
            return cached
    key = _probe_key()
    if model_path is None:
        from localllm.models import embedded_model_path

        try:
            model_path = embedded_model_path(path.parent / "probe")
        except (ImportError, OSError) as exc:  # no embedded model here: nothing to probe with
            return RepackProbe(False, "probe", f"no model to probe with ({exc}); left off")
    started = time.perf_counter()
    try:
        child = subprocess.run(
            [sys.executable, "-c", _PROBE_CHILD, str(model_path)],
            capture_output=True,
            text=True,
            timeout=REPACK_PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return RepackProbe(False, "probe", "the probe timed out", time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if child.returncode == 0:
        result = RepackProbe(True, "probe", child.stdout.strip() or "decoded", seconds)
    elif child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        result = RepackProbe(False, "probe", f"killed by {name}", seconds)
    else:
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning("repack probe failed (exit %d): %s", child.returncode, tail)
        return RepackProbe(False, "probe", f"exit {child.returncode}: {tail}", seconds)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "version": _REPACK_PROBE_VERSION,
            "key": key,
            "supported": result.supported,
            "detail": result.detail,
            "measured_at": time.time(),
        }
        path.write_text(json.dumps(record, indent=1))
    except OSError:
        pass  # a read-only home: the answer still holds for this run
    return result


def describe_repack(probe: RepackProbe) -> str:
    """One line for the serve log, -v and doctor: 'on (decoded 4 tokens; probe)'."""
    state = "on" if probe.supported else "off"
    return f"repacked CPU weights: {state} ({probe.detail}; {probe.source})"


# Its own logger, so the CLI can show the line in the serve log and with -v only.
REPACK_LOGGER = "localllm.repack"


def report_repack(probe: RepackProbe) -> None:
    """Say at INFO, as an engine loads, whether it repacks (llama.cpp logs its system info so)."""
    logging.getLogger(REPACK_LOGGER).info("%s", describe_repack(probe))
