"""The fitter: which quant, how many GPU layers, what context, and how fast, on given hardware.

    fit(model, hardware=None, request=None, settings=None) -> Plan   a path, folder, glob or headers
    fit_header(header, hardware, request) -> Plan                     one file (pure)
    fit_ladder(headers, hardware, request) -> Plan                    quants of one model (pure)
    format_plan(plan) / plan_summary_line(plan)                       text for people and logs

Inside: `records` (FitRequest, Plan, DeviceMemory), `memory` (llama.cpp's allocation rules),
`speed` (decode and prompt speed), `search` (the choice), `render`, and `sources`, the only module
that does I/O (headers, quality sidecars, hardware when none is given).
"""

from localllm.fitter.records import DeviceMemory, FitRequest, Plan
from localllm.fitter.render import format_plan, plan_summary_line
from localllm.fitter.search import fit_header, fit_ladder, quant_name
from localllm.fitter.sources import (
    fit,
    load_quality_loss,
    measured_quality_losses,
    read_headers,
)

__all__ = [
    "DeviceMemory",
    "FitRequest",
    "Plan",
    "fit",
    "fit_header",
    "fit_ladder",
    "format_plan",
    "load_quality_loss",
    "measured_quality_losses",
    "plan_summary_line",
    "quant_name",
    "read_headers",
]
