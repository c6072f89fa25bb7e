"""localllm: fit, serve and run open GGUF models well on one consumer GPU.

header = localllm.read_header("model.gguf")      # what the file holds, weights unread
plan = localllm.fit("models/")                    # which quant, how many GPU layers, how fast
"""

from __future__ import annotations

from typing import Any

from localllm.errors import LocalLLMError
from localllm.gguf_header import ModelHeader, read_header
from localllm.settings import Settings, load_settings

__all__ = ["LocalLLMError", "ModelHeader", "Settings", "fit", "load_settings", "read_header"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The fitter pulls in the hardware tables; import it only when asked for.
    if name == "fit":
        from localllm.fitter import fit

        return fit
    raise AttributeError(f"module 'localllm' has no attribute {name!r}")
