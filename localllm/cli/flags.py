"""Settings as command-line flags, named as llama.cpp users know them.

Every setting of `Settings` is a flag of the commands that use it, generated from the model (so
`--help` and the config file never drift apart). Where llama.cpp has a name for the same thing,
that name is the flag (`--ctx-size/-c`, `--parallel/-np`, `--n-gpu-layers/-ngl`,
`--cache-type-k/-ctk`, `--ubatch-size/-ub`, ...); the setting's own name (`--n-ctx`) and the
older localllm spellings (`--ctx`, `--type-k`, `--margin`) stay as aliases, hidden from `--help`.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from localllm.ggml import CACHE_TYPES
from localllm.settings import Settings, env_name, load_settings

# setting -> (flag shown in --help, short flag or None, hidden aliases)
FLAG_NAMES: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "n_ctx": ("--ctx-size", "-c", ("--ctx", "--n-ctx")),
    "parallel": ("--parallel", "-np", ()),
    "n_gpu_layers": ("--n-gpu-layers", "-ngl", ("--gpu-layers",)),
    "type_k": ("--cache-type-k", "-ctk", ("--type-k",)),
    "type_v": ("--cache-type-v", "-ctv", ("--type-v",)),
    "flash_attn": ("--flash-attn", "-fa", ()),
    "n_ubatch": ("--ubatch-size", "-ub", ("--ubatch", "--n-ubatch")),
    "n_batch": ("--batch-size", "-b", ("--n-batch",)),
    "threads": ("--threads", "-t", ()),
    "gpu_margin_mib": ("--gpu-margin-mib", None, ("--margin",)),
    "model_alias": ("--alias", "-a", ("--model-alias",)),
    "api_keys": ("--api-key", None, ("--api-keys",)),
    "cpu_only": ("--cpu", None, ("--cpu-only",)),
}

# The settings that decide a plan: what fit, models, pull, chat and profile take.
PLAN_SETTINGS = (
    "models_dir",
    "n_ctx",
    "parallel",
    "n_gpu_layers",
    "type_k",
    "type_v",
    "flash_attn",
    "n_ubatch",
    "n_batch",
    "swa_full",
    "ctx_checkpoints",
    "spec_type",
    "spec_draft_model",
    "spec_draft_n_max",
    "spec_ngram_simple_size_n",
    "mmproj",
    "mmproj_offload",
    "threads",
    "gpu_margin_mib",
    "min_speed",
    "max_quality_loss",
    "cpu_only",
    "gpu",
    "vram",
    "rpc",
    "rpc_allow_public",
    "rpc_device",
    "rpc_latency_ms",
    "rpc_bandwidth_mbit",
)


def flag_name(setting: str) -> str:
    """The flag `--help` shows for a setting."""
    return FLAG_NAMES.get(setting, ("--" + setting.replace("_", "-"), None, ()))[0]


def source_name(setting: str, given: set[str]) -> str:
    """How the user set a setting: its flag, its LOCALLLM_* variable, or its config key."""
    if setting in given:
        return flag_name(setting)
    if env_name(setting) in {key.upper() for key in os.environ}:
        return env_name(setting)
    return f"config '{setting}'"


def _flag_type(annotation: Any) -> tuple[str, Callable[[str], Any]]:
    """('bool' | 'list' | 'value', converter) for a settings field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = (
        args[0]
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else annotation
    )
    if base is bool:
        return "bool", str
    if typing.get_origin(base) is list:
        return "list", str
    if base in (int, float, str):
        return "value", base
    if base is Path:
        return "value", Path
    return "value", str  # Literal choices are validated by the settings model


def _default_text(setting: str) -> str:
    field = Settings.model_fields[setting]
    default = field.get_default(call_default_factory=True)
    if default is None or default == []:
        return ""
    if isinstance(default, bool):
        default = "on" if default else "off"
    return f" (default: {default})"


def _flash_attn(text: str) -> bool | str:
    # llama.cpp's -fa takes on/off/auto; 'auto' is the setting left unset.
    value = text.lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    if value == "auto":
        return "auto"
    raise argparse.ArgumentTypeError(f"expected on, off or auto, not {text!r}")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Flags for the settings `names` (all when None), plus --config."""
    group = parser.add_argument_group("settings (also LOCALLLM_* variables and the config file)")
    group.add_argument("--config", type=Path, help="TOML config file to read.")
    wanted = [n for n in (names or Settings.model_fields) if n in Settings.model_fields]
    for name in wanted:
        field = Settings.model_fields[name]
        shown, short, aliases = FLAG_NAMES.get(name, ("--" + name.replace("_", "-"), None, ()))
        own = "--" + name.replace("_", "-")
        hidden = list(dict.fromkeys(a for a in (*aliases, own) if a != shown))
        kind, convert = _flag_type(field.annotation)
        help_text = (field.description or "") + _default_text(name)
        options: dict[str, Any]
        if name == "flash_attn":
            options = {"nargs": "?", "const": True, "type": _flash_attn,
                       "metavar": "on|off|auto"}
            help_text += " (default: auto)"
        elif kind == "bool":  # --x and --no-x: some default to on (--no-models-autoload)
            options = {"action": argparse.BooleanOptionalAction}
        elif kind == "list":
            options = {"type": _csv, "metavar": "A,B"}
            help_text += " (comma-separated)"
        elif name in ("type_k", "type_v"):
            options = {"type": convert, "choices": CACHE_TYPES, "metavar": "TYPE"}
        else:
            metavars: dict[Any, str] = {int: "N", float: "NUMBER", Path: "PATH"}
            metavar = metavars.get(convert, "TEXT")
            options = {"type": convert, "metavar": metavar}
        group.add_argument(shown, *([short] if short else []), dest=name, default=None,
                           help=help_text, **options)
        if hidden:
            group.add_argument(*hidden, dest=name, default=None, help=argparse.SUPPRESS,
                               **options)
        if name == "mmproj":  # llama-server's --no-mmproj
            group.add_argument("--no-mmproj", dest=name, action="store_const", const="off",
                               default=None, help="No vision projector (--mmproj off).")
        if name == "flash_attn":  # --no-flash-attn, as before -fa took a value
            group.add_argument("--no-" + shown.removeprefix("--"), dest=name,
                               action="store_false", default=None, help=argparse.SUPPRESS)
    if "type_k" in wanted and "type_v" in wanted:
        group.add_argument("--cache-type", choices=CACHE_TYPES, default=None,
                           help="KV cache type for both keys and values.")


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, set[str]]:
    """The settings (flags over env over config file) and the names the flags set."""
    flags = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    names = {name: flag_name(name) for name, value in flags.items() if value is not None}
    both = getattr(args, "cache_type", None)
    for name in ("type_k", "type_v"):
        if both is not None and flags.get(name) is None:
            flags[name], names[name] = both, "--cache-type"
    if flags.get("flash_attn") == "auto":
        flags["flash_attn"] = None
    given = {name for name, value in flags.items() if value is not None}
    settings = load_settings(getattr(args, "config", None), names, **flags)
    return settings, given
