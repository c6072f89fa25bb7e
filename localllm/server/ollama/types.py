"""Ollama's request bodies, and its `options` mapped onto the sampling fields localllm serves.

Requests are strict about what they say: a field localllm cannot honour (a Go `template`, a FIM
`suffix`, `images` without a vision projector) and an option it cannot apply per request (the
load-time ones, mirostat, typical_p) is a 400 naming it, never dropped. Options set to their
neutral value (mirostat 0, typical_p 1) change nothing and are accepted. A `null` option is
unset, as Ollama's clients send unset fields from a dict.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from localllm.errors import APIError

Think = bool | Literal["low", "medium", "high"]
KeepAlive = str | int | float | None


class _Request(BaseModel):
    # Unknown fields are refused (extra="forbid"): an ignored field would be a silent change.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Body = TypeVar("Body", bound=_Request)


class ToolCallFunction(_Request):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    index: int | None = None


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunction


class Message(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    # Earlier reasoning sent back: the chat path's reasoning_content where it has that field
    # (templates mostly drop past reasoning anyway).
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class _Generating(_Request):
    model: Annotated[str, Field(min_length=1)]
    stream: bool = True  # Ollama's default (its Python client sends false unless asked)
    format: Literal["", "json"] | dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None
    think: Think | None = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ChatRequest(_Generating):
    messages: list[Message] = Field(default_factory=list)
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None


class GenerateRequest(_Generating):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedRequest(_Request):
    model: Annotated[str, Field(min_length=1)]
    input: str | list[str]
    truncate: bool | None = None
    dimensions: int | None = None
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class EmbeddingsRequest(_Request):
    """The older /api/embeddings: one prompt, one `embedding`."""

    model: Annotated[str, Field(min_length=1)]
    prompt: str
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class ModelRequest(_Request):
    """/api/show, /api/delete; `name` is the older spelling of `model`."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise APIError(400, "model is required", param="model", code="invalid_value")
        return name


class PullRequest(ModelRequest):
    insecure: bool = False  # hub downloads are always HTTPS (or HF_ENDPOINT as set)
    stream: bool = True


class CopyRequest(_Request):
    source: Annotated[str, Field(min_length=1)]
    destination: Annotated[str, Field(min_length=1)]


# ------------------------------------------------------------------------------------- options

# Ollama option -> the OpenAI-style field of localllm's request bodies, applied as is.
SAMPLING_OPTIONS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "seed": "seed",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "stop": "stop",
}
# Options that change nothing at these values; any other value cannot be honoured.
NEUTRAL_OPTIONS: dict[str, Any] = {
    "typical_p": 1.0,
    "tfs_z": 1.0,
    "mirostat": 0,
    "repeat_last_n": 64,  # localllm's penalty window is Ollama's default, 64 tokens
    "penalize_newline": False,
}
# Ollama's load-time options: the fitter and the server's settings decide these.
LOAD_OPTIONS = {
    "num_batch": "n_batch",
    "num_gpu": "n_gpu_layers",
    "main_gpu": "the fitter's device placement",
    "num_thread": "threads",
    "use_mmap": "the engine (it always maps the file)",
    "use_mlock": "the engine",
    "numa": "the engine",
    "low_vram": "the fitter",
    "f16_kv": "type_k and type_v",
    "vocab_only": "the engine",
    "logits_all": "the engine",
    "embedding_only": "the model file",
    "num_keep": "the engine (it never shifts the context)",
    "draft_num_predict": "the engine (no draft model)",
}


def _bad_option(name: str, why: str) -> APIError:
    return APIError(400, f"options.{name}: {why}", param=f"options.{name}", code="invalid_value")


def sampling_fields(options: dict[str, Any] | None) -> dict[str, Any]:
    """The request-body fields (temperature, max_tokens, stop, ...) that `options` asks for.
    `num_ctx` is checked separately (it is the loaded context, not a sampling field)."""
    fields: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if value is None:
            continue
        if name in SAMPLING_OPTIONS:
            if name == "seed" and isinstance(value, int) and value < 0:
                continue  # Ollama's -1: a random seed, which is what no seed means here
            if name == "stop" and isinstance(value, str):
                value = [value]
            fields[SAMPLING_OPTIONS[name]] = value
        elif name == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise _bad_option(name, "must be an integer")
            # -1: until the model stops; -2: fill the context. Both: the slot's context.
            fields["max_tokens"] = None if value in (-1, -2) else value
            if value == 0 or value < -2:
                raise _bad_option(name, "must be at least 1, or -1 (no limit)")
        elif name in NEUTRAL_OPTIONS:
            if value != NEUTRAL_OPTIONS[name]:
                raise _bad_option(
                    name,
                    f"localllm's sampler has no {name}; only its neutral value "
                    f"{NEUTRAL_OPTIONS[name]!r} is accepted",
                )
        elif name in ("mirostat_tau", "mirostat_eta"):
            pass  # read only by mirostat, which must be 0 (off) to get here
        elif name in LOAD_OPTIONS:
            raise _bad_option(
                name,
                f"a load-time setting that requests cannot change here; {LOAD_OPTIONS[name]} "
                "decides it when the model loads",
            )
        elif name != "num_ctx":
            raise _bad_option(name, "is not an option localllm knows")
    return fields


def num_ctx_option(options: dict[str, Any] | None) -> int | None:
    value = (options or {}).get("num_ctx")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad_option("num_ctx", "must be a positive integer")
    return value


def response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Ollama's `format` as an OpenAI `response_format`: the same grammar path."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise APIError(
        400, 'format must be "json" or a JSON schema object', param="format", code="invalid_value"
    )
