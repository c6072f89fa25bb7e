"""OpenAI-compatible request and response bodies (the subset localllm serves).

Requests forbid nothing extra (clients send many optional fields we ignore) but validate the
fields we use strictly: `"stream": "yes"` is not a boolean and `1e999` is not a finite number.
Responses are plain pydantic models serialised with `model_dump(exclude_none=...)`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from localllm.vision.images import MEDIA_MARKER


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # An assistant's calls ({"id", "type": "function", "function": {"name", "arguments"}}) and
    # a tool result's call id; checked by localllm.tools.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # An earlier answer's reasoning, given back to the template (as llama-server takes it).
    reasoning_content: str | None = None

    def text(self) -> str:
        """The content as one string: text parts joined, each image part as the media marker
        (where the engine puts the image: `localllm.server.images` reads them), others refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") == "image_url":
                parts.append(MEDIA_MARKER)
                continue
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text and image_url content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str = "schema"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


Stop = str | list[str] | None
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0)]


class _Sampling(_Request):
    model: str | None = None
    max_tokens: int | None = None  # -1: no limit but the slot's context (llama-server's)
    # None: the engine's defaults (llama-server's: 0.8, 0.95, 40, 0.05).
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    logit_bias: Annotated[dict[str, LogitBias], Field(max_length=1024)] | None = None
    stop: Stop = None
    seed: int | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # Ollama's: how long the model stays loaded after this request ("5m", 0, -1); folder only.
    keep_alive: str | int | float | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        if value == -1:
            return None
        if value is not None and value < 1:
            raise ValueError("must be at least 1, or -1 for as many as the context allows")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Stop) -> Stop:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # Function tools; checked (names, schemas a grammar can enforce) by localllm.tools.
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Reasoning (localllm.tools.reasoning checks them, naming the field): "auto"/"deepseek"
    # split it into reasoning_content, "none" leaves it in content; gpt-oss's effort; more
    # variables for the chat template ({"enable_thinking": false}).
    reasoning_format: Any = None
    reasoning_effort: Any = None
    chat_template_kwargs: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False


class TokenizeRequest(_Request):
    content: str
    add_special: bool = False
    parse_special: bool = True


class DetokenizeRequest(_Request):
    tokens: list[int]


EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_Request):
    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    keep_alive: str | int | float | None = None  # Ollama's, as for chat; folder only

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: EmbeddingInput) -> EmbeddingInput:
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be an empty string")
        elif not value:
            raise ValueError("input must not be an empty list")
        elif any(isinstance(item, str | list) and not item for item in value):
            raise ValueError("input must not hold an empty string or an empty token list")
        elif len(value) > 2048:
            raise ValueError("input holds more than 2048 entries (OpenAI's limit)")
        return value

    def inputs(self) -> list[str | list[int]]:
        """One entry per vector to compute."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, int) for item in value):
            return [[int(item) for item in value if isinstance(item, int)]]  # one token list
        return [item for item in value if isinstance(item, str | list)]


class ModelActionRequest(_Request):
    """POST /models/load and /models/unload, as llama-server's router takes them."""

    model: str
    keep_alive: str | int | float | None = None


# Responses.


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprobBody(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobBody(TopLogprobBody):
    top_logprobs: list[TopLogprobBody]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobBody]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class FunctionCallBody(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallBody(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallBody


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallBody] | None = None

    @model_serializer(mode="wrap")
    def _content_always(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI writes "content": null next to tool calls; exclude_none would drop it.
        data: dict[str, Any] = handler(self)
        data.setdefault("content", None)
        return data


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody
    localllm: dict[str, Any] | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaBody(BaseModel):
    """A piece of a streamed call: index, id, type and name first, then argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDeltaBody] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageBody | None = None
    localllm: dict[str, Any] | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBody | None = None
    localllm: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "localllm"
    # llama-server's router status: {"value": "loaded" | "loading" | "unloaded"}, and after a
    # crash "failed" and "exit_code"
    status: dict[str, Any] = {"value": "loaded"}
    localllm: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
