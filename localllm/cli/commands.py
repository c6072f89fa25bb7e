"""The commands: parse nothing, call the library, print. One function per command."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from localllm.cli.flags import settings_from_args, source_name
from localllm.cli.output import print_json, print_table, progress, warn
from localllm.errors import DoesNotFitError
from localllm.hardware import Hardware, parse_gpu_names, parse_size
from localllm.settings import Settings
from localllm.units import GIB, gib, mib

# Beyond these a --gpu/--vram is legal but unusual enough to say so.
_USUAL_GPUS = 4
_USUAL_GPU_BYTES = 48 * GIB  # more than any consumer card
_DECIMAL_UNIT = re.compile(r"(\d)\s*([kmgt])b\b", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Hardware: what every planning command plans for


def planning_hardware(settings: Settings) -> Hardware:
    """The hardware every command plans for (the one policy, `loading.planning_hardware`); its
    warnings about the llama.cpp build said on stderr."""
    from localllm.loading import planning_hardware as shared

    hardware, warnings = shared(settings)
    for warning in warnings:
        warn(warning)
    return hardware


def hardware_warnings(settings: Settings, given: set[str]) -> list[str]:
    """Legal but unusual --gpu/--vram values, said once before planning, each named as the user
    gave it (the flag, the LOCALLLM_* variable or the config key)."""
    found = []
    if settings.gpu:
        count = len(parse_gpu_names(settings.gpu))
        if count > _USUAL_GPUS:
            found.append(f"{source_name('gpu', given)} {settings.gpu} plans for {count} cards; "
                         f"a desktop holds {_USUAL_GPUS} at most")
    if settings.vram:
        vram = source_name("vram", given)
        parts = [p.strip() for p in settings.vram.split(",") if p.strip()]
        for part in parts:
            size = parse_size(part)
            if size > _USUAL_GPU_BYTES:
                found.append(f"{vram} {part} is {gib(size)} per card, more than any consumer "
                             "GPU (a list of cards is written 24GiB,24GiB)")
            elif 0 < size < GIB:
                bare = part.replace(".", "").isdigit()
                hint = f"; is a unit missing ({part}GiB)?" if bare else " per card"
                found.append(f"{vram} {part} is only {mib(size)}{hint}")
        if len(parts) > _USUAL_GPUS:
            found.append(f"{vram} names {len(parts)} cards; a desktop holds {_USUAL_GPUS} at most")
    return found


# ---------------------------------------------------------------------------------------------
# inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    from localllm.gguf_header import read_header
    from localllm.models import resolve_model

    settings, _ = settings_from_args(args)
    header = read_header(resolve_model(args.model or settings.default_model, settings.models_dir))
    summary = header.summary()
    if args.json:
        print_json(summary)
        return 0
    layer_bytes = header.layer_bytes
    output = "tied to the embedding" if header.output_tied else mib(header.output_bytes, 1)
    non_repeating = f"token embedding {mib(header.token_embd_bytes, 1)}, output {output}"
    rows = [
        ("file", ", ".join(summary["files"])),  # type: ignore[arg-type]
        ("architecture", f"{header.architecture} ({header.name or 'unnamed'})"),
        ("quantization", f"{header.file_type or '?'}, {header.bits_per_weight:.2f} bits/weight"),
        ("parameters", f"{header.n_params / 1e9:.3f} B, {gib(header.total_bytes, 2)} of weights"),
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


# ---------------------------------------------------------------------------------------------
# fit


class _Ladder:
    """What `fit` chooses among: the headers of each model, file sizes and quant labels (as the
    hub or the file names give them: UD-Q4_K_XL and Q4_K_M both declare Q4_K_M) by path."""

    def __init__(self, groups: list[list[Any]], sizes: dict[str, int], labels: dict[str, str]):
        self.groups, self.sizes, self.labels = groups, sizes, labels


def _model_headers(args: argparse.Namespace, settings: Settings) -> _Ladder:
    from localllm.fitter import read_headers
    from localllm.hub import HubClient, RepoRef, looks_like_repo
    from localllm.models import group_by_model, ladder_labels, resolve_model

    target = args.model or settings.default_model
    if looks_like_repo(target):
        ref = RepoRef.parse(target, args.revision)
        with progress(f"reading the GGUF headers of {ref.repo_id} (range requests)"):
            pairs = HubClient().read_headers(ref)
        return _Ladder(
            [[header for _, header in pairs]],
            {str(header.path): quant.size for quant, header in pairs},
            {str(header.path): quant.label for quant, header in pairs},
        )
    is_glob = any(ch in target for ch in "*?[")
    if not is_glob and not Path(target).exists():
        target = str(resolve_model(target, settings.models_dir))
    with progress(f"reading GGUF headers in {target}"):
        headers = read_headers(target)
    return _Ladder(
        group_by_model(headers),
        {str(h.path): sum(p.stat().st_size for p in h.paths) for h in headers},
        {str(path): label for path, label in ladder_labels(headers).items()},
    )


def cmd_fit(args: argparse.Namespace) -> int:
    from localllm.fitter import FitRequest, fit

    settings, given = settings_from_args(args)
    for warning in hardware_warnings(settings, given):
        warn(warning)
    changes: dict[str, Any] = {"objective": args.objective}
    request = FitRequest.from_settings(settings, **changes)
    ladder = _model_headers(args, settings)  # a missing file is said before the machine is probed
    hardware = planning_hardware(settings)
    if len(ladder.groups) > 1:
        return _fit_each_model(ladder.groups, hardware, request, args.json)
    headers = ladder.groups[0]
    plan = fit(headers, hardware, request)
    notes = _unit_notes(settings, headers, request, plan)
    for note in notes:
        warn(note)
    check = _check(plan) if args.check else None
    from localllm.fitter.speculative import describe
    from localllm.loading import draft_memory_warnings, plan_draft_model, plan_speculation

    draft_plan = plan_draft_model(settings, hardware, request)
    speculation = plan_speculation(plan, settings, draft_plan)
    for note in draft_memory_warnings(plan, draft_plan) if draft_plan is not None else []:
        warn(note)
    if args.json:
        result = plan.to_dict()
        if speculation is not None:
            result["speculation"] = speculation.to_dict()
            if draft_plan is not None:
                result["speculation"]["draft_model"] = draft_plan.to_dict()
        result["notes"] = list(plan.notes) + notes
        result["hardware"] = _hardware_dict(hardware)
        result["llama_params"] = plan.llama_params()
        result["llama_server_command"] = plan.llama_server_command()
        if len(headers) > 1:
            result["quants"] = _quant_rows(headers, ladder, hardware, request, plan, raw=True)
        if check is not None:
            result["check"] = check
        print_json(result)
        return 0
    from localllm.fitter import format_plan

    print(format_plan(replace(plan, ladder=()) if len(headers) > 1 else plan))
    if speculation is not None:
        print(describe(speculation))
        if draft_plan is not None:
            extra = sum(d.total_bytes for d in draft_plan.devices)
            print(f"draft model {draft_plan.file.name}: {extra / 2**30:.2f} GiB more "
                  f"(weights, KV, compute), {draft_plan.decode_tok_s:.1f} tok/s on its own")
    if len(headers) > 1:
        where = "hub files: headers read by range requests, nothing downloaded" if (
            args.model and not Path(args.model).exists() and "/" in args.model
        ) else "quants"
        print(f"\n{where} (best quality first):")
        rows = _quant_rows(headers, ladder, hardware, request, plan, raw=False)
        print_table(["", "quant", "file size", "GPU layers", "VRAM", "RAM", "tok/s", "verdict"],
                    [[str(v) for v in row.values()] for row in rows], right=(2, 3, 4, 5, 6))
    if check is not None:
        print("\nllama.cpp's own dry run for this plan (its buffers, no weights loaded):")
        print_table(["buffer", "predicted", "llama.cpp", "gap"],
                    [[r["buffer"], mib(r["predicted_bytes"], 1), mib(r["llama_cpp_bytes"], 1),
                      f"{r['gap_percent']:+.1f}%"] for r in check["rows"]], right=(1, 2, 3))
    print(f"\nllama-server equivalent:\n  {plan.llama_server_command()}")
    return 0


def _hardware_dict(hardware: Hardware) -> dict[str, Any]:
    return {
        "gpus": [{"name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes,
                  "source": g.source} for g in hardware.gpus],
        "assumed": hardware.assumed,
        "notes": list(hardware.notes),
    }


def _quant_rows(
    headers: list[Any], ladder: _Ladder, hardware: Hardware, request: Any, plan: Any, raw: bool
) -> list[dict[str, Any]]:
    """Each quant of the ladder planned alone: its size, layers, VRAM and speed, and why it was
    or was not chosen."""
    from localllm.fitter import fit_header, quant_name

    reasons = dict(plan.rejected)  # by the plan's ladder label, one per file
    plan_labels = dict(zip(plan.ladder_files, plan.ladder, strict=True))
    rows = []
    for header in sorted(headers, key=lambda h: h.bits_per_weight, reverse=True):
        path = str(header.path)
        label = plan_labels.get(path) or ladder.labels.get(path) or quant_name(header)
        chosen = path == str(plan.file)
        size = ladder.sizes.get(str(header.path), header.total_bytes)
        try:
            alone = fit_header(header, hardware, replace(request, max_quality_loss=None))
        except DoesNotFitError:
            alone = None
        verdict = "chosen" if chosen else reasons.get(label, "")
        if raw:
            rows.append({
                "quant": label, "file": str(header.path), "size_bytes": size, "chosen": chosen,
                "n_gpu_layers": alone.n_gpu_layers if alone else None,
                "gpu_bytes": sum(d.total_bytes for d in alone.gpus) if alone else None,
                "host_bytes": alone.host.total_bytes if alone else None,
                "decode_tok_s": round(alone.decode_tok_s, 1) if alone else None,
                "verdict": verdict,
            })
            continue
        rows.append({
            "mark": "->" if chosen else "", "quant": label, "size": f"{size / 1e9:.2f} GB",
            "layers": f"{alone.n_gpu_layers}/{alone.n_layer + 1}" if alone else "-",
            "vram": gib(sum(d.total_bytes for d in alone.gpus)) if alone else "-",
            "ram": gib(alone.host.total_bytes) if alone else "-",
            "tok_s": f"{alone.decode_tok_s:.1f}" if alone else "-",
            "verdict": verdict.split(":")[0] if verdict.startswith("does not fit") else verdict,
        })
    return rows


def _binary_vram(settings: Settings) -> Settings | None:
    """The settings with --vram's decimal units read as binary ('24GB' -> '24GiB'), or None
    when --vram has no decimal unit."""
    vram = settings.vram
    if not vram or not _DECIMAL_UNIT.search(vram):
        return None
    return settings.model_copy(update={"vram": _DECIMAL_UNIT.sub(r"\1\2iB", vram)})


def _unit_note(settings: Settings, binary: Settings, other_choice: str) -> str:
    vram = settings.vram or ""
    sizes = ", ".join(gib(parse_size(p), 1) for p in vram.split(",") if p.strip())
    return (
        f"--vram {vram} is {sizes} (GB = 10^9 bytes; a card sold as '24 GB' has 24 GiB): with "
        f"--vram {binary.vram} the choice would be {other_choice}"
    )


def _unit_notes(settings: Settings, headers: list[Any], request: Any, plan: Any) -> list[str]:
    """'24GB' is 22.4 GiB: say so when reading it as GiB would change the plan."""
    from localllm.fitter import fit
    from localllm.hardware import hardware_for

    binary = _binary_vram(settings)
    if binary is None:
        return []
    try:
        other = fit(headers, hardware_for(binary), request)
    except DoesNotFitError:
        return []
    if (other.quant, other.n_gpu_layers) == (plan.quant, plan.n_gpu_layers):
        return []
    layers = f"{other.n_gpu_layers}/{other.n_layer + 1} layers on the GPU"
    return [_unit_note(settings, binary, f"{other.quant} with {layers}")]


def _check(plan: Any) -> dict[str, Any]:
    """llama.cpp's dry run (no_alloc) for the plan, against the fitter's figures per buffer."""
    from localllm.loading import check_plan

    with progress("llama.cpp dry run (no_alloc: nothing read or allocated)"):
        rows = check_plan(plan)
    return {
        "file": str(plan.file),
        "rows": [
            {"buffer": row.what, "predicted_bytes": row.predicted_bytes,
             "llama_cpp_bytes": row.llama_cpp_bytes, "gap_percent": round(row.gap_percent, 1)}
            for row in rows
        ],
    }


def _fit_each_model(groups: list[Any], hardware: Hardware, request: Any, as_json: bool) -> int:
    """`fit FOLDER` holding several models: one choice per model, each among its own quants."""
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
        print_json({"models": results})
    else:
        print("\n\n".join(texts))
    return 0


# ---------------------------------------------------------------------------------------------
# The other commands


def cmd_profile(args: argparse.Namespace) -> int:
    from localllm.models import resolve_model
    from localllm.profile import format_profile, profile_model

    settings, _ = settings_from_args(args)
    path = resolve_model(args.model or settings.default_model, settings.models_dir)
    with progress(f"loading {path.name} and generating {args.tokens} tokens"):
        report = profile_model(path, settings, args.tokens)
    if args.json:
        print_json(report.to_dict())
    else:
        print(format_profile(report))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from localllm.server.run import serve

    settings, given = settings_from_args(args)
    if args.model:
        settings = settings.model_copy(update={"model": args.model})
    for warning in hardware_warnings(settings, given):
        warn(warning)
    serve(settings)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from localllm.doctor import doctor_report, format_doctor
    from localllm.settings import default_config_path

    settings, given = settings_from_args(args)
    report = doctor_report(settings, args.config or default_config_path(), given)
    if args.json:
        print_json(report.to_dict())
    else:
        print(format_doctor(report))
    return 0 if report.ok else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from localllm.models import resolve_model
    from localllm.quality import evaluate, format_quality

    settings, _ = settings_from_args(args)
    models = [resolve_model(name, settings.models_dir) for name in args.models]
    text = _read_text(args.text, "--text") if args.text else None
    reference = resolve_model(args.reference, settings.models_dir) if args.reference else None
    with progress(f"scoring {len(models)} model(s) on {args.text or 'the built-in text'}"):
        results = evaluate(
            models, text, n_ctx=args.ctx, threads=settings.threads, reference=reference
        )
    if args.json:
        print_json([asdict(r) for r in results])
    else:
        print(format_quality(results))
    return 0


def _read_text(path: Path, flag: str) -> str:
    from localllm.errors import LocalLLMError

    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise LocalLLMError(f"{flag} {path}: {reason}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from localllm.loadtest import format_bench, plot_bench, require_chart_support, run_bench

    if args.chart:
        require_chart_support()  # before minutes of load, not after
    with progress(f"load test of {args.url}"):
        result = run_bench(
            args.url,
            concurrency=args.concurrency,
            prompt_words=args.prompt_words,
            max_tokens=args.max_tokens,
            requests_per_point=args.requests,
            time_limit_s=args.time_limit,
            model=args.model,
            api_key=args.api_key,
            allow_remote=args.allow_remote,
        )
    if args.json:
        print_json(result.to_dict())
    else:
        print(format_bench(result))
    if args.chart:
        print(f"chart: {plot_bench(result, args.chart)}", file=sys.stderr)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from localllm.pull import pull

    settings, given = settings_from_args(args)
    for warning in hardware_warnings(settings, given):
        warn(warning)
    binary = _binary_vram(settings)
    if binary is not None:  # which file is downloaded may hang on GB vs GiB: say so first
        from localllm.hub import HubClient, RepoRef
        from localllm.pull import recommend

        ref, client = RepoRef.parse(args.repo, args.revision), HubClient()
        chosen, plan = recommend(ref, settings, client)
        other, _ = recommend(ref, binary, client)
        if plan is not None and other.label != chosen.label:
            warn(_unit_note(settings, binary, other.label))
    quiet = args.quiet or not sys.stderr.isatty()
    path = pull(args.repo, settings, revision=args.revision, progress=not quiet)
    print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from localllm.pull import list_models

    settings, given = settings_from_args(args)
    for warning in hardware_warnings(settings, given):
        warn(warning)
    with progress(f"planning each model in {settings.models_dir}"):
        entries = list_models(settings)
    if args.json:
        print_json([asdict(e) for e in entries])
        return 0
    print_table(
        ["model", "size", "quant", "context", "fit on this machine"],
        [[e.name + (" (default)" if e.default else ""), gib(e.size_bytes, 2), e.quant or "?",
          f"{e.n_ctx_train:,}" if e.n_ctx_train else "-", e.error or e.fits]
         for e in entries],
        right=(1, 3),
    )
    print(_default_line(settings, given))
    for e in entries:
        if e.embedded:
            print(f"embedded {e.name}: {e.embedded}")
    return 0


def _default_line(settings: Settings, given: set[str]) -> str:
    """Which model answers where none is named, and why that one."""
    from localllm.models import DEFAULT_MODEL

    if "default_model" in settings.model_fields_set and settings.default_model != DEFAULT_MODEL:
        why = f"set by {source_name('default_model', given)}"
    else:
        why = ("the built-in default: an instruction-tuned model answers a first question, "
               "where a base model only continues the text; set default_model to change it")
    return f"default: {settings.default_model} ({why})"


def cmd_ps(args: argparse.Namespace) -> int:
    from localllm.router.ps import fetch_loaded, format_ps

    rows = fetch_loaded(args.url, args.api_key)
    if args.json:
        print_json(rows)
    else:
        print(format_ps(rows))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from localllm.models import remove_model, resolve_model

    settings, _ = settings_from_args(args)
    path = resolve_model(args.model, settings.models_dir, allow_outside=False)
    for removed in remove_model(path):
        print(f"removed {removed}")
    return 0


def does_not_fit_json(exc: DoesNotFitError) -> dict[str, Any]:
    """The `--json` answer when nothing fits: what was needed, what there is, what to try."""
    message = str(exc)
    # The fitter ends its message with what to try ("...; try a smaller quant, ...").
    advice = re.search(r"(?:^|; )(try .+)$", message)
    return {
        "fits": False,
        "error": "does_not_fit",
        "message": message,
        "needed_bytes": exc.needed_bytes,
        "available_bytes": exc.available_bytes,
        "advice": advice[1] if advice else None,
    }

