"""`localllm` command line: parse arguments, call the library, print.

    flags      settings as flags, named as llama.cpp names them (aliases kept, hidden)
    commands   one function per command
    chat       `localllm chat`: a terminal conversation, in-process or against a server
    output     JSON, rich tables, stderr warnings and progress (only on a terminal)

Exit codes: 0 done, 1 a runtime failure, 2 a usage error (a bad flag, setting, variable or config
key, named in the message), 3 the model does not fit (with `--json`, a JSON object on stdout
saying what was needed and what there is), 130 interrupted. Every failure is one line on stderr;
`-v` adds the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import traceback
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from localllm.cli import commands
from localllm.cli.flags import PLAN_SETTINGS, add_settings_flags
from localllm.cli.output import print_json, warn
from localllm.engine.build import REPACK_LOGGER
from localllm.errors import DoesNotFitError, LocalLLMError, SettingsError
from localllm.settings import Settings, unknown_env_vars

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]

__all__ = ["build_parser", "main"]


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "(default" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and text != argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, naming the flag, and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number above 0, not {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, not {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected numbers like 1,2,4")
    return tuple(_positive_int(p.strip()) for p in parts)


FIT_ORDER = (
    "The default plan (balanced, no --ctx-size, a GPU): 1. context first: up to 32768 tokens per "
    "conversation (or the training context if smaller; 8192 on the CPU alone), all on the GPU; "
    "2. the highest quant of 4+ bits that keeps that context on the GPU; 3. only when none does, "
    "a shorter context (halved, not below 8192) with each quant in turn before the next quant "
    "down; then quants below 4 bits; then contexts down to 4096; 4. last, layers or MoE experts "
    "move to host memory. More parallel slots are added while they fit beside a full context each."
)


def _command(
    commands_: Any, name: str, help_text: str, handler: Handler
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands_.add_parser(
        name, help=help_text, description=help_text, formatter_class=_HelpFormatter
    )
    # -v after the command too; SUPPRESS keeps the top-level value when it is not given here.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="Debug logging, and the traceback of an unexpected error.")
    parser.set_defaults(handler=handler)
    return parser


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Machine-readable output on stdout.")


def build_parser() -> argparse.ArgumentParser:
    from localllm.cli.chat import cmd_chat

    parser = _Parser(
        prog="localllm",
        description="Fit, serve and chat with GGUF models on one consumer GPU.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"localllm {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="Debug logging, and the traceback of an unexpected error.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    every_setting = [n for n in Settings.model_fields if n != "model"]

    inspect = _command(sub, "inspect", "Show what a GGUF's header says (reads no weights).",
                       commands.cmd_inspect)
    inspect.add_argument("model", nargs="?",
                         help="GGUF file or model name (default: the default_model setting).")
    _json_flag(inspect)
    add_settings_flags(inspect, ["models_dir"])

    fit = _command(
        sub, "fit", "Pick the quantization and GPU layers that fit this machine (headers only).",
        commands.cmd_fit,
    )
    fit.add_argument(
        "model",
        nargs="?",
        help="GGUF file, folder or glob of quantizations, or ORG/REPO[:QUANT] (default: the "
        "default_model setting).",
    )
    fit.epilog = FIT_ORDER
    _json_flag(fit)
    fit.add_argument("--objective", choices=["balanced", "quality", "speed"], default="balanced",
                     help="balanced: the desktop order below; quality: the best quant that meets "
                     "the speed floor, partial offload allowed; speed: the fastest plan.")
    fit.add_argument("--check", action="store_true",
                     help="Also run llama.cpp's own dry run for the plan and compare its buffers.")
    fit.add_argument("--revision", help="Hub revision (branch, tag or commit).")
    add_settings_flags(fit, PLAN_SETTINGS)

    models = _command(sub, "models", "The local models and how each would run here.",
                      commands.cmd_models)
    _json_flag(models)
    add_settings_flags(models, PLAN_SETTINGS)

    pull = _command(sub, "pull", "Download a quantization from a Hugging Face repo.",
                    commands.cmd_pull)
    pull.add_argument("repo", help="ORG/REPO or ORG/REPO:QUANT (default: the one that fits best).")
    pull.add_argument("--revision", help="Branch, tag or commit.")
    pull.add_argument("--quiet", action="store_true", help="No progress bar.")
    add_settings_flags(pull, PLAN_SETTINGS)

    ps = _command(sub, "ps", "The models a running server holds, where, and until when.",
                  commands.cmd_ps)
    ps.add_argument("url", nargs="?", default="http://127.0.0.1:8080", help="Server base URL.")
    ps.add_argument("--api-key", help="Bearer token for the server.")
    _json_flag(ps)

    rm = _command(sub, "rm", "Delete a model from the models folder.", commands.cmd_rm)
    rm.add_argument("model", help="Model name in the models folder.")
    add_settings_flags(rm, ["models_dir"])

    chat = _command(sub, "chat", "Chat with a model in the terminal (/bye or Ctrl-D to end).",
                    cmd_chat)
    chat.add_argument("model", nargs="?",
                      help="Model name, file or ORG/REPO[:QUANT] (default: the default_model "
                      "setting); with --url, the model name the server knows.")
    chat.add_argument("--url", help="Talk to a running OpenAI-compatible server instead.")
    chat.add_argument("--api-key", dest="chat_api_key",
                      help="Bearer token for --url (default: $OPENAI_API_KEY).")
    chat.add_argument("--system", help="System prompt.")
    chat.add_argument("--max-tokens", type=_positive_int, default=512,
                      help="Longest answer, in tokens.")
    chat.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature.")
    chat.add_argument("--seed", type=int, help="Sampling seed, for repeatable answers.")
    add_settings_flags(chat, PLAN_SETTINGS)

    serve = _command(sub, "serve", "Serve a model over an OpenAI-compatible API.",
                     commands.cmd_serve)
    serve.add_argument("model", nargs="?",
                       help="One model to serve for the server's life: a file, a name or "
                       "ORG/REPO[:QUANT] (default: every model in the models folder, each loaded "
                       "when a request names it; default_model loads first and answers requests "
                       "that name none).")
    add_settings_flags(serve, every_setting)

    doctor = _command(sub, "doctor", "What this machine and llama.cpp build can do, and fixes.",
                      commands.cmd_doctor)
    _json_flag(doctor)
    add_settings_flags(doctor)

    profile = _command(sub, "profile",
                       "Load a model as serve would; predicted vs allocated memory per device.",
                       commands.cmd_profile)
    profile.add_argument("model", nargs="?",
                         help="GGUF file or model name (default: the default_model setting).")
    profile.add_argument("--tokens", type=_positive_int, default=32, help="Tokens to generate.")
    _json_flag(profile)
    add_settings_flags(profile, PLAN_SETTINGS)

    evaluate = _command(sub, "eval", "Perplexity and KL divergence of quantizations on your text.",
                        commands.cmd_eval)
    evaluate.add_argument("models", nargs="+", help="GGUF files or model names.")
    evaluate.add_argument("--text", type=Path, help="Text file to score (default: a built-in one).")
    evaluate.add_argument("--reference", help="Model to compare against (default: most bits).")
    evaluate.add_argument("--ctx-size", "-c", "--ctx", dest="ctx", type=_positive_int, default=256,
                          help="Scoring window in tokens.")
    _json_flag(evaluate)
    add_settings_flags(evaluate, ["models_dir", "threads"])

    bench = _command(sub, "bench", "Load-test an OpenAI-compatible server.", commands.cmd_bench)
    bench.add_argument("url", nargs="?", default="http://127.0.0.1:8080", help="Server base URL.")
    bench.add_argument("--concurrency", type=_int_list, default=(1, 2, 4, 8),
                       help="Concurrent streams to sweep, e.g. 1,2,4,8.")
    bench.add_argument("--prompt-words", type=_int_list, default=(64,),
                       help="Prompt lengths (words) to sweep.")
    bench.add_argument("--max-tokens", type=_int_list, default=(64,),
                       help="Output lengths to sweep.")
    bench.add_argument("--requests", type=_positive_int,
                       help="Requests per point (default: 2 x streams).")
    bench.add_argument("--time-limit", type=_positive_float, default=60.0,
                       help="Seconds per point at most.")
    bench.add_argument("--model", help="Model name to request (default: the server's first).")
    bench.add_argument("--api-key", help="Bearer token for the server.")
    bench.add_argument("--allow-remote", action="store_true", help="Allow a non-loopback target.")
    bench.add_argument("--chart", type=Path, help="Write a PNG chart here.")
    _json_flag(bench)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("localllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Formatter(logging.Formatter):
    """'localllm: message' for information, 'localllm: warning: message' above it."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"localllm: {record.levelname.lower()}: {text}"
        return f"localllm: {text}"


def _configure_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if args.command == "serve":  # a service's log: timestamps and logger names
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # per-request and llama.cpp chatter only with -v
        for noisy in ("httpx", "httpx2", "httpcore", "localllm.llama"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose and args.command != "serve":  # machine facts: the serve log, -v, doctor
        logging.getLogger(REPACK_LOGGER).setLevel(logging.WARNING)


def _warn_unknown_env() -> None:
    for name, near in unknown_env_vars():
        hint = f" (did you mean {near}?)" if near else ""
        warn(f"{name} is not a localllm setting and is ignored{hint}")


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    _warn_unknown_env()
    handler: Handler = args.handler
    try:
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handling below
        return code
    except DoesNotFitError as exc:
        if getattr(args, "json", False):
            print_json(commands.does_not_fit_json(exc))
        _error(f"does not fit: {exc}" if "does not fit" not in str(exc) else str(exc))
        return EXIT_DOES_NOT_FIT
    except SettingsError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except LocalLLMError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except OSError as exc:  # a file or socket the user named: say which, without a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"{where}{exc.strerror or exc}")
        return EXIT_FAILURE
    except Exception as exc:  # a bug: one line, and the traceback with -v
        if args.verbose:
            traceback.print_exc()
        _error(f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)")
        return EXIT_FAILURE


def _error(message: str) -> None:
    print(f"localllm: error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly; point stdout at /dev/null so the
        # interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
