"""One settings model, three sources.

Precedence, highest first: command-line flags (passed as keyword arguments), environment variables
`LOCALLLM_<NAME>`, the TOML config file, the defaults below. The config file is the one named by
`--config` / `LOCALLLM_CONFIG`, else the first of `/etc/localllm/config.toml` (the service) and the
user's `~/.config/localllm/config.toml` that exists. Unknown keys and bad values fail at start,
naming the key.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from localllm.errors import SettingsError
from localllm.ggml import CacheType
from localllm.hardware import parse_gpu_names, parse_vram
from localllm.models import DEFAULT_MODEL

ENV_PREFIX = "LOCALLLM_"
SYSTEM_CONFIG = Path("/etc/localllm/config.toml")
USER_CONFIG = Path("~/.config/localllm/config.toml").expanduser()



def _default_models_dir() -> Path:
    # A source checkout keeps its models next to the code (the README's commands); an installed
    # package keeps them in the user's data folder.
    checkout_models = Path(__file__).resolve().parent.parent / "models"
    if checkout_models.is_dir() and os.access(checkout_models, os.W_OK):
        return checkout_models
    data_home = Path(os.environ.get("XDG_DATA_HOME", "~/.local/share")).expanduser()
    return data_home / "localllm" / "models"


def default_config_path() -> Path | None:
    """The config file in force when none is named: the service's, else the user's, else none."""
    named = os.environ.get(ENV_PREFIX + "CONFIG")
    if named:
        return Path(named)
    for candidate in (SYSTEM_CONFIG, USER_CONFIG):
        if candidate.is_file():
            return candidate
    return None


class Settings(BaseSettings):
    """Everything a user can set. Field descriptions double as `--help` and config docs."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        validate_default=True,
        allow_inf_nan=False,  # every number finite: "inf" or "nan" in a config is a usage error
    )

    # Where and what to serve.
    host: str = Field(
        "127.0.0.1",
        description="Address to bind; loopback by default. OLLAMA_HOST's form HOST:PORT (or "
        "http://HOST:PORT) sets the port too, e.g. 127.0.0.1:11434 for Ollama's.",
    )
    port: int = Field(
        8080, ge=0, le=65535, description="TCP port to listen on (0 picks a free one)."
    )
    models_dir: Path = Field(
        default_factory=_default_models_dir, description="Folder holding the GGUF models."
    )
    model: str | None = Field(
        None, description="Model to serve: a file, a name in models_dir, or ORG/REPO[:QUANT]."
    )
    model_alias: str | None = Field(
        None, description="Name clients use for the model (default: the file's stem)."
    )
    default_model: str = Field(
        DEFAULT_MODEL,
        description="Model used where none is named (serve's first model, chat, inspect, fit, "
        "profile): a name in models_dir or a file. The embedded SmolLM2-135M-Instruct answers "
        "questions; 'gemma-3-270m-q4_k_m', the embedded base model, continues text.",
    )

    # Many models (`serve` over the models folder): which stay loaded, for how long.
    models_max: int = Field(
        4, ge=1, le=64, description="Most models loaded at once (llama-server's --models-max)."
    )
    models_autoload: bool = Field(
        True, description="Load a model when a request names it (else only POST /models/load)."
    )
    load_on_start: bool = Field(
        True, description="Load the model named by `model` (or the default one) at start."
    )
    keep_alive: str = Field(
        "5m",
        description="How long an idle model stays loaded, as Ollama's keep_alive: '5m', '1h', "
        "'30s'; '0' unloads after each answer, '-1' never.",
    )
    pinned_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Models never unloaded, by idle time or for memory."
    )
    models_memory_limit: str | None = Field(
        None,
        description="Host memory all loaded models may use together, e.g. '16GiB' (default: the "
        "RAM available at start). GPU memory follows the cards (or `vram`).",
    )

    # How to load it; None lets the fitter choose.
    n_ctx: int | None = Field(
        None,
        ge=0,
        description="Tokens per conversation (each slot has its own); 0: the model's training "
        "context; unset: up to 32768 with a GPU (8192 on the CPU), shortened only if the GPU "
        "needs it.",
    )
    parallel: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Conversations decoded at once (slots); unset: up to 4, as many as fit.",
    )
    n_gpu_layers: int | None = Field(
        None, ge=-1, description="Layers on the GPU; unset lets the fitter choose, -1 means all."
    )
    type_k: CacheType = Field("f16", description="KV cache type for keys.")
    type_v: CacheType = Field(
        "f16", description="KV cache type for values (quantized needs flash_attn)."
    )
    flash_attn: bool | None = Field(
        None, description="Flash attention; unset lets llama.cpp decide."
    )
    n_ubatch: int = Field(
        512, ge=1, description="Micro-batch size (prompt tokens per compute step)."
    )
    n_batch: int = Field(2048, ge=1, description="Logical batch size.")
    max_decode_stall_ms: float = Field(
        0.0,
        ge=0,
        le=60000,
        description="While streams are generating, feed a long prompt in chunks sized so a "
        "stream waits about this long per token behind it (measured cost per token); 0 (the "
        "default until it is measured on a quiet machine): fixed n_ubatch chunks.",
    )
    swa_full: bool = Field(
        False,
        description="Full-size sliding-window cache (llama-server's --swa-full): more memory; "
        "off, context checkpoints keep prompt reuse.",
    )
    mmproj: str = Field(
        "auto",
        description="Vision projector (llama-server's --mmproj FILE / --no-mmproj): 'auto' "
        "uses the mmproj-*.gguf beside the model, 'off' none, or a path.",
    )
    mmproj_offload: bool = Field(
        True,
        description="Vision projector on the GPU (llama-server's --mmproj-offload); off: host.",
    )
    max_image_bytes: int = Field(
        20_000_000,
        ge=1024,
        description="Largest image a request may carry, in bytes (a base64 image also counts "
        "against max_body_bytes).",
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Most pixels (width x height, from the image header) an image may declare.",
    )
    image_url_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs the server fetches; empty: none (SSRF), "
        "images come inline as data URLs.",
    )
    ctx_checkpoints: int = Field(
        4,
        ge=0,
        le=64,
        description="Context checkpoints per slot for recurrent, hybrid and sliding-window "
        "models (llama-server's --ctx-checkpoints), in host memory; 0: none.",
    )
    spec_type: Literal["none", "auto", "ngram-simple", "draft-simple", "draft-mtp"] = Field(
        "auto",
        description="Speculative decoding (llama-server's --spec-type): guesses verified in one "
        "batch. 'ngram-simple' copies from the conversation, 'draft-simple' asks "
        "spec_draft_model, 'draft-mtp' the model's own MTP (nextn) block, 'auto' (default) "
        "turns ngram-simple on where the fitter predicts a gain (a GPU; never on a CPU alone).",
    )
    spec_draft_model: str | None = Field(
        None,
        description="Draft model for draft-simple (llama-server's --spec-draft-model): a small "
        "GGUF with the same tokenizer.",
    )
    spec_draft_n_max: int = Field(
        16, ge=1, le=256, description="Most tokens guessed per step (--spec-draft-n-max)."
    )
    spec_draft_n_min: int = Field(
        0, ge=0, le=256, description="Fewer guesses are not verified (--spec-draft-n-min)."
    )
    spec_ngram_simple_size_n: int = Field(
        12,
        ge=1,
        le=1024,
        description="Tokens matched to find a guess for ngram-simple (llama-server's "
        "--spec-ngram-simple-size-n).",
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for decoding (default: cores)."
    )
    gpu_margin_mib: int = Field(
        1024, ge=0, description="VRAM per GPU the fitter leaves free, in MiB (llama.cpp's default)."
    )
    min_speed: float = Field(10.0, ge=0, description="Interactive floor in decode tokens/s.")
    max_quality_loss: float | None = Field(
        None,
        ge=0,
        description="Reject quants whose measured loss (mean KLD, `localllm eval`) exceeds this.",
    )
    vram: str | None = Field(
        None, description="Override detected VRAM, e.g. '24GiB' or '24GiB,24GiB' for two cards."
    )
    gpu: str | None = Field(None, description="Plan for a named consumer GPU, e.g. 'rtx4090'.")
    cpu_only: bool = Field(
        False, description="Plan and run on the CPU alone, GPUs or not (--vram 0 means the same)."
    )

    # Other machines' devices, through llama.cpp's rpc-server (unauthenticated: trusted LAN only).
    rpc: str | None = Field(
        None,
        description="llama.cpp rpc-server hosts that take layers, 'HOST:PORT[,HOST:PORT]'; "
        "'HOST:PORT=24GiB' gives a host's memory by hand.",
    )
    rpc_allow_public: bool = Field(
        False, description="Allow an RPC host with a public address (RPC is unauthenticated)."
    )
    rpc_device: str = Field(
        "rtx3090",
        description="What the RPC hosts' devices are, for speed: a card name, or 'cpu'.",
    )
    rpc_latency_ms: float | None = Field(
        None,
        ge=0,
        description="Round trip to the RPC hosts in ms (default: measured, else 0.5).",
    )
    rpc_bandwidth_mbit: float = Field(
        1000, gt=0, description="Network bandwidth to the RPC hosts, Mbit/s."
    )

    # Serving limits.
    queue_size: int = Field(16, ge=0, description="Requests that may wait for a slot before 503.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask.")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, le=86400, description="Longest a request may run."
    )
    reasoning_format: Literal["auto", "none"] = Field(
        "auto",
        description="Reasoning in answers: auto puts it in reasoning_content; none leaves the "
        "model's raw text in content (a request's reasoning_format wins).",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, le=3600, description="On SIGTERM, how long in-flight requests may finish."
    )
    worker_hang_timeout_s: float = Field(
        15.0,
        ge=2,
        le=3600,
        description="Serving a models folder: a worker that sends no heartbeat (one a second) "
        "for this long is killed; its requests fail and the model loads again on demand.",
    )
    header_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A connection must send a whole request head within this long of opening "
        "(or of its previous answer), else it is closed.",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="A request body must arrive whole within this long of its head (408 beyond).",
    )
    idle_timeout_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="An idle keep-alive connection is closed after this long (uvicorn's "
        "timeout_keep_alive).",
    )

    # Security.
    # NoDecode: env vars carry lists as "a,b", split by the validator below, not JSON.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Bearer tokens clients must send (none: no auth)."
    )
    api_key_file: Path | None = Field(None, description="File with one API key per line.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Browser origins allowed to call the API."
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names a loopback bind answers to besides localhost and its address "
        "(others get 403: DNS rebinding).",
    )
    allow_public_bind: bool = Field(
        False, description="Allow a non-loopback bind without an API key (not recommended)."
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )

    @model_validator(mode="before")
    @classmethod
    def _host_with_port(cls, data: Any) -> Any:
        """host 'HOST:PORT' (OLLAMA_HOST's form) -> host and port; a port also given must agree."""
        if not isinstance(data, dict) or not isinstance(data.get("host"), str):
            return data
        host, port = split_host_port(data["host"])
        if port is None:
            return {**data, "host": host}
        given = data.get("port")
        if given is not None and int(given) != port:
            raise ValueError(f"host {data['host']!r} names port {port} but port is {given}")
        return {**data, "host": host, "port": port}

    @field_validator("rpc")
    @classmethod
    def _check_rpc(cls, value: str | None) -> str | None:
        from localllm.rpc import parse_rpc_servers

        try:
            parse_rpc_servers(value)
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("rpc_device")
    @classmethod
    def _check_rpc_device(cls, value: str) -> str:
        from localllm.hardware import lookup_gpu

        if value.lower() != "cpu" and lookup_gpu(value) is None:
            raise ValueError(f"{value!r} is neither 'cpu' nor a known card (e.g. rtx4090)")
        return value

    @field_validator("n_ctx")
    @classmethod
    def _context(cls, value: int | None) -> int | None:
        if value is not None and 0 < value < 256:
            raise ValueError("must be 0 (the model's training context) or at least 256 tokens")
        return value

    @field_validator("vram")
    @classmethod
    def _check_vram(cls, value: str | None) -> str | None:
        # Read here, so a bad size stops every command at start (naming its source), not only
        # the ones that plan; 0 is the CPU alone.
        if value is not None:
            try:
                parse_vram(value, allow_zero=True)
            except SettingsError as exc:  # the source is named by _describe, not as --vram
                raise ValueError(str(exc).removeprefix(f"--vram {value!r} ")) from None
        return value

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_gpu_names(value)
            except SettingsError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator(
        "api_keys", "cors_origins", "allowed_hosts", "pinned_models", "image_url_hosts",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        # Env vars carry lists as "a,b" (or as JSON, which pydantic-settings would expect).
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config = _config_file.get() or default_config_path()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config))
        return tuple(sources)

    def all_api_keys(self) -> list[str]:
        """Keys from the settings and from api_key_file (blank lines and # comments skipped)."""
        keys = list(self.api_keys)
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.read_text()
            except OSError as exc:
                raise SettingsError(f"api_key_file {self.api_key_file}: {exc.strerror}") from exc
            lines = (line.strip() for line in text.splitlines())
            keys += [line for line in lines if line and not line.startswith("#")]
        return keys


# The config file named to load_settings, seen by settings_customise_sources while that call
# builds a Settings (pydantic-settings offers no per-call argument for it).
_config_file: ContextVar[Path | None] = ContextVar("localllm_config_file", default=None)


def load_settings(
    config: Path | None = None, flag_names: Mapping[str, str] | None = None, **flags: Any
) -> Settings:
    """Build the settings from flags (None values mean 'not given'), env and the config file.

    `flag_names` maps a setting to the flag that set it ('n_ctx' -> '--ctx-size'), so an error
    names what the user typed: that flag, the `LOCALLLM_*` variable, or the config file's key.
    """
    if config is not None and not config.is_file():
        raise SettingsError(f"--config: config file {config} does not exist")
    given = {key: value for key, value in flags.items() if value is not None}
    token = _config_file.set(config)
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, config, set(given), flag_names or {})) from None
    except ValueError as exc:  # a TOML syntax error, or a malformed JSON list in an env var
        file = config or default_config_path()
        raise SettingsError(f"{f'config file {file}' if file else 'settings'}: {exc}") from None
    finally:
        _config_file.reset(token)


def env_name(name: str) -> str:
    """The environment variable of a setting: 'n_ctx' -> 'LOCALLLM_N_CTX'."""
    return (ENV_PREFIX + name).upper()


def _describe(
    exc: ValidationError, config: Path | None, given: set[str], flag_names: Mapping[str, str]
) -> str:
    file = config or default_config_path()
    env = {key.upper(): value for key, value in os.environ.items()}
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        if error["type"] == "extra_forbidden":
            near = difflib.get_close_matches(key, list(Settings.model_fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            where = f" in config file {file}" if file and key not in given else ""
            problems.append(f"unknown setting '{key}'{where}{hint}")
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        if key in given:
            source = f"{flag_names.get(key, '--' + key.replace('_', '-'))} {error.get('input')!s}"
        elif env_name(key) in env:
            source = f"{env_name(key)}={env[env_name(key)]}"
        elif file is not None:
            source = f"setting '{key}' = {error.get('input')!r} in config file {file}"
        else:
            source = f"setting '{key}' = {error.get('input')!r}"
        problems.append(f"{source}: {message}")
    return "; ".join(problems)


# Variables of localllm's scripts and tests, not settings: scripts/dev (LOCALLLM_VENV),
# scripts/build-rpc.sh (LOCALLLM_RPC_CACHE), tests/test_rpc.py (LOCALLLM_RPC_BUILD).
_NOT_SETTINGS = frozenset({"LOCALLLM_VENV", "LOCALLLM_RPC_CACHE", "LOCALLLM_RPC_BUILD"}) | {
    # scripts/backend.py's set-up choices (which llama.cpp build ./scripts/dev installs)
    "LOCALLLM_BACKEND", "LOCALLLM_CUDA_ARCH", "LOCALLLM_WHEEL_INDEX",
}


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """`LOCALLLM_*` variables that name no setting (pydantic-settings ignores them silently),
    each with the closest real name, if any."""
    environ = os.environ if environ is None else environ
    known = {env_name(name) for name in Settings.model_fields} | {ENV_PREFIX + "CONFIG"}
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in _NOT_SETTINGS:
            continue
        if upper.startswith("LOCALLLM_TEST_"):  # the test suite's own switches
            continue
        near = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.75)
        found.append((name, near[0] if near else None))
    return found


def setting_sources(
    config: Path | None = None, flags: set[str] | frozenset[str] = frozenset()
) -> dict[str, str]:
    """Where each setting's value came from: 'flag', 'env', 'config' or 'default' (for doctor)."""
    import tomllib

    config = config or default_config_path()
    file_keys: set[str] = set()
    if config is not None and config.is_file():
        file_keys = set(tomllib.loads(config.read_text()))
    env_keys = {key.upper() for key in os.environ}
    result = {}
    for name in Settings.model_fields:
        if name in flags:
            result[name] = "flag"
        elif (ENV_PREFIX + name).upper() in env_keys:
            result[name] = "env"
        elif name in file_keys:
            result[name] = "config"
        else:
            result[name] = "default"
    return result


def split_host_port(text: str) -> tuple[str, int | None]:
    """'HOST', 'HOST:PORT', '[V6]:PORT' or 'http://HOST:PORT' (as OLLAMA_HOST is written) ->
    (host, port or None). A bare IPv6 address (several colons, no brackets) has no port."""
    value = text.strip().removeprefix("http://").rstrip("/")
    if value.startswith("["):
        end = value.find("]")
        if end > 0:
            rest = value[end + 1 :]
            if rest.startswith(":") and rest[1:].isdigit():
                return value[1:end], int(rest[1:])
        return text, None
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        if port.isdigit():
            return host or "127.0.0.1", int(port)
    return text, None
