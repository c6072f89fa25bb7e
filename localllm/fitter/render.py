"""A plan as text: aligned for the CLI (`--json` prints `Plan.to_dict()`), one line for logs."""

from __future__ import annotations

from localllm.fitter.records import Plan
from localllm.units import gib, mib


def _gib(n_bytes: int) -> str:
    return gib(n_bytes, digits=2, unit=False)


def format_plan(plan: Plan) -> str:
    lines = [f"Plan: {plan.quant}  ({plan.file})"]
    gpu = "GPUs and RPC hosts" if plan.rpc_servers else "GPU"
    if not plan.gpus:
        offload = "on the CPU (no GPU in this plan)"
    elif plan.full_offload:
        offload = f"all layers on the {gpu}"
    else:
        offload = f"{plan.n_gpu_layers}/{plan.n_layer + 1} layers on the {gpu}"
    if plan.n_cpu_moe:
        offload += f", experts of the first {plan.n_cpu_moe} layers in host memory"
    lines.append(
        f"  {plan.n_ctx_slot} tokens per conversation, {plan.n_parallel} at once; {offload}"
    )
    cache = plan.type_k if plan.type_k == plan.type_v else f"K {plan.type_k} / V {plan.type_v}"
    streams = "one shared KV stream" if plan.kv_unified else "a KV stream per slot"
    lines.append(
        f"  n_ctx {plan.n_ctx} ({streams}); "
        f"KV cache {cache}; flash attention {'on' if plan.flash_attn else 'off'}; "
        + (f"swa_full {'on' if plan.swa_full else 'off'}; " if plan.has_swa else "")
        + f"n_ubatch {plan.n_ubatch}"
    )
    host = next((d for d in plan.devices if d.name == "host"), None)
    if host is not None and host.checkpoint_bytes:
        lines.append(f"  context checkpoints (host, counted in its overhead): up to "
                     f"{_gib(host.checkpoint_bytes)} GiB")
    if plan.projector is not None:
        lines.append(projector_line(plan))
    if plan.tensor_split:
        lines.append(f"  tensor split {', '.join(f'{s:g}' for s in plan.tensor_split)}")
    lines.append(f"  predicted: {plan.decode_tok_s:.1f} tok/s decode, "
                 f"{plan.prompt_tok_s:.0f} tok/s prompt")
    if plan.link_transfers:
        token_ms = 1000 / plan.decode_tok_s if plan.decode_tok_s > 0 else 0.0
        lines.append(f"  network: {plan.link_transfers} transfers per token to RPC hosts, "
                     f"{plan.link_seconds * 1000:.2f} of {token_ms:.1f} ms per token")
    lines.append("")
    header = ("device", "weights", "KV", "compute", "output", "overhead", "total", "capacity",
              "free")
    rows = [header]
    for d in plan.devices:
        rows.append((
            d.name if d.name == "host" else
            f"{d.name} {d.description}" + (" (assumed)" if d.assumed else ""),
            _gib(d.weights_bytes), _gib(d.kv_bytes), _gib(d.compute_bytes),
            _gib(d.output_bytes),
            _gib(d.overhead_bytes + d.checkpoint_bytes + d.projector_bytes),
            _gib(d.total_bytes),
            _gib(d.capacity_bytes), _gib(d.free_bytes - d.margin_bytes),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        numbers = zip(row[1:], widths[1:], strict=True)
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in numbers]
        lines.append("  " + "  ".join(cells) + ("   (GiB; free after the margin)" if index == 0
                                                 else ""))
    if plan.ladder and len(plan.ladder) > 1:
        lines.append("")
        lines.append("  quants (best quality first):")
        reasons = dict(plan.rejected)
        width = max(len(q) for q in plan.ladder)
        for quant in plan.ladder:
            mark = "->" if quant == plan.quant else "  "
            why = "chosen" if quant == plan.quant else reasons.get(quant, "")
            lines.append(f"  {mark} {quant.ljust(width)}  {why}")
    for warning in plan.warnings:
        lines.append(f"WARNING: {warning}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plan_summary_line(plan: Plan) -> str:
    """One line for logs: quant, layers, context, speed."""
    return (
        f"{plan.quant}: {plan.n_gpu_layers}/{plan.n_layer + 1} layers on GPU, "
        f"{plan.n_ctx_slot} tokens per conversation x{plan.n_parallel}, "
        f"~{plan.decode_tok_s:.0f} tok/s decode, "
        f"~{plan.prompt_tok_s:.0f} tok/s prompt"
    )


def projector_line(plan: Plan) -> str:
    """The vision projector's line: where it lives, what it holds, what one image costs."""
    projector = plan.projector
    assert projector is not None
    weights = projector.weights_bytes
    compute = projector.compute_bytes(plan.flash_attn)
    modelled = "" if projector.compute_measured else (
        f" (compute not measured for {projector.projector_type}: a ViT estimate)"
    )
    warmup = projector.warmup_compute_bytes(plan.flash_attn)
    if warmup != compute:  # dynamic-resolution encoders: llama.cpp grows its buffer later
        modelled += (
            f"; llama.cpp reserves {mib(warmup, 1)} at load "
            f"({_pixels(projector.warmup_side, projector.warmup_side)}) and "
            "grows to this with the largest image"
        )
    return (
        f"  vision projector {projector.projector_type} on {plan.projector_device}: "
        f"{mib(weights, 1)} weights + {mib(compute, 1)} image-encoder compute "
        f"(counted in that device's overhead); one image = {projector.image_tokens} tokens of "
        f"context ({_pixels(*projector.largest_image)}){modelled}"
    )


def _pixels(width: int, height: int) -> str:
    return f"{width} px" if width == height else f"{width} x {height} px"
