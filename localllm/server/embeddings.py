"""POST /v1/embeddings in OpenAI's shape, over any engine that can `embed`.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists (as
OpenAI accepts); `encoding_format` is "float" (lists of numbers) or "base64" (little-endian
float32 bytes, what OpenAI's Python client asks for by default and decodes itself). Vectors are
L2-normalised by the engine, as llama-server returns them. `dimensions` (shortening a vector) is
not something these models were trained for, so it is refused rather than ignored.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from localllm.engine.embed import EmbeddingResult
from localllm.errors import RequestError

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    keep_alive: str | int | float | None = None  # Ollama's extension, as for chat

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: EmbeddingInput) -> EmbeddingInput:
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be an empty string")
        elif not value:
            raise ValueError("input must not be an empty list")
        elif any(isinstance(item, str) and not item for item in value):
            raise ValueError("input must not contain empty strings")
        elif any(isinstance(item, list) and not item for item in value):
            raise ValueError("input must not contain empty token lists")
        return value

    def inputs(self) -> list[str | list[int]]:
        """One entry per vector to compute."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, int) for item in value):
            return [list(value)]  # type: ignore[arg-type]  # one token list
        return list(value)  # type: ignore[arg-type]


def encode_vector(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def embeddings_response(
    result: EmbeddingResult, model_id: str, encoding_format: str
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(result.vectors)
        ],
        "model": model_id,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


async def create_embeddings(
    body: EmbeddingRequest,
    model_id: str,
    embed: Callable[[list[str | list[int]]], Awaitable[EmbeddingResult]],
) -> dict[str, Any]:
    """The handler behind the route: validate, embed, shape the answer."""
    if body.dimensions is not None:
        raise RequestError(
            "dimensions is not supported: these models return their full vector "
            "(leave dimensions out, or truncate and re-normalise client-side)",
            param="dimensions",
        )
    result = await embed(body.inputs())
    return embeddings_response(result, model_id, body.encoding_format)
