"""localllm: fit, serve and run open GGUF models well on one consumer GPU.

    import localllm
    header = localllm.read_header("model.gguf")    # what the file holds, weights unread
    plan = localllm.fit("models/")                  # which quant, how many GPU layers, how fast
    print(localllm.format_plan(plan))
"""

from __future__ import annotations

from localllm.errors import DoesNotFitError, GGUFError, LocalLLMError
from localllm.fitter import FitRequest, Plan, fit, format_plan
from localllm.gguf_header import ModelHeader, read_header
from localllm.hardware import Hardware, hardware_for
from localllm.settings import Settings, load_settings

__all__ = [
    "DoesNotFitError",
    "FitRequest",
    "GGUFError",
    "Hardware",
    "LocalLLMError",
    "ModelHeader",
    "Plan",
    "Settings",
    "fit",
    "format_plan",
    "hardware_for",
    "load_settings",
    "read_header",
]
__version__ = "0.1.0"
