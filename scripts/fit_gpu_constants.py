"""The fitter's GPU constants, fitted from gpu_check measurements (prints; changes nothing).

    .venv/bin/python scripts/fit_gpu_constants.py benchmarks/gpu/<card>-<date>.json

From every GPU row that loaded:
- GPU_CONTEXT_OVERHEAD_BYTES (localllm/fitter/records.py): device memory the process took beyond
  llama.cpp's own buffers (the CUDA context, cuBLAS, the memory pool), measured by NVML;
- the GPU compute buffers: measured / predicted, per row;
- GPU_BANDWIDTH_EFFICIENCY and GPU_TOKEN_OVERHEAD_S (localllm/fitter/speed.py): a least-squares
  line through seconds per token = bytes read / (efficiency x bandwidth) + overhead, over the
  dense models with every layer on the GPU (what a token reads is then the GPU's weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import gguf_factory as gf  # noqa: E402

MIB = 1024 * 1024
Rows = list[tuple[dict[str, Any], dict[str, Any]]]  # (report, row)


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through (xs, ys)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError("a line needs at least two different x values")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    return slope, mean_y - slope * mean_x


def gpu_rows(reports: list[dict[str, Any]]) -> Rows:
    return [
        (report, row)
        for report in reports
        if report["mode"] == "gpu"
        for row in report["rows"]
        if "error" not in row["measured"] and "device_used_after_run" in row["measured"]
    ]


def overheads(rows: Rows) -> list[tuple[str, int]]:
    out = []
    for _, row in rows:
        measured = row["measured"]
        buffers = measured["buffers"].get("CUDA0", {})
        out.append((row["id"], measured["device_used_after_run"] - sum(buffers.values())))
    return out


def decode_points(rows: Rows) -> list[tuple[str, float, float]]:
    """(row, bytes / bandwidth, measured seconds per token) of dense full-offload rows."""
    points = []
    for report, row in rows:
        speed = row.get("predicted_speed", {})
        decode = row["measured"].get("decode_tok_s", 0.0)
        spec = gf.CHECK_MODELS.get(row["model"])
        dense = spec is not None and not spec.n_expert  # an MoE token reads only some experts
        if not speed.get("full_offload") or not dense or decode <= 0:
            continue
        weights = row["measured"]["buffers"]["CUDA0"]["weights"]
        bandwidth = report["hardware"]["gpus"][0]["bandwidth_bytes_s"]
        points.append((row["id"], weights / bandwidth, 1.0 / decode))
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    rows = gpu_rows([json.loads(path.read_text()) for path in args.files])
    if not rows:
        print("no GPU rows in these files (gpu_check --cpu files have none)")
        return 2
    print("Device memory beyond llama.cpp's buffers (MiB):")
    measured_overheads = overheads(rows)
    for row_id, overhead in measured_overheads:
        print(f"  {overhead / MIB:8.0f}  {row_id}")
    median = statistics.median(o for _, o in measured_overheads)
    print(f"  GPU_CONTEXT_OVERHEAD_BYTES ~ {median / MIB:.0f} * MIB (median; max "
          f"{max(o for _, o in measured_overheads) / MIB:.0f})")
    print("\nGPU compute buffer, measured / predicted:")
    for _, row in rows:
        predicted = row["predicted"]["devices"].get("CUDA0", {}).get("compute", 0)
        measured = row["measured"]["buffers"].get("CUDA0", {}).get("compute", 0)
        if predicted:
            print(f"  {measured / predicted:6.3f}  {row['id']}")
    points = decode_points(rows)
    print("\nDecode, dense models fully on the GPU:")
    for row_id, x, y in points:
        print(f"  {1000 * y:7.2f} ms/token for {1000 * x:6.2f} ms of bandwidth  {row_id}")
    try:
        slope, intercept = line_fit([x for _, x, _ in points], [y for _, _, y in points])
    except ValueError as exc:
        print(f"  no fit: {exc}")
        return 0
    print(f"  GPU_BANDWIDTH_EFFICIENCY ~ {1 / slope:.3f}; GPU_TOKEN_OVERHEAD_S ~ {intercept:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
