"""`localllm` command line: parse arguments, call the library, print.

Every setting of `Settings` is also a flag of the commands that use settings (generated from the
model, so `--help` and the config file never drift apart). Errors localllm raises on purpose
become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from localllm.errors import LocalLLMError
from localllm.settings import Settings, load_settings

EXIT_ERROR = 2

Handler = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------
# Settings flags, generated from the settings model


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


def add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    group = parser.add_argument_group("settings (also LOCALLLM_* env vars and the config file)")
    group.add_argument("--config", type=Path, help="TOML config file to read.")
    for name, field in Settings.model_fields.items():
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        kind, convert = _flag_type(field.annotation)
        help_text = field.description or ""
        if kind == "bool":
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif kind == "list":
            group.add_argument(
                flag,
                dest=name,
                default=None,
                help=help_text + " (comma-separated)",
                type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
            )
        else:
            group.add_argument(flag, dest=name, type=convert, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, set[str]]:
    flags = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    given = {name for name, value in flags.items() if value is not None}
    return load_settings(getattr(args, "config", None), **flags), given


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_inspect(args: argparse.Namespace) -> int:
    from localllm.gguf_header import read_header
    from localllm.models import resolve_model

    settings, _ = settings_from_args(args)
    header = read_header(resolve_model(args.model, settings.models_dir))
    summary = header.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    gib = 2**30
    layer_bytes = header.layer_bytes
    output = (
        "tied to the embedding" if header.output_tied else f"{header.output_bytes / 2**20:.1f} MiB"
    )
    non_repeating = f"token embedding {header.token_embd_bytes / 2**20:.1f} MiB, output {output}"
    rows = [
        ("file", ", ".join(summary["files"])),  # type: ignore[arg-type]
        ("architecture", f"{header.architecture} ({header.name or 'unnamed'})"),
        ("quantization", f"{header.file_type or '?'}, {header.bits_per_weight:.2f} bits/weight"),
        (
            "parameters",
            f"{header.n_params / 1e9:.3f} B, {header.total_bytes / gib:.2f} GiB of weights",
        ),
        ("layers", f"{header.n_layer}, {sum(layer_bytes) / len(layer_bytes) / 2**20:.1f} MiB each"),
        ("non-repeating", f"{header.non_repeating_bytes / 2**20:.1f} MiB ({non_repeating})"),
        ("embedding / FFN", f"{header.n_embd} / {summary['n_ff']}"),
        (
            "heads / KV heads",
            f"{summary['n_head']} / {summary['n_head_kv']}, "
            f"head size K {header.n_embd_head_k} V {header.n_embd_head_v}",
        ),
        ("vocabulary", f"{header.n_vocab:,}"),
        ("training context", f"{header.n_ctx_train:,}"),
    ]
    if header.sliding_window:
        n_swa = sum(header.swa_layers)
        rows.append(
            ("sliding window", f"{header.sliding_window} on {n_swa} of {header.n_layer} layers")
        )
    if header.is_moe:
        rows.append(("experts", f"{header.n_expert}, {header.n_expert_used} used per token"))
    rows.append(
        ("chat template", "yes" if header.has_chat_template else "none (a fallback is used)")
    )
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    for warning in header.warnings:
        print(f"warning: {warning}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from localllm.server.run import serve

    overrides = {"model": args.model} if args.model else {}
    settings, _ = settings_from_args(args)
    if overrides:
        settings = settings.model_copy(update=overrides)
    serve(settings)
    return 0


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localllm", description="Fit, serve and run GGUF models on one consumer GPU."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="Show what a GGUF's header says (reads no weights)."
    )
    inspect.add_argument("model", nargs="?", help="GGUF file or model name (default: embedded).")
    inspect.add_argument("--json", action="store_true", help="Machine-readable output.")
    add_settings_flags(inspect, ["models_dir"])
    inspect.set_defaults(handler=cmd_inspect)

    serve = commands.add_parser("serve", help="Serve a model over an OpenAI-compatible API.")
    serve.add_argument("model", nargs="?", help="Model to serve (default: the embedded model).")
    add_settings_flags(serve, [n for n in Settings.model_fields if n != "model"])
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except LocalLLMError as exc:
        print(f"localllm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
