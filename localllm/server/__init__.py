"""The OpenAI-compatible HTTP API: app factory, request/response types, errors, metrics, serve()."""

from localllm.server.app import create_app
from localllm.server.loading import plan_engine_config
from localllm.server.run import serve

__all__ = ["create_app", "plan_engine_config", "serve"]
