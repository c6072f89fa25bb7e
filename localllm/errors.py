"""The exceptions localllm raises, and nothing else.

    LocalLLMError                 base: every error localllm raises on purpose
    ├── GGUFError                 a file is not a readable GGUF (names the file and the problem)
    ├── ModelNotFoundError        a model name or path resolves to nothing
    ├── DoesNotFitError           no plan fits the hardware (bytes needed vs available)
    ├── HardwareProbeError        NVML / host probing failed in a way the user must hear about
    ├── ModelLoadError            llama.cpp refused to load a model or create a context
    ├── ModelCrashedError         a model's worker process died; its requests end with this
    ├── SettingsError             a config file, env var or flag has a bad key or value
    ├── HubError                  the model hub could not answer (missing repo, auth, disk)
    │   └── HubUnreachableError   the network or the hub is down (cached data may do)
    ├── BenchError                `localllm bench` cannot run as asked (e.g. a non-local target)
    ├── RpcError                  a llama.cpp RPC host (rpc-server) problem, naming the host
    │   ├── RpcAddressError       a public address, refused: RPC is unauthenticated
    │   ├── RpcUnreachableError   no answer: down, firewalled, or busy with another client
    │   ├── RpcProtocolError      not an rpc-server of this build's protocol version
    │   └── RpcHostLostError      a host went away while the model was loaded on it
    ├── ServerError               a server `localllm chat --url` talks to failed or is unreachable
    ├── RequestError              a client request the engine cannot serve
    │   ├── ChatTemplateError            the chat template refused the messages, or is hostile
    │   ├── ContextLengthExceededError   prompt (+ max_tokens) longer than a slot's context
    │   ├── QueueFullError               every slot busy and the wait queue full
    │   ├── EmbeddingsNotSupportedError  embeddings asked of a model that has none (a reranker)
    │   ├── GenerationNotSupportedError  chat or completion asked of an embedding-only model
    │   ├── CancelledError               the client went away or the server is stopping
    │   ├── RequestTimeoutError          the request ran past request_timeout_s
    │   └── UnsupportedSchemaError       a JSON Schema keyword a grammar cannot enforce
    └── APIError                  the HTTP layer refuses a request itself (status, type, code)
        └── BodyTooLargeError     the body is over max_body_bytes

Every message says what to do next. The CLI turns these into one line and an exit code; the
HTTP layer maps the classes (never the text) to OpenAI error envelopes (`server/errors.py`).
"""

from __future__ import annotations


class LocalLLMError(Exception):
    """Base of every error localllm raises on purpose."""


class GGUFError(LocalLLMError):
    """A file is not a GGUF localllm can read."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ModelNotFoundError(LocalLLMError):
    """A model name or path resolves to nothing."""


class DoesNotFitError(LocalLLMError):
    """No configuration of the model fits the hardware."""

    def __init__(self, message: str, needed_bytes: int = 0, available_bytes: int = 0) -> None:
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        super().__init__(message)


class HardwareProbeError(LocalLLMError):
    """Probing the GPU or host failed."""


class ModelLoadError(LocalLLMError):
    """llama.cpp could not load the model or create its context."""


class ModelCrashedError(LocalLLMError):
    """The worker process of a loaded model died (llama.cpp aborted, or it was killed)."""


class SettingsError(LocalLLMError):
    """A setting has an unknown key or a bad value."""


class HubError(LocalLLMError):
    """The model hub could not be reached or did not have what was asked for."""


class HubUnreachableError(HubError):
    """The hub could not be reached at all; what is cached may still answer."""


class BenchError(LocalLLMError):
    """The load test cannot run as asked."""


class RpcError(LocalLLMError):
    """A llama.cpp RPC host (rpc-server) could not be used; `endpoint` names it."""

    def __init__(self, endpoint: str, problem: str) -> None:
        self.endpoint = endpoint
        self.problem = problem
        super().__init__(f"RPC host {endpoint}: {problem}")


class RpcAddressError(RpcError):
    """A host with a public address, refused because the RPC protocol is unauthenticated."""


class RpcUnreachableError(RpcError):
    """A host did not answer: down, firewalled, or serving another client."""


class RpcProtocolError(RpcError):
    """A host answered, but not as an rpc-server of this build's protocol version."""


class RpcHostLostError(RpcError):
    """A host went away while the model was loaded on it; the engine cannot go on."""


class ServerError(LocalLLMError):
    """A server the CLI talks to (`chat --url`) could not be reached or refused the request."""


class RequestError(LocalLLMError):
    """A request the engine cannot serve as asked."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class ChatTemplateError(RequestError):
    """The chat template refused the messages, or is broken or hostile."""


class ContextLengthExceededError(RequestError):
    """The prompt, plus the tokens asked for, does not fit a slot's context."""


class QueueFullError(RequestError):
    """Every slot is busy and the wait queue is full."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class EmbeddingsNotSupportedError(RequestError):
    """An embeddings request to a model that cannot produce embedding vectors."""


class GenerationNotSupportedError(RequestError):
    """A chat or completion request to a model that only embeds."""


class CancelledError(RequestError):
    """The request was cancelled: the client disconnected or the server is stopping."""


class RequestTimeoutError(RequestError):
    """The request was still queued or running at its deadline (request_timeout_s)."""


class APIError(LocalLLMError):
    """A request the HTTP layer answers itself (auth, body size, bad JSON, loading): it carries
    the status and the OpenAI envelope's type, code and param."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(retry_after_s)


class BodyTooLargeError(APIError):
    """The request body is larger than max_body_bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"request body is larger than {limit} bytes (max_body_bytes)",
            code="request_too_large",
        )


class UnsupportedSchemaError(RequestError):
    """A JSON Schema (response_format or a tool's parameters) uses a keyword that a grammar
    cannot enforce; refused rather than silently ignored."""
