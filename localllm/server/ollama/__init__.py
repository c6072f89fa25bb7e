"""Ollama's API (`/api/*`) on the same server and models as the OpenAI-compatible one.

    api_router.py   the routes (thin: parse, hand over)
    serving.py      /api/chat, /api/generate, /api/embed(dings) as adapters over the chat,
                    completion and embedding handlers; NDJSON streaming
    shapes.py       Ollama's messages in, the OpenAI bodies reshaped into Ollama's out
    catalog.py      names, GGUF details, /api/tags, /api/show, /api/ps
    manage.py       /api/pull, /api/delete, /api/copy over the models folder
    types.py        Ollama's request bodies and `options`
    errors.py       errors under /api/ as Ollama's {"error": "..."}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from localllm.server.chat.serving import ChatServing
from localllm.server.completions.serving import CompletionServing
from localllm.server.embeddings.serving import EmbeddingServing
from localllm.server.ollama.catalog import Catalog
from localllm.server.ollama.errors import OllamaErrorMiddleware
from localllm.server.ollama.manage import ModelManager
from localllm.server.ollama.serving import OllamaServing
from localllm.server.state import AppState

__all__ = ["Ollama", "OllamaErrorMiddleware"]


@dataclass
class Ollama:
    """Everything behind /api/*, on `app.state.ollama`."""

    catalog: Catalog
    serving: OllamaServing
    manager: ModelManager

    @classmethod
    def build(
        cls,
        state: AppState,
        chat: ChatServing,
        completion: CompletionServing,
        embeddings: EmbeddingServing,
        model_path: Path | None = None,
    ) -> Ollama:
        catalog = Catalog(state, model_path)
        return cls(
            catalog=catalog,
            serving=OllamaServing(state, chat, completion, embeddings, catalog),
            manager=ModelManager(state, catalog),
        )
