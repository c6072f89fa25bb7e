"""The fitter against real loads: the measurement files scripts/gpu_check.py writes, committed
under benchmarks/gpu/.

For every measured row the fitter is run again, as it is now, on the model the row names (the
same sparse GGUF rebuilt from tests/gguf_factory.py, or the embedded model) and the hardware the
row records, and compared with what llama.cpp really allocated and how fast it really ran:

- weights and KV cache per device: exact (llama.cpp logs MiB with two decimals, so to within
  that rounding); host weights only where the file was mapped, as the product loads it (the GPU
  run reads its sparse files instead, which lays host weights out in other buffers);
- compute buffers plus overheads per GPU (the CUDA context, cuBLAS, the pool: device memory used
  beyond the buffers) within 5%; on a CPU-only run compute plus output buffers within 5%;
- every 24 GiB plan stays inside the 24 GiB card minus the margin, measured;
- decode speed within 15% with every layer on the GPU, 25% with partial offload.

GPU files (mode "gpu") need a GPU machine to make (scripts/gpu_check_device.sh); while none is
committed their tests skip, saying so. CPU files (mode "cpu", from `gpu_check.py --cpu`) prove
the same harness on the CPU backend; their speeds are not held to the targets, because they were
taken on a 2-core machine shared with other jobs, where timings swing by several times.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from localllm.fitter import FitRequest, Plan, fit_header
from localllm.gguf_header import ModelHeader, read_header
from tests import gguf_factory as gf

ROOT = Path(__file__).resolve().parent.parent
MEASUREMENTS = ROOT / "benchmarks" / "gpu"
MIB = 1024 * 1024
LOG_ROUNDING_BYTES = MIB // 100  # a "... buffer size = X MiB" line is rounded to 0.01 MiB
COMPUTE_TOLERANCE = 0.05
DECODE_TOLERANCE = {"full": 0.15, "partial": 0.25}

_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
assert _spec is not None and _spec.loader is not None
gpu_check: Any = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
_spec.loader.exec_module(gpu_check)


def _reports() -> list[tuple[str, dict[str, Any]]]:
    paths = sorted(MEASUREMENTS.glob("*.json"))
    return [(path.name, json.loads(path.read_text())) for path in paths]


REPORTS = _reports()


def _rows(mode: str) -> list[Any]:
    params = []
    for name, report in REPORTS:
        if report["mode"] != mode:
            continue
        for row in report["rows"]:
            if "error" not in row["measured"]:
                params.append(pytest.param(report, row, id=f"{name}: {row['id']}"))
    return params


GPU_ROWS = _rows("gpu")
CPU_ROWS = _rows("cpu")
NO_GPU_MEASUREMENTS = (
    "no GPU measurement is committed under benchmarks/gpu/ yet: run scripts/gpu_check_device.sh "
    "on a GPU machine (docs/gpu.md) and commit its gpu_check.json"
)
_HEADERS: dict[tuple[str, str], ModelHeader] = {}


def _or_skip(params: list[Any], reason: str) -> list[Any]:
    """The rows, or one skipped case that says why there are none."""
    return params or [pytest.param(None, None, marks=pytest.mark.skip(reason=reason))]


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path) -> Any:
    """The header of a row's model, rebuilt once per model and quant (sparse files: no data)."""
    folder = tmp_path_factory.mktemp("gpu-check-models")

    def header(row: dict[str, Any]) -> ModelHeader:
        key = (row["model"], row["quant"])
        if key not in _HEADERS:
            if row["model"] == gpu_check.EMBEDDED:
                _HEADERS[key] = read_header(embedded_model_path)
            else:
                _HEADERS[key] = gpu_check.model_header(row["model"], row["quant"], folder)
        return _HEADERS[key]

    return header


def fitter_now(row: dict[str, Any], header: ModelHeader, hardware_key: str) -> Plan:
    """What the fitter predicts today for the row's configuration on the recorded hardware."""
    hardware = gpu_check.hardware_from_record(row[hardware_key])
    if row["kind"] == "plan":
        # The fitter's own choice: it must still be the configuration that was measured.
        plan = fit_header(header, hardware, FitRequest())
        if gpu_check.config_of(plan) != row["config"]:
            pytest.fail(
                f"the fitter now plans {gpu_check.config_of(plan)} for {row['id']}, not the "
                f"measured {row['config']}: rerun scripts/gpu_check.py to measure the new plan"
            )
        return plan
    return fit_header(header, hardware, gpu_check.request_for(row["config"]))


def _comparison(row: dict[str, Any], plan: Plan) -> dict[str, dict[str, Any]]:
    fresh = dict(row, predicted=gpu_check.predicted(plan))
    comparison: dict[str, dict[str, Any]] = gpu_check.device_comparison(fresh)
    return comparison


def _assert_exact(what: str, device: str, predicted: int, measured: int, lines: int) -> None:
    assert abs(predicted - measured) <= LOG_ROUNDING_BYTES * max(1, lines), (
        f"{what} on {device}: predicted {predicted / MIB:.2f} MiB, llama.cpp allocated "
        f"{measured / MIB:.2f} MiB"
    )


def _buffer_lines(row: dict[str, Any], device: str, kind: str) -> int:
    names = {"weights": " model buffer", "kv": " KV buffer"}
    on_gpu = device != "host"
    return sum(
        1
        for line in row["measured"]["buffer_lines"]
        if names[kind] in line and on_gpu == (" CUDA" in line and "CUDA_Host" not in line)
    )


def _repacked(row: dict[str, Any]) -> bool:
    return any("CPU_REPACK model buffer" in line for line in row["measured"]["buffer_lines"])


def _check_host_weights(row: dict[str, Any], plan: Plan) -> None:
    entry = _comparison(row, plan)["host"]
    _assert_exact("weights", "host", entry["predicted"]["weights"],
                  entry["measured"].get("weights", 0), _buffer_lines(row, "host", "weights"))


def _check_memory(row: dict[str, Any], plan: Plan, gpu: bool) -> None:
    for device, entry in _comparison(row, plan).items():
        pred, meas = entry["predicted"], entry["measured"]
        for kind in ("weights", "kv"):
            if kind == "weights" and device == "host" and (
                not row["measured"]["use_mmap"] or _repacked(row)
            ):
                # Read, not mapped: host weights sit in other buffers than the product's.
                # Repacked: test_cpu_repacked_weights_match_the_fitter.
                continue
            _assert_exact(
                kind, device, pred[kind], meas.get(kind, 0), _buffer_lines(row, device, kind)
            )
        if device == "host" and gpu:
            continue  # host overheads are not measured (RSS does not count untouched buffers)
        if device == "host":
            predicted = pred["compute"] + pred["output"]
            measured = meas.get("compute", 0) + meas.get("output", 0)
            what = "compute + output buffers"
        else:
            predicted = pred["compute"] + pred["overhead"]
            measured = meas.get("compute", 0) + meas["overhead"]
            what = "compute buffers + overheads (context, cuBLAS, pool)"
        assert abs(predicted - measured) <= COMPUTE_TOLERANCE * measured, (
            f"{what} on {device}: predicted {predicted / MIB:.0f} MiB, measured "
            f"{measured / MIB:.0f} MiB"
        )


# --------------------------------------------------------------------------- GPU measurements


@pytest.mark.parametrize(("report", "row"), _or_skip(GPU_ROWS, NO_GPU_MEASUREMENTS))
def test_gpu_memory_matches_the_fitter(report: dict[str, Any], row: dict[str, Any],
                                       headers: Any) -> None:
    plan = fitter_now(row, headers(row), "plan_hardware")
    _check_memory(row, plan, gpu=True)


@pytest.mark.parametrize(
    ("report", "row"),
    _or_skip([p for p in GPU_ROWS if p.values[1]["kind"] == "plan"], NO_GPU_MEASUREMENTS),
)
def test_24gib_plans_stay_inside_the_card(report: dict[str, Any], row: dict[str, Any]) -> None:
    (gpu,) = [d for name, d in row["predicted"]["devices"].items() if name != "host"]
    used = row["measured"]["device_used_after_run"]
    assert used + gpu["margin"] <= gpu["capacity"], (
        f"{row['id']}: the load took {used / MIB:.0f} MiB of GPU memory; with the "
        f"{gpu['margin'] / MIB:.0f} MiB margin that is over the "
        f"{gpu['capacity'] / MIB:.0f} MiB card"
    )


@pytest.mark.parametrize(
    ("report", "row"),
    _or_skip([p for p in GPU_ROWS if "predicted_speed" in p.values[1]], NO_GPU_MEASUREMENTS),
)
def test_gpu_decode_speed_matches_the_fitter(report: dict[str, Any], row: dict[str, Any],
                                             headers: Any) -> None:
    config = row["config"]
    plan = fit_header(
        headers(row), gpu_check.hardware_from_record(report["hardware"]),
        gpu_check.request_for(config),
    )
    offload = "full" if plan.full_offload else "partial"
    measured = row["measured"]["decode_tok_s"]
    error = (plan.decode_tok_s - measured) / measured
    assert abs(error) <= DECODE_TOLERANCE[offload], (
        f"{row['id']} ({offload} offload): predicted {plan.decode_tok_s:.1f} tok/s, measured "
        f"{measured:.1f} ({100 * error:+.0f}%)"
    )


# --------------------------------------------------------------------------- CPU measurements


@pytest.mark.parametrize(
    ("report", "row"),
    _or_skip(CPU_ROWS, "no gpu_check --cpu measurement under benchmarks/gpu/"),
)
def test_cpu_memory_matches_the_fitter(report: dict[str, Any], row: dict[str, Any],
                                       headers: Any) -> None:
    plan = fitter_now(row, headers(row), "plan_hardware")
    _check_memory(row, plan, gpu=False)


@pytest.mark.parametrize(
    ("report", "row"),
    _or_skip([p for p in CPU_ROWS if _repacked(p.values[1])], "no CPU row with repacked weights"),
)
def test_cpu_repacked_weights_match_the_fitter(report: dict[str, Any], row: dict[str, Any],
                                               headers: Any) -> None:
    """With repacked CPU weights llama.cpp maps the file only from the first to the last tensor
    it does not repack (CPU_Mapped) and copies the repacked ones (CPU_REPACK, MoE experts too):
    the fitter's host weights must equal the two buffers together."""
    _check_host_weights(row, fitter_now(row, headers(row), "plan_hardware"))


@pytest.mark.skipif(not CPU_ROWS, reason="no gpu_check --cpu measurement under benchmarks/gpu/")
def test_cpu_run_covers_the_check() -> None:
    """The CPU run went through every step the GPU run takes: plans, grid, the Llama loop."""
    for name, report in REPORTS:
        if report["mode"] != "cpu":
            continue
        rows = report["rows"]
        assert not [r["id"] for r in rows if "error" in r["measured"]], name
        assert {r["kind"] for r in rows} == {"plan", "grid"}, name
        assert {r["model"] for r in rows} >= {gpu_check.EMBEDDED, *gf.CPU_CHECK_MODELS}, name
        assert any("llama_loop_decode_tok_s" in r["measured"] for r in rows), name
        assert all(r["measured"]["decode_tok_s"] > 0 for r in rows), name
        table = (MEASUREMENTS / name).with_suffix(".md").read_text()
        assert all(r["id"] in table for r in rows), f"{name}: the Markdown table lacks rows"


def test_cpu_check_fails_a_wrong_prediction(headers: Any) -> None:
    """The harness itself: a row whose KV cache was twice the prediction must fail."""
    if not CPU_ROWS:
        pytest.skip("no gpu_check --cpu measurement under benchmarks/gpu/ to tamper with")
    report, row = CPU_ROWS[0].values
    tampered = json.loads(json.dumps(row))
    tampered["measured"]["buffers"]["host"]["kv"] *= 2
    plan = fitter_now(tampered, headers(tampered), "plan_hardware")
    with pytest.raises(AssertionError, match="kv on host"):
        _check_memory(tampered, plan, gpu=False)


def test_buffer_lines_are_read_per_device() -> None:
    """llama.cpp's own format strings (llama-model.cpp, llama-kv-cache.cpp, llama-context.cpp),
    as a CUDA load with part of the model in host memory logs them."""
    lines = [
        f"load_tensors: {'CUDA0':>12} model buffer size = {4403.49:8.2f} MiB",
        f"load_tensors: {'CUDA_Host':>12} model buffer size = {281.81:8.2f} MiB",
        f"llama_kv_cache: {'CUDA0':>10} KV buffer size = {512.0:8.2f} MiB",
        f"llama_kv_cache: {'CPU':>10} KV buffer size = {64.0:8.2f} MiB",
        f"llama_context: {'CUDA_Host':>10}  output buffer size = {0.49:8.2f} MiB",
        f"sched_reserve: {'CUDA0':>10} compute buffer size = {258.5:8.2f} MiB",
        f"sched_reserve: {'CUDA_Host':>10} compute buffer size = {16.01:8.2f} MiB",
    ]

    def b(mib: float) -> int:
        return round(mib * MIB)

    assert gpu_check.parse_buffers(lines) == {
        "CUDA0": {"weights": b(4403.49), "kv": b(512.0), "compute": b(258.5), "output": 0},
        "host": {"weights": b(281.81), "kv": b(64.0), "compute": b(16.01), "output": b(0.49)},
    }


def test_constants_fit_recovers_a_line() -> None:
    """scripts/fit_gpu_constants.py's least squares: seconds per token = a x + b, exactly."""
    spec = importlib.util.spec_from_file_location(
        "fit_gpu_constants", ROOT / "scripts" / "fit_gpu_constants.py"
    )
    assert spec is not None and spec.loader is not None
    fit_constants: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_constants)
    xs = [0.002, 0.005, 0.011, 0.024]
    slope, intercept = fit_constants.line_fit(xs, [x / 0.9 + 0.003 for x in xs])
    assert slope == pytest.approx(1 / 0.9) and intercept == pytest.approx(0.003)
    with pytest.raises(ValueError, match="two different"):
        fit_constants.line_fit([0.01, 0.01], [0.1, 0.2])
