"""`localllm doctor`: what this install will do on this machine, and how to fix what is wrong.

Without loading a model it gathers

- the llama.cpp build (`localllm.engine.build`): version, GPU offload, ggml backends and devices,
  and whether repacked CPU weights run here (a cached child-process probe);
- the NVIDIA GPUs NVML sees and the host's RAM, cores and measured memory bandwidth
  (`localllm.hardware`, the only prober);
- the settings in force and where each value came from (flag, env, config, default);
- the model that would be served and the plan `serve` would load it with;
- whether the build has llama.cpp's RPC backend, and whether each RPC host (`rpc`) answers;

then turns them into advice, each with the exact command that fixes it where there is one.

A probe that fails is reported, never raised: doctor is what people run when things are broken.
`doctor_report` takes the probes' results as keyword arguments, so the advice can be checked for
machines this one is not.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from localllm.engine.build import (
    BuildInfo,
    RepackProbe,
    cuda_fix_command,
    cuda_library,
    describe_cuda_build,
    describe_repack,
    probe_build,
    repack_supported,
)
from localllm.errors import DoesNotFitError, LocalLLMError, RpcError
from localllm.fitter import plan_summary_line
from localllm.hardware import GPUProbe, HostInfo, probe_gpus, probe_host
from localllm.loading import plan_for_serving
from localllm.models import embedded_bytes, embedded_model, resolve_model
from localllm.rpc import parse_rpc_servers, query_server
from localllm.settings import Settings, setting_sources, unknown_env_vars
from localllm.units import gib

Level = Literal["ok", "info", "warning", "error"]


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
class RpcHostCheck:
    """One rpc-server named by the `rpc` setting, as the memory query found it."""

    address: str
    reachable: bool
    version: str | None = None
    devices: tuple[str, ...] = ()  # "device 0: 23.5 GiB free of 24.0 GiB"
    error: str | None = None


def check_rpc_hosts(settings: Settings, timeout_s: float = 3.0) -> tuple[RpcHostCheck, ...]:
    """Ask every host the `rpc` setting names for its version and memory; never raises."""
    checks = []
    for endpoint in parse_rpc_servers(settings.rpc):
        try:
            info = query_server(endpoint, timeout_s, settings.rpc_allow_public)
        except RpcError as exc:
            checks.append(RpcHostCheck(endpoint.address, False, error=str(exc)))
            continue
        version = ".".join(map(str, info.version)) if info.version else None
        devices = tuple(
            f"device {d.index}: {gib(d.free_bytes)} free of {gib(d.total_bytes)}"
            for d in info.devices
        )
        checks.append(RpcHostCheck(endpoint.address, True, version, devices))
    return tuple(checks)


@dataclass(frozen=True)
class Advice:
    level: Level
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class DoctorReport:
    build: BuildInfo
    gpus: GPUProbe
    host: HostInfo | None  # None: the probe failed (host_error says why)
    config_path: str | None
    settings: tuple[SettingValue, ...]
    model: ModelCheck
    advice: tuple[Advice, ...] = field(default=())
    repack: RepackProbe | None = None  # None: not probed (llama.cpp not importable)
    host_error: str | None = None
    rpc_hosts: tuple[RpcHostCheck, ...] = ()
    cuda_library: str | None = None  # libggml-cuda of the installed llama-cpp-python, if any

    @property
    def ok(self) -> bool:
        """No advice at error level (the CLI's exit status)."""
        return all(a.level != "error" for a in self.advice)

    def to_dict(self) -> dict[str, Any]:
        """The `--json` shape: plain dicts, lists, strings and numbers."""
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        data["cuda_build"] = {
            "built": self.build.cuda or self.cuda_library is not None,
            "architectures": list(self.build.cuda_architectures),
        }
        return data


# --- The model ---------------------------------------------------------------------------------


def check_model(settings: Settings) -> ModelCheck:
    """The model serve would load, whether it is on disk, and what the fitter makes of it."""
    name = settings.model or settings.default_model
    embedded = embedded_model(name)
    if embedded is not None:
        # Not resolve_model: that writes the embedded model, and doctor writes nothing.
        name = f"embedded {embedded.title}"
        path: Path | None = settings.models_dir / embedded.file
    else:
        try:
            path = resolve_model(name, settings.models_dir)
        except LocalLLMError as exc:
            return ModelCheck(name, None, False, None, "not checked", None, str(exc))
    present = path is not None and path.is_file()
    size = path.stat().st_size if present and path is not None else None
    if embedded is not None and not present:
        size = embedded_bytes(embedded)
    fit, fit_ok, error = _fit(settings, path, present)
    return ModelCheck(name, str(path) if path else None, present, size, fit, fit_ok, error)


def _fit(
    settings: Settings, path: Path | None, present: bool
) -> tuple[str, bool | None, str | None]:
    """One line: the plan `serve` would load the model with on this machine, and its warnings."""
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


def advise(
    build: BuildInfo,
    gpus: GPUProbe,
    host: HostInfo | None,
    model: ModelCheck,
    venv: Path,
    cuda_script: Path | str | None = None,
    rpc_hosts: tuple[RpcHostCheck, ...] = (),
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
                    f"GPU {gpu.index} ({gpu.name}): {gib(used)} of "
                    f"{gib(gpu.total_bytes)} already in use by other processes; "
                    "the fitter plans with what is free.",
                    "nvidia-smi  # to see which processes hold it",
                )
            )

    advice.extend(_rpc_advice(build, rpc_hosts, venv))
    if model.error:
        advice.append(Advice("error", f"model {model.name}: {model.error}"))
    elif model.fit_ok is False:
        advice.append(Advice("error", f"model {model.name} does not fit: {model.fit}"))
    return tuple(advice)


def _rpc_advice(
    build: BuildInfo, hosts: tuple[RpcHostCheck, ...], venv: Path
) -> list[Advice]:
    if not hosts:
        return []
    advice: list[Advice] = []
    if build.llama_cpp_version is not None and "RPC" not in build.backends:
        advice.append(
            Advice(
                "error",
                "RPC hosts are set (rpc) but this llama.cpp build has no RPC backend: serve "
                "cannot use them. Build one from the same llama-cpp-python sources.",
                f"scripts/build-rpc.sh --install {venv}",
            )
        )
    for host in hosts:
        if host.reachable:
            advice.append(
                Advice("ok", f"RPC host {host.address} answers (protocol {host.version}).")
            )
        else:
            advice.append(Advice("error", host.error or f"RPC host {host.address} is down"))
    return advice


def env_advice(environ: Mapping[str, str] | None = None) -> tuple[Advice, ...]:
    """`LOCALLLM_*` variables that name no setting: each silently does nothing."""
    return tuple(
        Advice(
            "warning",
            f"environment variable {name} is not a localllm setting and is ignored",
            f"rename it to {near}" if near else "see `localllm doctor` Settings for the names",
        )
        for name, near in unknown_env_vars(environ)
    )


def _cpu_only_message(gpus: GPUProbe, host: HostInfo | None, model: ModelCheck) -> str:
    reason = gpus.error or "NVML lists no GPU"
    parts = [f"CPU-only mode: no NVIDIA GPU found ({reason}) and a CPU-only llama.cpp build."]
    bandwidth = host.memory_bandwidth_bytes_s if host else None
    if host and bandwidth and model.size_bytes:
        # Decoding reads every weight once per token, so bandwidth / model size bounds it.
        parts.append(
            f"Decoding reads the whole model per token: at most about "
            f"{bandwidth / model.size_bytes:.0f} tokens/s for {model.name} "
            f"({gib(model.size_bytes, 2)}) at {bandwidth / 1e9:.0f} GB/s, less where the "
            f"{host.physical_cores} cores are the limit; an 8B Q4_K_M (4.9 GB) at most "
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
    repack: RepackProbe | None = None,
    venv: Path | None = None,
    rpc_hosts: tuple[RpcHostCheck, ...] | None = None,
    cuda_lib: Path | None = None,
) -> DoctorReport:
    """Probe (unless given the results) and advise.

    `flags` are the setting names given on the command line (a mapping counts keys whose value
    is not None, as load_settings does). `venv` is the environment a fix should rebuild.
    """
    given = (
        {k for k, v in flags.items() if v is not None} if isinstance(flags, Mapping) else set(flags)
    )
    if build is None:
        build, cuda_lib = probe_build(), cuda_library()
    gpus = gpus if gpus is not None else probe_gpus()
    host_error = None
    if host is None:
        try:
            host = probe_host()
        except Exception as exc:  # doctor reports what broke, whatever it was
            host_error = f"host probe failed: {type(exc).__name__}: {exc}"
    if repack is None and build.llama_cpp_version is not None:
        try:
            repack = repack_supported()
        except Exception as exc:
            repack = RepackProbe(False, "probe", f"probe failed: {type(exc).__name__}: {exc}")
    sources = setting_sources(config_path, frozenset(given))
    values = tuple(
        SettingValue(name, _shown_value(name, getattr(settings, name)), sources[name])
        for name in Settings.model_fields
    )
    if rpc_hosts is None:
        rpc_hosts = check_rpc_hosts(settings)
    model = check_model(settings)
    advice = advise(
        build, gpus, host, model, venv or Path(sys.prefix), rpc_hosts=rpc_hosts
    ) + env_advice()
    return DoctorReport(
        build=build,
        gpus=gpus,
        host=host,
        config_path=str(config_path) if config_path else None,
        settings=values,
        model=model,
        advice=advice,
        repack=repack,
        host_error=host_error,
        rpc_hosts=rpc_hosts,
        cuda_library=str(cuda_lib) if cuda_lib else None,
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
        gpu_backends = [name for name in b.backends if name not in ("CPU", "RPC", "BLAS")]
        if b.gpu_offload:
            offload = "yes"
        elif gpu_backends:
            offload = f"no: a {'/'.join(gpu_backends)} build that found no device"
        else:
            offload = "no (CPU-only build)"
        lines.append(f"  llama-cpp-python {b.llama_cpp_version}, GPU offload: {offload}")
        lines.append(f"  backends: {', '.join(b.backends) or 'unknown'}")
        for d in b.devices:
            lines.append(f"  device {d.name} ({d.kind}): {d.description}, {gib(d.total_bytes)}")
        if b.error:
            lines.append(f"  {b.error}")
        if b.system_info:
            lines.append(f"  {b.system_info}")
    library = Path(report.cuda_library) if report.cuda_library else None
    lines.append(f"  {describe_cuda_build(b, library)}")
    if report.repack is not None:
        lines.append(f"  {describe_repack(report.repack)}")

    lines.append("NVIDIA GPUs")
    if not report.gpus.gpus:
        lines.append(f"  none: {report.gpus.error or 'NVML lists no GPU'}")
    for g in report.gpus.gpus:
        driver = f", driver {g.driver}" if g.driver else ""
        lines.append(
            f"  {g.index}: {g.name}, {gib(g.total_bytes)} ({gib(g.free_bytes)} free), "
            f"{g.bandwidth_bytes_s / 1e9:.0f} GB/s{driver}"
        )

    h = report.host
    lines.append("Host")
    if h is None:
        lines.append(f"  {report.host_error}")
    else:
        lines.append(
            f"  RAM {gib(h.ram_total_bytes)} ({gib(h.ram_available_bytes)} available), "
            f"{h.physical_cores} cores, memory bandwidth "
            f"{h.memory_bandwidth_bytes_s / 1e9:.1f} GB/s (measured, {h.source})"
        )

    if report.rpc_hosts:
        has_rpc = "RPC" in b.backends
        lines.append(f"RPC hosts (this build's RPC backend: {'yes' if has_rpc else 'no'})")
        for r in report.rpc_hosts:
            if r.reachable:
                lines.append(f"  {r.address}: protocol {r.version}; {'; '.join(r.devices)}")
            else:
                lines.append(f"  {r.address}: {r.error}")

    lines.append(f"Settings (config file: {report.config_path or 'none'})")
    width = max(len(s.name) for s in report.settings) if report.settings else 0
    for s in report.settings:
        lines.append(f"  {s.name:<{width}} = {_toml_like(s.value):<24} ({s.source})")

    m = report.model
    lines.append("Model")
    where = m.path or "-"
    state = "present" if m.present else "not on disk yet"
    size = f", {gib(m.size_bytes, 2)}" if m.size_bytes else ""
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
