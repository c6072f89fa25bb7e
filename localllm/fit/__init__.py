"""The fitter's parts: memory model, speed model, plans, choosing, rendering, dry runs.

The public entry points live in `localllm.fitter` (and `localllm.hardware`); the most used are
also reachable from here, imported lazily (localllm.fitter imports this package's modules).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localllm.fit.plan import FitRequest
    from localllm.fitter import Plan, fit, fit_header, fit_ladder, format_plan
    from localllm.hardware import hardware_for

__all__ = ["FitRequest", "Plan", "fit", "fit_header", "fit_ladder", "format_plan", "hardware_for"]


def __getattr__(name: str) -> Any:
    if name == "hardware_for":
        from localllm import hardware

        return hardware.hardware_for
    if name in __all__:
        from localllm import fitter

        return getattr(fitter, name)
    raise AttributeError(f"module 'localllm.fit' has no attribute {name!r}")
