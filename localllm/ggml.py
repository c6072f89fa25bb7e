"""Facts about ggml that several layers need, in one table each.

The numbers come from gguf-py's own tables (`gguf.GGMLQuantizationType` is ggml's `enum ggml_type`),
never copied: settings validate cache types against `CACHE_TYPES`, the fitter sizes them with
`gguf.GGML_QUANT_SIZES`, and the engine passes `ggml_type_id(name)` to llama.cpp.
"""

from __future__ import annotations

from typing import Literal

from gguf.constants import GGMLQuantizationType

# KV cache element types llama.cpp accepts for -ctk/-ctv that localllm offers; a quantized V cache
# needs flash attention (llama-context.cpp refuses it otherwise).
CacheType = Literal["f16", "q8_0", "q4_0"]
CACHE_TYPES: tuple[CacheType, ...] = ("f16", "q8_0", "q4_0")

# enum llama_flash_attn_type (llama.h): AUTO -1, DISABLED 0, ENABLED 1.
FLASH_ATTN_TYPE: dict[bool | None, int] = {None: -1, False: 0, True: 1}

# enum llama_load_mode (llama.h): NONE reads the file into the buffers (and is what a no_alloc dry
# run needs); the default, AUTO, maps it.
LOAD_MODE_NONE = 0


def ggml_type_id(name: str) -> int:
    """`enum ggml_type` value of a type name ('f16' -> 1, 'q8_0' -> 8)."""
    return int(GGMLQuantizationType[name.upper()].value)
