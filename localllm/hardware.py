"""What the fitter plans for: GPUs (NVML or a named consumer card) and the host (RAM, cores, speed).

All I/O the fitter needs lives here; `localllm.fitter` only reads these frozen records.

- `detect_gpus()` asks NVML (nvidia-ml-py) for each card's name, total and free memory, memory
  bandwidth (max memory clock x 2 x bus width) and driver; no NVML or no driver gives `()`.
- `CONSUMER_GPUS` holds public spec-sheet figures for `--gpu rtx4090` and friends.
- `probe_host()` reads RAM and cores (psutil) and runs a short (~1 s) probe of host memory
  bandwidth (a large numpy copy) and CPU compute (a float32 matmul), cached in a JSON file.
- `hardware_for(settings)` combines detection with the `gpu` / `vram` / `cpu_only` overrides.
  With nothing detected and nothing given it plans for the CPU alone and says so.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from localllm.errors import SettingsError
from localllm.units import GB, GIB

# Bump when the probe changes, so old cached figures are not reused.
_PROBE_VERSION = 2


@dataclass(frozen=True)
class GPUSpec:
    """Public spec-sheet figures of a consumer card."""

    name: str
    vram_bytes: int
    bandwidth_bytes_s: float
    # Effective llama.cpp prompt-processing throughput (FLOP/s, quantized 7-8B models, pp512).
    # Anchored on published llama.cpp figures (RTX 3090 ~3.9k tok/s, RTX 4090 ~6.9k tok/s on an
    # 8B Q4_K_M) and scaled by shader throughput within an architecture: an estimate.
    prefill_flops: float


def _spec(name: str, vram_gb: float, bandwidth_gb_s: float, prefill_tflops: float) -> GPUSpec:
    return GPUSpec(name, int(vram_gb * GIB), bandwidth_gb_s * GB, prefill_tflops * 1e12)


# Memory size and bandwidth from the vendors' spec sheets.
CONSUMER_GPUS: dict[str, GPUSpec] = {
    "rtx3060": _spec("NVIDIA GeForce RTX 3060 12GB", 12, 360, 21),
    "rtx3070": _spec("NVIDIA GeForce RTX 3070", 8, 448, 34),
    "rtx3080": _spec("NVIDIA GeForce RTX 3080 10GB", 10, 760, 50),
    "rtx3080-12gb": _spec("NVIDIA GeForce RTX 3080 12GB", 12, 912, 52),
    "rtx3090": _spec("NVIDIA GeForce RTX 3090", 24, 936, 62),
    "rtx3090ti": _spec("NVIDIA GeForce RTX 3090 Ti", 24, 1008, 68),
    "rtx4060ti-16gb": _spec("NVIDIA GeForce RTX 4060 Ti 16GB", 16, 288, 29),
    "rtx4070": _spec("NVIDIA GeForce RTX 4070", 12, 504, 39),
    "rtx4070tisuper": _spec("NVIDIA GeForce RTX 4070 Ti SUPER", 16, 672, 59),
    "rtx4080": _spec("NVIDIA GeForce RTX 4080", 16, 716.8, 65),
    "rtx4090": _spec("NVIDIA GeForce RTX 4090", 24, 1008, 110),
    "rtx5070": _spec("NVIDIA GeForce RTX 5070", 12, 672, 41),
    "rtx5080": _spec("NVIDIA GeForce RTX 5080", 16, 960, 75),
    "rtx5090": _spec("NVIDIA GeForce RTX 5090", 32, 1792, 140),
    "rx7900xtx": _spec("AMD Radeon RX 7900 XTX", 24, 960, 45),
}
DEFAULT_GPU_KEY = "rtx3090"


@dataclass(frozen=True)
class GPUInfo:
    name: str
    total_bytes: int
    free_bytes: int
    bandwidth_bytes_s: float
    prefill_flops: float
    driver: str | None = None
    index: int = 0
    source: str = "nvml"  # "nvml", "table" (--gpu), "vram" (--vram), "rpc" (an rpc-server)
    # A device on another machine, through llama.cpp's rpc-server: its "host:port"; None: local.
    endpoint: str | None = None
    is_cpu: bool = False  # an rpc-server without a GPU lends its RAM and cores


@dataclass(frozen=True)
class HostInfo:
    ram_total_bytes: int
    ram_available_bytes: int
    physical_cores: int
    logical_cores: int
    memory_bandwidth_bytes_s: float  # numpy large copy (read + write bytes / time)
    matmul_flops: float  # float32 matmul over all cores, FLOP/s
    source: str = "probe"  # "probe", "cache", "assumed"

    @property
    def matmul_flops_per_core(self) -> float:
        return self.matmul_flops / max(1, self.physical_cores)


# A mid-range desktop (8 cores, dual-channel DDR5), for fits that were given no host.
TYPICAL_HOST = HostInfo(
    ram_total_bytes=64 * GIB,
    ram_available_bytes=56 * GIB,
    physical_cores=8,
    logical_cores=16,
    memory_bandwidth_bytes_s=60 * GB,
    matmul_flops=1000e9,
    source="assumed",
)


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GPUInfo, ...]
    host: HostInfo
    threads: int  # CPU threads llama.cpp will use
    notes: tuple[str, ...] = ()
    # llama.cpp copies some host-side weights into repacked CPU buffers (on by default on x86
    # with AVX2; off where `localllm.engine.build.repack_supported` found that it crashes).
    cpu_repack: bool = True
    # The network to remote (RPC) devices: a round trip, and bytes per second.
    link_latency_s: float = 0.0005
    link_bytes_s: float = 125e6

    @property
    def remote_gpus(self) -> tuple[GPUInfo, ...]:
        return tuple(g for g in self.gpus if g.endpoint is not None)

    @property
    def n_gpus(self) -> int:
        return len(self.gpus)

    @property
    def assumed(self) -> bool:
        """Some GPU was named (--gpu / --vram) rather than detected on this machine."""
        return any(g.source != "nvml" for g in self.gpus)


def gpu_from_spec(spec: GPUSpec, index: int = 0, source: str = "table") -> GPUInfo:
    return GPUInfo(
        name=spec.name,
        total_bytes=spec.vram_bytes,
        free_bytes=spec.vram_bytes,
        bandwidth_bytes_s=spec.bandwidth_bytes_s,
        prefill_flops=spec.prefill_flops,
        index=index,
        source=source,
    )


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("geforce", "").replace("nvidia", ""))


def lookup_gpu(name: str) -> GPUSpec | None:
    """A table entry by key ('rtx4090', 'RTX 4090', '4090') or by an NVML device name."""
    wanted = _normalise(name)
    for key, spec in CONSUMER_GPUS.items():
        if wanted in (_normalise(key), _normalise(spec.name)):
            return spec
    for key, spec in CONSUMER_GPUS.items():  # '4090' or 'NVIDIA GeForce RTX 4090 D'
        short = _normalise(key).removeprefix("rtx").removeprefix("rx")
        if wanted == short or _normalise(spec.name) in wanted:
            return spec
    return None


# llama.cpp's CUDA backend handles at most GGML_CUDA_MAX_DEVICES = 16 cards.
MAX_GPUS = 16
# No GPU sold has more memory than this (the largest accelerators carry 192-288 GB); a bigger
# figure is a typo or a unit mix-up (a byte count read as GiB).
MAX_GPU_BYTES = 512 * GIB


def parse_gpu_names(value: str) -> tuple[GPUInfo, ...]:
    """'rtx4090', 'rtx3090,rtx3090', '2xrtx3090' or 'rtx3090x2' -> table GPUs."""
    gpus: list[GPUInfo] = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        if part.lower() in ("none", "cpu", "0"):
            raise SettingsError(
                f"{value!r} names no GPU; to plan for the CPU alone use --cpu (or --vram 0)"
            )
        # '2xrtx4090', 'rtx4090x2' or 'rtx4090': the first reading that names a known card (a
        # count first: lookup_gpu would also find 'rtx4090' inside '2xrtx4090', as NVML names
        # such as 'NVIDIA GeForce RTX 4090 D' need).
        readings: list[tuple[int, str]] = []
        if m := re.fullmatch(r"(\d+)\s*[x*]\s*(.+)", part):
            readings.append((int(m[1]), m[2]))
        if m := re.fullmatch(r"(.+?)\s*[x*]\s*(\d+)", part):
            readings.append((int(m[2]), m[1]))
        readings.append((1, part))
        found = [(n, spec) for n, key in readings if (spec := lookup_gpu(key)) is not None]
        if not found:
            known = ", ".join(CONSUMER_GPUS)
            raise SettingsError(
                f"unknown GPU {readings[0][1]!r}; known cards: {known} (or give --vram)"
            )
        count, spec = found[0]
        if count < 1:
            raise SettingsError(f"{part!r} names no card; write rtx4090 or 2xrtx4090")
        gpus += [gpu_from_spec(spec, len(gpus) + i) for i in range(count)]
        if len(gpus) > MAX_GPUS:
            raise SettingsError(
                f"{value!r} names {len(gpus)} cards; llama.cpp uses at most {MAX_GPUS}"
            )
    if not gpus:
        raise SettingsError("no GPU named; name a card such as rtx4090")
    return tuple(gpus)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {"": GIB, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
          "gb": GB, "gib": GIB, "tb": 1000**4, "tib": 1024**4, "k": 1024, "m": 1024**2,
          "g": GIB, "t": 1024**4}


def parse_size(text: str) -> int:
    """A GPU's memory: '24GiB', '24 GB' (10^9 bytes), '24' (GiB), '24576MiB', '0' -> bytes.

    Bounded by what a GPU can hold, so a byte count typed without its unit ('25769803776',
    read as GiB) is refused with the spelling that was meant instead of planning for it.
    """
    m = _SIZE_RE.match(text)
    unit = (m[2] or "").lower() if m else ""
    if m is None or unit not in _UNITS:
        raise SettingsError(
            f"cannot read the size {text!r}; write it like 24GiB, 24576MiB or 0 (CPU only)"
        )
    size = int(float(m[1]) * _UNITS[unit])
    if size > MAX_GPU_BYTES:
        hint = ""
        if not unit and float(m[1]).is_integer() and int(float(m[1])) <= MAX_GPU_BYTES:
            hint = f"; a number without a unit is GiB: for bytes write {m[1]}B " \
                   f"({int(float(m[1])) / GIB:.1f} GiB)"
        raise SettingsError(
            f"{text.strip()!r} is {size / GIB:,.0f} GiB, more than any GPU holds "
            f"(at most {MAX_GPU_BYTES // GIB} GiB per card){hint}"
        )
    return size


def parse_vram(value: str, allow_zero: bool = False) -> tuple[int, ...]:
    """'24GiB,24GiB' -> (bytes, bytes): one entry per GPU; '0' (allow_zero) -> (0,): no GPU."""
    sizes = tuple(parse_size(part) for part in value.split(",") if part.strip())
    if allow_zero and sizes and not any(sizes):
        return sizes
    if not sizes or any(size <= 0 for size in sizes):
        raise SettingsError(f"--vram {value!r} names no usable GPU memory")
    return sizes


@dataclass(frozen=True)
class GPUProbe:
    """What NVML found, and why it found nothing when it did not (doctor prints the reason)."""

    gpus: tuple[GPUInfo, ...]
    error: str | None = None


def detect_gpus() -> tuple[GPUInfo, ...]:
    """NVIDIA GPUs through NVML; `()` when NVML, the driver or the cards are missing."""
    return probe_gpus().gpus


def probe_gpus() -> GPUProbe:
    """NVIDIA GPUs through NVML, with the reason when there are none; never raises."""
    try:
        import pynvml
    except ImportError:
        return GPUProbe((), "nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return GPUProbe((), _nvml_reason(pynvml, exc))
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            spec = lookup_gpu(name)
            bandwidth = _nvml_bandwidth(pynvml, handle)
            if bandwidth is None:
                bandwidth = spec.bandwidth_bytes_s if spec else 500 * GB
            # Unknown card: prompt throughput scales roughly with bandwidth across generations.
            prefill = spec.prefill_flops if spec else bandwidth * 65
            gpus.append(GPUInfo(name, int(memory.total), int(memory.free), bandwidth, prefill,
                                driver, index, "nvml"))
        return GPUProbe(tuple(gpus), None if gpus else "NVML lists no GPU")
    except Exception as exc:
        return GPUProbe((), _nvml_reason(pynvml, exc))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvml_reason(pynvml: Any, exc: Exception) -> str:
    if isinstance(exc, getattr(pynvml, "NVMLError_LibraryNotFound", ())):
        return "no NVIDIA driver (libnvidia-ml.so not found)"
    if isinstance(exc, getattr(pynvml, "NVMLError_DriverNotLoaded", ())):
        return "the NVIDIA driver is installed but not loaded (try: sudo modprobe nvidia)"
    if isinstance(exc, getattr(pynvml, "NVMLError_NoPermission", ())):
        return "no permission to open the NVIDIA devices (/dev/nvidia*)"
    return f"NVML: {exc}"


def process_gpu_bytes() -> dict[str, int]:
    """VRAM used by this process per GPU (NVML), {} without NVML or GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: nothing to report
        return {}
    used: dict[str, int] = {}
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    used[f"CUDA{index}"] = int(proc.usedGpuMemory)
    finally:
        pynvml.nvmlShutdown()
    return used


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_bandwidth(pynvml: Any, handle: Any) -> float | None:
    try:
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
    except Exception:
        return None
    if not clock_mhz or not bus_bits:
        return None
    # NVML reports the memory clock at half the data rate (DDR): 3090 9751 MHz x 2 x 384 bit.
    return float(clock_mhz) * 1e6 * 2 * float(bus_bits) / 8


def cache_dir() -> Path:
    """Where localllm keeps per-machine measurements (host probe, repack probe)."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "localllm"


def default_cache_path() -> Path:
    return cache_dir() / "host_probe.json"


def machine_key() -> str:
    """This machine's identity for cached measurements: architecture, CPU model, core count."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    return f"{platform.machine()}|{model}|{os.cpu_count()}"


def measure_memory_bandwidth(n_bytes: int = 256 * 1024 * 1024, repeats: int = 4) -> float:
    """Best of a few large numpy copies: bytes read + written per second."""
    import numpy as np

    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - start))
    return best


def measure_matmul_flops(size: int = 768, repeats: int = 6) -> float:
    """Best float32 matmul throughput over all cores (numpy's BLAS), FLOP/s."""
    import numpy as np

    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    a @ a  # warm up the BLAS threads
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def probe_host(refresh: bool = False, cache_path: Path | None = None) -> HostInfo:
    """RAM and cores now, plus bandwidth and compute figures (measured once, then cached)."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    memory = psutil.virtual_memory()
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    logical = psutil.cpu_count(logical=True) or physical
    path = cache_path or default_cache_path()
    key = machine_key()
    cached: dict[str, Any] | None = None
    if not refresh:
        try:
            data = json.loads(path.read_text())
            if data.get("version") == _PROBE_VERSION and data.get("machine") == key:
                cached = data
        except (OSError, ValueError):
            cached = None
    if cached is not None:
        bandwidth, flops, source = float(cached["bandwidth"]), float(cached["flops"]), "cache"
    else:
        bandwidth, flops, source = measure_memory_bandwidth(), measure_matmul_flops(), "probe"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"version": _PROBE_VERSION, "machine": key, "bandwidth": bandwidth,
                      "flops": flops, "measured_at": time.time()}
            path.write_text(json.dumps(record, indent=1))
        except OSError:
            pass  # a read-only home: the figures are still good for this run
    return HostInfo(int(memory.total), int(memory.available), int(physical), int(logical),
                    bandwidth, flops, source)


def hardware_for(
    settings: Any = None,
    *,
    gpus: tuple[GPUInfo, ...] | None = None,
    host: HostInfo | None = None,
    refresh: bool = False,
) -> Hardware:
    """The hardware to plan for: detected, or as `settings.gpu` / `settings.vram` say.

    `settings` is a `localllm.settings.Settings` (or anything with `gpu`, `vram`, `threads`).
    Precedence: `cpu_only` (or `--vram 0`) plans for the CPU alone; `--gpu` names the cards;
    `--vram` overrides their memory (or, alone, the detected cards' memory, or describes cards of
    unknown make with RTX 3090 bandwidth); else NVML; else the CPU alone. Cards that were named
    rather than detected are marked `assumed` (GPUInfo.source), and plans say so.

    This does not know the llama.cpp build: `localllm.loading.planning_hardware` is what the
    commands use, since a CPU-only build runs on the CPU whatever cards are installed.
    """
    notes: list[str] = []
    gpu_names = getattr(settings, "gpu", None)
    vram = getattr(settings, "vram", None)
    vram_zero = isinstance(vram, str) and not any(parse_vram(vram, allow_zero=True))
    if getattr(settings, "cpu_only", False) or vram_zero:
        gpus, gpu_names, vram = (), None, None
        notes.append("--cpu: planning for the CPU alone")
    elif gpus is None:
        if gpu_names:
            gpus = parse_gpu_names(gpu_names)
        else:
            gpus = detect_gpus()
    gpus = tuple(gpus)
    if vram:
        sizes = parse_vram(vram)
        base = gpus or (gpu_from_spec(CONSUMER_GPUS[DEFAULT_GPU_KEY], source="vram"),)
        gpus = tuple(
            replace(base[min(i, len(base) - 1)], total_bytes=size, free_bytes=size, index=i,
                    source="vram")
            for i, size in enumerate(sizes)
        )
        if not gpu_names and all(g.source == "vram" and g.name == base[0].name for g in gpus):
            notes.append(f"--vram given: speed figures assume {base[0].name} bandwidth")
    if not gpus and not notes:
        notes.append(
            "no GPU detected (NVML): planning for the CPU alone; --gpu rtx4090 or --vram 24GiB "
            "plans for a card this machine does not have"
        )
    elif any(g.source != "nvml" for g in gpus):
        named = ", ".join(sorted({g.name for g in gpus}))
        notes.append(f"planning for {len(gpus)} assumed GPU(s) ({named}), not detected here")
    if host is None:
        host = probe_host(refresh=refresh)
    threads = getattr(settings, "threads", None) or host.logical_cores
    return Hardware(gpus=gpus, host=host, threads=int(threads), notes=tuple(notes))


def hardware_summary(hardware: Hardware) -> dict[str, Any]:
    """A JSON-friendly digest (for `localllm fit --json` / `doctor`)."""
    return {
        "gpus": [asdict(g) for g in hardware.gpus],
        "host": asdict(hardware.host),
        "threads": hardware.threads,
        "notes": list(hardware.notes),
    }
