"""The llama.cpp engine: continuous batching over n_parallel slots, prompt cache reuse."""

from localllm.engine.chat import ChatTemplate
from localllm.engine.config import EngineConfig
from localllm.engine.core import Engine, memory_summary
from localllm.engine.embed import EmbeddingResult
from localllm.engine.handle import RequestHandle
from localllm.engine.types import (
    Completion,
    EngineStats,
    Event,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TextEvent,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "ChatTemplate",
    "Completion",
    "EmbeddingResult",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Event",
    "FinishEvent",
    "GenerationRequest",
    "RequestHandle",
    "SamplingParams",
    "TextEvent",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "memory_summary",
]
