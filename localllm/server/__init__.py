"""The OpenAI-compatible HTTP API: app factory, request/response types, errors, metrics, serve()."""

from localllm.server.app import create_app
from localllm.server.run import serve

__all__ = ["create_app", "serve"]
