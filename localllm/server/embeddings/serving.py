"""The embeddings handler, in OpenAI's shape, over any engine that can `embed`.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists (as
OpenAI accepts); `encoding_format` is "float" (lists of numbers) or "base64" (little-endian
float32 bytes, what OpenAI's Python client asks for by default and decodes itself). Vectors are
L2-normalised by the engine, as llama-server returns them. `dimensions` (shortening a vector) is
not something these models were trained for, so it is refused rather than ignored.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from localllm.engine.embed import EmbeddingResult
from localllm.errors import APIError
from localllm.server import types as t
from localllm.server.serving import Serving, offload


def encode_vector(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def embeddings_body(
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


class EmbeddingServing(Serving):
    async def create_embeddings(self, body: t.EmbeddingRequest) -> dict[str, Any]:
        if body.dimensions is not None:
            raise APIError(
                400,
                "dimensions is not supported: these models return their full vector "
                "(leave dimensions out, or truncate and re-normalise client-side)",
                param="dimensions",
                code="invalid_value",
            )
        inputs = body.inputs()
        async with self.use_engine(body.model, body.keep_alive, purpose="embed") as (
            engine,
            model_id,
        ):
            embed = getattr(engine, "embed", None)
            if embed is None:
                raise APIError(400, "this server's engine cannot embed", code="invalid_value")
            result: EmbeddingResult = await offload(engine, embed, inputs)
        return embeddings_body(result, model_id, body.encoding_format)
