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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from localllm.errors import LocalLLMError
from localllm.ggml import CACHE_TYPES
from localllm.settings import Settings, load_settings
from localllm.units import gib, mib

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
    layer_bytes = header.layer_bytes
    output = "tied to the embedding" if header.output_tied else mib(header.output_bytes, 1)
    non_repeating = f"token embedding {mib(header.token_embd_bytes, 1)}, output {output}"
    rows = [
        ("file", ", ".join(summary["files"])),  # type: ignore[arg-type]
        ("architecture", f"{header.architecture} ({header.name or 'unnamed'})"),
        ("quantization", f"{header.file_type or '?'}, {header.bits_per_weight:.2f} bits/weight"),
        (
            "parameters",
            f"{header.n_params / 1e9:.3f} B, {gib(header.total_bytes, 2)} of weights",
        ),
        ("layers", f"{header.n_layer}, {mib(sum(layer_bytes) / len(layer_bytes), 1)} each"),
        ("non-repeating", f"{mib(header.non_repeating_bytes, 1)} ({non_repeating})"),
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


def cmd_fit(args: argparse.Namespace) -> int:
    from localllm.fitter import FitRequest, fit, format_plan
    from localllm.hub import HubClient, RepoRef, looks_like_repo
    from localllm.loading import planning_hardware

    flags = {
        "n_ctx": args.ctx,
        "parallel": args.parallel,
        "n_gpu_layers": args.n_gpu_layers,
        "flash_attn": args.flash_attn,
        "n_ubatch": args.ubatch,
        "gpu_margin_mib": args.margin,
        "min_speed": args.min_speed,
        "vram": args.vram,
        "gpu": args.gpu,
        "rpc": args.rpc,
        "rpc_device": args.rpc_device,
        "max_quality_loss": args.max_quality_loss,
        "models_dir": args.models_dir,
        "type_k": args.cache_type,
        "type_v": args.cache_type,
    }
    settings = load_settings(args.config, **flags)
    changes: dict[str, Any] = {"objective": args.objective}
    if args.swa_full is not None:
        changes["swa_full"] = args.swa_full
    request = FitRequest.from_settings(settings, **changes)
    hardware, _ = planning_hardware(settings)
    sizes: list[tuple[str, int, str, str]] = []
    model: Any
    if args.model and looks_like_repo(args.model):
        pairs = HubClient().read_headers(RepoRef.parse(args.model, args.revision))
        model = [header for _, header in pairs]
        sizes = [
            (q.label, q.size, ", ".join(f.filename for f in q.files), str(header.path))
            for q, header in pairs
        ]
    else:
        from localllm.fitter import read_headers
        from localllm.models import group_by_model, resolve_model

        target = args.model
        is_glob = target is not None and any(ch in target for ch in "*?[")
        if target is None or (not is_glob and not Path(target).exists()):
            target = str(resolve_model(target, settings.models_dir))
        model = target
        if is_glob or Path(target).is_dir():
            groups = group_by_model(read_headers(target))
            if len(groups) > 1:
                return _fit_each_model(groups, hardware, request, args.json)
            model = groups[0]
    plan = fit(model, hardware, request)
    if args.json:
        result = plan.to_dict()
        result["llama_params"] = plan.llama_params()
        result["llama_server_command"] = plan.llama_server_command()
        if sizes:
            result["files"] = [{"quant": q, "size_bytes": n, "files": f} for q, n, f, _ in sizes]
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(format_plan(plan))
    if sizes:
        print("\nrepo files (headers read by range requests; nothing downloaded):")
        width = max(len(quant) for quant, *_ in sizes)
        for quant, size, files, path in sizes:
            mark = "*" if path == str(plan.file) else " "
            print(f" {mark} {quant:<{width}} {size / 1e9:7.2f} GB  {files}")
    print(f"\nllama-server equivalent:\n  {plan.llama_server_command()}")
    return 0


def _fit_each_model(groups: list[Any], hardware: Any, request: Any, as_json: bool) -> int:
    """`fit FOLDER` holding several models: one choice per model, each among its own quants."""
    from localllm.errors import DoesNotFitError
    from localllm.fitter import fit, format_plan
    from localllm.models import model_stem

    results: list[dict[str, Any]] = []
    texts: list[str] = []
    failures: list[DoesNotFitError] = []
    for headers in groups:
        name = model_stem(headers[0].path.name)
        files = [str(h.path) for h in headers]
        try:
            plan = fit(headers, hardware, request)
        except DoesNotFitError as exc:
            failures.append(exc)
            results.append({"model": name, "files": files, "error": str(exc)})
            texts.append(f"== {name} ({len(files)} files)\ndoes not fit: {exc}")
            continue
        results.append({"model": name, "files": files, "plan": plan.to_dict()})
        texts.append(f"== {name} ({len(files)} files)\n{format_plan(plan)}")
    if len(failures) == len(groups):
        raise failures[0]
    if as_json:
        print(json.dumps({"models": results}, indent=2, default=str))
    else:
        print("\n\n".join(texts))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from localllm.models import resolve_model
    from localllm.profile import format_profile, profile_model

    settings, _ = settings_from_args(args)
    report = profile_model(resolve_model(args.model, settings.models_dir), settings, args.tokens)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_profile(report))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from localllm.server.run import serve

    overrides = {"model": args.model} if args.model else {}
    settings, _ = settings_from_args(args)
    if overrides:
        settings = settings.model_copy(update=overrides)
    serve(settings)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from localllm.doctor import doctor_report, format_doctor
    from localllm.settings import default_config_path

    settings, given = settings_from_args(args)
    report = doctor_report(settings, args.config or default_config_path(), given)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_doctor(report))
    return 0 if report.ok else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from localllm.models import resolve_model
    from localllm.quality import evaluate, format_quality

    settings, _ = settings_from_args(args)
    models = [resolve_model(name, settings.models_dir) for name in args.models]
    text = args.text.read_text() if args.text else None
    reference = resolve_model(args.reference, settings.models_dir) if args.reference else None
    results = evaluate(models, text, n_ctx=args.ctx, threads=settings.threads, reference=reference)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(format_quality(results))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from localllm.loadtest import format_bench, plot_bench, require_chart_support, run_bench

    def numbers(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split(","))

    if args.chart:
        require_chart_support()  # before minutes of load, not after

    result = run_bench(
        args.url,
        concurrency=numbers(args.concurrency),
        prompt_words=numbers(args.prompt_words),
        max_tokens=numbers(args.max_tokens),
        requests_per_point=args.requests,
        time_limit_s=args.time_limit,
        model=args.model,
        api_key=args.api_key,
        allow_remote=args.allow_remote,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_bench(result))
    if args.chart:
        print(f"chart: {plot_bench(result, args.chart)}", file=sys.stderr)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from localllm.pull import pull

    settings, _ = settings_from_args(args)
    path = pull(args.repo, settings, revision=args.revision, progress=not args.quiet)
    print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from localllm.pull import format_models, list_models

    settings, _ = settings_from_args(args)
    entries = list_models(settings)
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=2))
    else:
        print(format_models(entries, settings.models_dir))
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from localllm.router.ps import fetch_loaded, format_ps

    rows = fetch_loaded(args.url, args.api_key)
    print(json.dumps(rows, indent=2) if args.json else format_ps(rows))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from localllm.models import remove_model, resolve_model

    settings, _ = settings_from_args(args)
    path = resolve_model(args.model, settings.models_dir, allow_outside=False)
    for removed in remove_model(path):
        print(f"removed {removed}")
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

    fit = commands.add_parser(
        "fit",
        help="Pick the quantization and GPU layers that fit this machine (reads headers only).",
    )
    fit.add_argument(
        "model",
        nargs="?",
        help="GGUF file, folder or glob of quantizations, or ORG/REPO[:QUANT] (default: embedded).",
    )
    fit.add_argument("--json", action="store_true", help="Machine-readable output.")
    fit.add_argument("--config", type=Path, help="TOML config file to read.")
    fit.add_argument("--vram", help="Plan for this much VRAM, e.g. 24GiB or 24GiB,24GiB.")
    fit.add_argument("--gpu", help="Plan for a named card, e.g. rtx4090 or 2xrtx3090.")
    fit.add_argument(
        "--rpc",
        help="llama.cpp rpc-server hosts that take layers too: HOST:PORT[,HOST:PORT]; "
        "HOST:PORT=24GiB gives a host's memory by hand (planning ahead).",
    )
    fit.add_argument(
        "--rpc-device", help="What the RPC hosts lend, for speed: a card (rtx4090) or 'cpu'."
    )
    fit.add_argument("--ctx", type=int, help="Context length (default: training context, capped).")
    fit.add_argument("--parallel", type=int, help="Slots (parallel sequences).")
    fit.add_argument(
        "--cache-type", choices=CACHE_TYPES, help="KV cache type (K and V)."
    )
    fit.add_argument(
        "--flash-attn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Flash attention (default: llama.cpp decides).",
    )
    fit.add_argument("--ubatch", type=int, help="Micro-batch size.")
    fit.add_argument("--margin", type=int, help="VRAM in MiB to leave free per GPU.")
    fit.add_argument("--min-speed", type=float, help="Interactive floor in decode tok/s.")
    fit.add_argument(
        "--objective",
        choices=["balanced", "quality", "speed"],
        default="balanced",
        help="balanced: best quality at interactive speed, preferring full offload.",
    )
    fit.add_argument("--n-gpu-layers", type=int, help="Predict exactly this many GPU layers.")
    fit.add_argument(
        "--swa-full",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Full-size sliding-window cache (llama-cpp-python's default: on).",
    )
    fit.add_argument(
        "--max-quality-loss",
        type=float,
        help="Reject quants whose measured mean KL divergence exceeds this.",
    )
    fit.add_argument("--revision", help="Hub revision (branch, tag or commit).")
    fit.add_argument("--models-dir", type=Path, help="Folder holding the GGUF models.")
    fit.set_defaults(handler=cmd_fit)

    profile = commands.add_parser(
        "profile", help="Load a model as serve would; predicted vs allocated memory per device."
    )
    profile.add_argument("model", nargs="?", help="GGUF file or model name (default: embedded).")
    profile.add_argument("--tokens", type=int, default=32, help="Tokens to generate.")
    profile.add_argument("--json", action="store_true", help="Machine-readable output.")
    add_settings_flags(profile, [n for n in Settings.model_fields if n != "model"])
    profile.set_defaults(handler=cmd_profile)

    serve = commands.add_parser("serve", help="Serve a model over an OpenAI-compatible API.")
    serve.add_argument("model", nargs="?", help="Model to serve (default: the embedded model).")
    add_settings_flags(serve, [n for n in Settings.model_fields if n != "model"])
    serve.set_defaults(handler=cmd_serve)

    doctor = commands.add_parser("doctor", help="What this machine and llama.cpp build can do.")
    doctor.add_argument("--json", action="store_true", help="Machine-readable output.")
    add_settings_flags(doctor)
    doctor.set_defaults(handler=cmd_doctor)

    evaluate = commands.add_parser(
        "eval", help="Perplexity and KL divergence of quantizations on your own text."
    )
    evaluate.add_argument("models", nargs="+", help="GGUF files or model names.")
    evaluate.add_argument("--text", type=Path, help="Text file to score (default: a built-in one).")
    evaluate.add_argument("--reference", help="Model to compare against (default: most bits).")
    evaluate.add_argument("--ctx", type=int, default=256, help="Scoring window in tokens.")
    evaluate.add_argument("--json", action="store_true", help="Machine-readable output.")
    add_settings_flags(evaluate, ["models_dir", "threads"])
    evaluate.set_defaults(handler=cmd_eval)

    bench = commands.add_parser("bench", help="Load-test an OpenAI-compatible server.")
    bench.add_argument("url", nargs="?", default="http://127.0.0.1:8080", help="Server base URL.")
    bench.add_argument("--concurrency", default="1,2,4,8", help="Concurrent streams to sweep.")
    bench.add_argument("--prompt-words", default="64", help="Prompt lengths (words) to sweep.")
    bench.add_argument("--max-tokens", default="64", help="Output lengths to sweep.")
    bench.add_argument("--requests", type=int, help="Requests per point (default 2 x streams).")
    bench.add_argument("--time-limit", type=float, default=60.0, help="Seconds per point at most.")
    bench.add_argument("--model", help="Model name to request (default: the server's first).")
    bench.add_argument("--api-key", help="Bearer token for the server.")
    bench.add_argument("--allow-remote", action="store_true", help="Allow a non-loopback target.")
    bench.add_argument("--chart", type=Path, help="Write a PNG chart here.")
    bench.add_argument("--json", action="store_true", help="Machine-readable output.")
    bench.set_defaults(handler=cmd_bench)

    pull = commands.add_parser("pull", help="Download a quantization from a Hugging Face repo.")
    pull.add_argument("repo", help="ORG/REPO or ORG/REPO:QUANT (default: the one that fits best).")
    pull.add_argument("--revision", help="Branch, tag or commit.")
    pull.add_argument("--quiet", action="store_true", help="No progress bar.")
    add_settings_flags(pull)
    pull.set_defaults(handler=cmd_pull)

    models = commands.add_parser("models", help="The local models and whether each fits.")
    models.add_argument("--json", action="store_true", help="Machine-readable output.")
    add_settings_flags(models)
    models.set_defaults(handler=cmd_models)

    ps = commands.add_parser("ps", help="The models a running server holds, and until when.")
    ps.add_argument("url", nargs="?", default="http://127.0.0.1:8080", help="Server base URL.")
    ps.add_argument("--api-key", help="Bearer token for the server.")
    ps.add_argument("--json", action="store_true", help="Machine-readable output.")
    ps.set_defaults(handler=cmd_ps)

    rm = commands.add_parser("rm", help="Delete a model from the models folder.")
    rm.add_argument("model", help="Model name in the models folder.")
    add_settings_flags(rm, ["models_dir"])
    rm.set_defaults(handler=cmd_rm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # per-request and llama.cpp chatter only with -v
        for noisy in ("httpx", "httpx2", "localllm.llama"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
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
