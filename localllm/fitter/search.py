"""The search: which quant, how many GPU layers, what context, and how fast (pure: no I/O).

    fit_header(header, hardware, request) -> Plan        one file
    fit_ladder(headers, hardware, request) -> Plan       several quants of one model: the choice,
                                                         with `rejected` saying why not the others

Memory follows llama.cpp's allocation rules per device (`memory.py`), speed a bandwidth and
compute model (`speed.py`). In auto mode a plan puts every layer on the GPU(s) if it can; if the
wanted context keeps it from fitting and the user did not fix the context, the context is halved
(not below 4096) first; then whole layers move to host memory, or for MoE models the expert
tensors of the first layers (`--n-cpu-moe`), whichever decodes faster. Explicit mode
(request.n_gpu_layers given) predicts exactly that configuration.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from localllm.errors import DoesNotFitError, SettingsError
from localllm.fitter.memory import (
    F32_BYTES,
    ContextShape,
    HeaderFacts,
    checkpoints_total_bytes,
    compute_phases,
    context_shape,
    kv_layer_bytes,
    memory_layout,
    mtp_kv_layer_bytes,
    output_buffer_bytes,
    state_layer_bytes,
)
from localllm.fitter.records import (
    AUTO_SLOTS,
    CPU_CTX_CAP,
    DEFAULT_CTX_CAP,
    DESKTOP_MIN_BITS,
    DESKTOP_MIN_CTX,
    GPU_CONTEXT_OVERHEAD_BYTES,
    HOST_OVERHEAD_BYTES,
    MIN_SHRUNK_CTX,
    DeviceMemory,
    FitRequest,
    Plan,
)
from localllm.fitter.speed import (
    CPU_BATCH_TOKEN_SHARE,
    CPU_ELEMENTS_PER_FLOP,
    CPU_PREFILL_EFFICIENCY,
    HOST_BANDWIDTH_OVERLAP,
    REPACK_BYTES_FACTOR,
    REPACK_ELEMENTS_PER_FLOP,
    DeviceWork,
    decode_seconds_per_token,
    link_seconds_per_token,
    prompt_tokens_per_second,
)
from localllm.gguf_header import ModelHeader
from localllm.hardware import Hardware
from localllm.units import gib

EXPERT_PATTERN = r"\.ffn_(up|down|gate)_exps"
MODELLED_NOTE = (
    "memory follows llama.cpp's allocation rules, checked against its dry-run figures on CPU; "
    "GPU-side compute buffers and the CUDA context (300 MiB) are modelled, not measured"
)


def quant_name(header: ModelHeader) -> str:
    return header.file_type or header.path.stem


@dataclass(frozen=True)
class _Layout:
    n_gpu_layers: int
    n_cpu_moe: int
    layer_device: tuple[int, ...]  # -1: host
    output_device: int  # -1: host
    tensor_split: tuple[float, ...] | None


def _split_weights(hardware: Hardware, request: FitRequest) -> list[float]:
    """Share of layers per GPU: proportional to what each can give to layers (llama.cpp's default
    split is proportional to free memory; subtracting the fixed costs first balances better)."""
    budgets = [
        max(1.0, g.free_bytes - request.gpu_margin_bytes - GPU_CONTEXT_OVERHEAD_BYTES)
        for g in hardware.gpus
    ]
    total = sum(budgets)
    return [b / total for b in budgets]


def _layout(n_layer: int, n_gpu_layers: int, n_cpu_moe: int, split: list[float]) -> _Layout:
    """llama.cpp's layer assignment (llama-model.cpp load_tensors): the last n_gpu_layers of the
    n_layer + 1 layers (the +1 is the output layer) go to GPUs, cut by the cumulative split."""
    if not split:
        return _Layout(0, 0, (-1,) * n_layer, -1, None)
    n_gpu_layers = max(0, min(n_gpu_layers, n_layer + 1))
    start = n_layer + 1 - n_gpu_layers
    cumulative = []
    running = 0.0
    for share in split:
        running += share
        cumulative.append(running)
    cumulative[-1] = 1.0

    def device(il: int) -> int:
        if il < start:
            return -1
        index = bisect.bisect_right(cumulative, (il - start) / n_gpu_layers)
        return min(index, len(split) - 1)

    devices = tuple(device(il) for il in range(n_layer))
    tensor_split = tuple(round(s, 4) for s in split) if len(split) > 1 else None
    return _Layout(n_gpu_layers, n_cpu_moe, devices, device(n_layer), tensor_split)


class _Fitter:
    """Evaluates layouts of one header on one machine; the search calls it many times."""

    def __init__(self, header: ModelHeader, hardware: Hardware, request: FitRequest) -> None:
        self.header = header
        # the MTP block and its draft context, when spec_type draft-mtp runs it
        self.mtp = request.mtp and memory_layout(header).n_layer_trunk < header.n_layer
        self.facts = HeaderFacts(header, load_mtp=self.mtp)
        self.hardware = hardware
        self.request = request
        self.flash_attn = True if request.flash_attn is None else request.flash_attn
        if not self.flash_attn and request.type_v != "f16":
            raise SettingsError(
                f"a quantized V cache ({request.type_v}) needs flash attention: "
                "drop --flash-attn off, or use --cache-type f16 for values"
            )
        self.split = _split_weights(hardware, request) if hardware.gpus else []
        self._shapes: dict[tuple[int, int], tuple[ContextShape, tuple[int, ...], Any]] = {}
        self.state_per_seq = state_layer_bytes(header, 1, self.facts.layout)
        n_expert = header.n_expert
        self.expert_read_share = header.n_expert_used / n_expert if n_expert else 1.0
        host = hardware.host
        cores = max(1, min(hardware.threads, host.physical_cores))
        repack = hardware.cpu_repack
        per_flop = REPACK_ELEMENTS_PER_FLOP if repack else CPU_ELEMENTS_PER_FLOP
        self.host_rate = per_flop * host.matmul_flops_per_core * cores
        self.host_bytes_factor = REPACK_BYTES_FACTOR if repack else HOST_BANDWIDTH_OVERLAP
        self.host_prefill_flops = CPU_PREFILL_EFFICIENCY * host.matmul_flops_per_core * cores
        projector = request.projector
        self.projector_bytes = projector.total_bytes(self.flash_attn) if projector else 0

    def shape(self, n_ctx_slot: int, n_seq: int) -> tuple[ContextShape, tuple[int, ...], Any]:
        """The context for n_seq conversations of n_ctx_slot tokens each (one KV stream each,
        or one shared stream of n_ctx_slot cells when the cache is unified)."""
        key = (n_ctx_slot, n_seq)
        if key not in self._shapes:
            r = self.request
            n_ctx = n_ctx_slot if r.kv_unified else n_ctx_slot * n_seq
            layout = self.facts.layout
            shape = context_shape(
                self.header, n_ctx, n_seq, r.n_ubatch, r.n_batch, r.swa_full, r.kv_unified,
                layout,
            )
            kv = kv_layer_bytes(self.header, shape, r.type_k, r.type_v, self.flash_attn, layout)
            if self.mtp:
                mtp_kv = mtp_kv_layer_bytes(
                    self.header, shape, r.type_k, r.type_v, self.flash_attn, layout)
                kv = tuple(k + m for k, m in zip(kv, mtp_kv, strict=True))
            state = state_layer_bytes(self.header, shape.n_seq, layout)
            if r.n_rs_seq:  # one snapshot of the state per guess that may be rolled back
                state = tuple(s * (1 + r.n_rs_seq) for s in state)
            # a layer's recurrent state lives on its device, like its KV cache
            memory = tuple(k + s for k, s in zip(kv, state, strict=True))
            self._shapes[key] = (shape, memory, compute_phases(self.facts, shape, self.flash_attn))
        return self._shapes[key]

    def plan(self, ctx: tuple[int, int], n_gpu_layers: int, n_cpu_moe: int = 0) -> Plan:
        """ctx: (tokens per conversation, conversations at once)."""
        header, facts, hardware, request = self.header, self.facts, self.hardware, self.request
        shape, kv, phases = self.shape(*ctx)
        mtp_compute = phases.mtp_bytes if self.mtp else 0  # the draft context's own buffer
        # the MTP context's logits, and the target's hidden state of every token of a batch
        # (llama-context.cpp output_reserve: embd_nextn unmasked is n_embd x n_batch floats)
        mtp_output = (
            output_buffer_bytes(header, shape.n_seq) + header.n_embd * shape.n_batch * F32_BYTES
            if self.mtp else 0
        )
        layout = _layout(header.n_layer, n_gpu_layers, n_cpu_moe, self.split)
        n_gpus = len(hardware.gpus)
        weights = [0] * (n_gpus + 1)  # index -1: host
        kv_on = [0] * (n_gpus + 1)
        layers_on = [0] * (n_gpus + 1)
        read = [0.0] * (n_gpus + 1)
        elements = [0.0] * (n_gpus + 1)
        prefill_elements = [0.0] * (n_gpus + 1)
        share = self.expert_read_share
        for il, dev in enumerate(layout.layer_device):
            layer_bytes, expert_bytes = facts.layer_bytes[il], facts.expert_bytes[il]
            layer_el, expert_el = facts.layer_elements[il], facts.expert_elements[il]
            dense_bytes, dense_el = layer_bytes - expert_bytes, layer_el - expert_el
            expert_dev = -1 if (dev >= 0 and il < n_cpu_moe) else dev
            weights[dev] += dense_bytes
            weights[expert_dev] += expert_bytes
            kv_on[dev] += kv[il]
            layers_on[dev] += 1
            # a recurrent layer reads and writes one sequence's state per generated token
            read[dev] += dense_bytes + 2 * self.state_per_seq[il]
            read[expert_dev] += expert_bytes * share
            elements[dev] += dense_el
            elements[expert_dev] += expert_el * share
            prefill_elements[dev] += dense_el
            prefill_elements[expert_dev] += expert_el * share
        out_dev = layout.output_device
        host_output_bytes = facts.output_bytes - (
            facts.token_embd_bytes if facts.output_tied else 0
        )
        weights[out_dev] += facts.output_bytes if out_dev >= 0 else host_output_bytes
        weights[-1] += facts.token_embd_bytes + facts.other_bytes
        if hardware.cpu_repack:
            weights[-1] = facts.repacked_host_bytes(
                [dev < 0 for dev in layout.layer_device],
                [dev < 0 or il < n_cpu_moe for il, dev in enumerate(layout.layer_device)],
                out_dev < 0,
            )
        read[out_dev] += facts.output_bytes
        elements[out_dev] += facts.output_elements
        prefill_elements[out_dev] += facts.output_elements

        projector_on, projector_device = self._projector_device()
        any_gpu_layers = any(d >= 0 for d in layout.layer_device) or out_dev >= 0
        all_on_gpu = all(d >= 0 for d in layout.layer_device) and out_dev >= 0
        devices: list[DeviceMemory] = []
        n_remote = n_local = 0
        for g, gpu in enumerate(hardware.gpus):
            if g == (out_dev if out_dev >= 0 else 0):
                # holds the logits (op offload when on host)
                compute = phases.peak_bytes + mtp_compute
            elif layers_on[g]:
                compute = phases.layer_bytes
            else:
                compute = 0
            if gpu.endpoint is not None:
                # llama.cpp's names, in the order the hosts were added; an rpc-server reports
                # its memory after its own CUDA context, so none is counted here.
                name, description, overhead = f"RPC{n_remote}", f"{gpu.endpoint} {gpu.name}", 0
                n_remote += 1
            else:
                name, description = f"CUDA{n_local}", gpu.name
                overhead = GPU_CONTEXT_OVERHEAD_BYTES
                n_local += 1
            devices.append(
                DeviceMemory(
                    name=name,
                    description=description,
                    weights_bytes=weights[g],
                    kv_bytes=kv_on[g],
                    compute_bytes=compute,
                    output_bytes=0,
                    overhead_bytes=overhead,
                    margin_bytes=request.gpu_margin_bytes,
                    capacity_bytes=gpu.free_bytes,
                    n_layers=layers_on[g],
                    assumed=gpu.source != "nvml",
                    projector_bytes=self.projector_bytes if projector_on == g else 0,
                )
            )
        if not hardware.gpus:
            host_compute = phases.peak_bytes + mtp_compute
        elif all_on_gpu:
            host_compute = phases.input_bytes + phases.mask_bytes  # the CUDA_Host buffer
        else:
            host_compute = phases.layer_bytes + phases.input_bytes
        host = hardware.host
        devices.append(
            DeviceMemory(
                name="host",
                description="host RAM",
                weights_bytes=weights[-1],
                kv_bytes=kv_on[-1],
                compute_bytes=host_compute,
                output_bytes=output_buffer_bytes(header, shape.n_seq) + mtp_output,
                overhead_bytes=HOST_OVERHEAD_BYTES,
                margin_bytes=0,
                capacity_bytes=host.ram_available_bytes,
                n_layers=layers_on[-1],
                checkpoint_bytes=checkpoints_total_bytes(
                    header, shape.n_seq, request.ctx_checkpoints, request.swa_full,
                    request.type_k, request.type_v,
                ),
                projector_bytes=self.projector_bytes if projector_on == -1 else 0,
            )
        )

        gpu_work = [
            (DeviceWork(int(read[g]), int(elements[g])), gpu.bandwidth_bytes_s)
            for g, gpu in enumerate(hardware.gpus)
            if not gpu.is_cpu
        ]
        host_work = DeviceWork(int(read[-1]), int(elements[-1]))
        # Seconds per token of the layers a CPU computes: this host's, and each rpc-server that
        # lends its CPU (priced like this host's CPU).
        cpu_seconds = [
            decode_seconds_per_token(
                [], host_work, host.memory_bandwidth_bytes_s, self.host_rate,
                self.host_bytes_factor,
            ),
            *(
                decode_seconds_per_token(
                    [], DeviceWork(int(read[g]), int(elements[g])), gpu.bandwidth_bytes_s,
                    self.host_rate,
                )
                for g, gpu in enumerate(hardware.gpus)
                if gpu.is_cpu
            ),
        ]
        seconds = decode_seconds_per_token(
            gpu_work, DeviceWork(0, 0), host.memory_bandwidth_bytes_s, self.host_rate
        ) + sum(cpu_seconds)
        transfers = self._link_transfers(layout)
        link_seconds = link_seconds_per_token(
            transfers, hardware.link_latency_s, hardware.link_bytes_s
        )
        seconds += link_seconds
        decode = 1.0 / seconds if seconds > 0 else 0.0
        first_local = next((g for g in hardware.gpus if g.endpoint is None), None)
        prompt = prompt_tokens_per_second(
            [
                (
                    int(prefill_elements[g]),
                    self.host_prefill_flops if gpu.is_cpu else gpu.prefill_flops,
                )
                for g, gpu in enumerate(hardware.gpus)
            ],
            DeviceWork(int(weights[-1] - facts.token_embd_bytes), int(prefill_elements[-1])),
            self.host_prefill_flops,
            shape.n_ubatch,
            # op offload ships host weights to the first local GPU; RPC devices take none
            # (ggml-rpc.cpp has no offload_op).
            first_local.prefill_flops if first_local is not None and any_gpu_layers else None,
        )
        # One more token in a small batch (a speculative verification): on a GPU its compute at
        # the prefill rate (the weights are read once per step); on CPU layers a measured share
        # of their decode time (CPU_BATCH_TOKEN_SHARE: a CPU step is compute).
        batch_token_s = CPU_BATCH_TOKEN_SHARE * sum(cpu_seconds) + sum(
            2 * elements[g] / gpu.prefill_flops
            for g, gpu in enumerate(hardware.gpus)
            if not gpu.is_cpu
        )
        overrides: tuple[tuple[str, str], ...] = ()
        if n_cpu_moe:
            layers = "|".join(str(il) for il in range(n_cpu_moe))
            overrides = ((rf"blk\.({layers}){EXPERT_PATTERN}", "CPU"),)
        return Plan(
            files=header.paths,
            quant=quant_name(header),
            n_layer=header.n_layer,
            n_gpu_layers=layout.n_gpu_layers,
            n_ctx=shape.n_ctx,
            n_parallel=shape.n_seq,
            type_k=request.type_k,
            type_v=request.type_v,
            flash_attn=self.flash_attn,
            swa_full=request.swa_full,
            kv_unified=request.kv_unified,
            n_ubatch=shape.n_ubatch,
            n_batch=shape.n_batch,
            tensor_split=layout.tensor_split,
            tensor_overrides=overrides,
            n_cpu_moe=n_cpu_moe,
            devices=tuple(devices),
            decode_tok_s=decode,
            prompt_tok_s=prompt,
            fits=all(d.fits for d in devices),
            has_swa=facts.layout.has_swa,
            link_transfers=len(transfers),
            link_seconds=link_seconds,
            rpc_servers=tuple(dict.fromkeys(g.endpoint or "" for g in hardware.remote_gpus)),
            projector=request.projector,
            projector_device=projector_device,
            batch_token_s=batch_token_s,
        )

    def _projector_device(self) -> tuple[int, str]:
        """Where llama.cpp's clip puts the projector: the first GPU backend (a local card before
        RPC hosts) unless --no-mmproj-offload; index -1 and "host" otherwise, "" without one."""
        if self.request.projector is None:
            return -2, ""
        gpus = self.hardware.gpus
        if not gpus or not self.request.mmproj_offload:
            return -1, "host"
        local = [g for g, gpu in enumerate(gpus) if gpu.endpoint is None]
        index = local[0] if local else 0
        return index, "CUDA0" if local else "RPC0"

    def _link_transfers(self, layout: _Layout) -> list[int]:
        """Bytes of each network transfer of one token: every change between this host and a
        remote device along input -> layers -> output, then the logits back if remote."""
        remote = {g for g, gpu in enumerate(self.hardware.gpus) if gpu.endpoint is not None}
        if not remote:
            return []
        activation = 4 * self.header.n_embd  # f32 hidden state of one token
        stages = [-1, *layout.layer_device, layout.output_device]
        transfers = [
            activation
            for before, after in zip(stages, stages[1:], strict=False)
            if before != after and (before in remote or after in remote)
        ]
        if layout.output_device in remote:
            transfers.append(4 * self.header.n_vocab)  # the logits come back to this host
        return transfers

    def gpus_fit(self, plan: Plan) -> bool:
        return all(d.fits for d in plan.gpus)

    def most_layers(self, n_ctx: tuple[int, int]) -> Plan:
        """The plan with the most GPU layers whose GPUs fit (binary search: fits shrink with
        more layers)."""
        low, high = 0, self.header.n_layer + 1  # low always fits the GPUs (nothing but overhead)
        best = self.plan(n_ctx, 0)
        while low < high:
            mid = (low + high + 1) // 2
            candidate = self.plan(n_ctx, mid)
            if self.gpus_fit(candidate):
                low, best = mid, candidate
            else:
                high = mid - 1
        return best

    def fewest_cpu_moe(self, n_ctx: tuple[int, int]) -> Plan | None:
        """Every layer on the GPU, experts of the first N layers in host memory, smallest N."""
        n_layer = self.header.n_layer
        last = self.plan(n_ctx, n_layer + 1, n_layer)
        if not self.gpus_fit(last):
            return None
        low, high, best = 1, n_layer, last
        while low < high:
            mid = (low + high) // 2
            candidate = self.plan(n_ctx, n_layer + 1, mid)
            if self.gpus_fit(candidate):
                high, best = mid, candidate
            else:
                low = mid + 1
        return best


def _advice(plan: Plan, header: ModelHeader, request: FitRequest) -> str:
    hints = ["a smaller quant"]
    if plan.n_ctx_slot > MIN_SHRUNK_CTX:
        shorter = max(MIN_SHRUNK_CTX, plan.n_ctx_slot // 2)
        hints.append(f"a shorter context (--ctx-size {shorter})")
    if request.type_k == "f16" or request.type_v == "f16":
        hints.append("a quantized KV cache (--cache-type q8_0; q8_0 for V needs flash attention)")
    if plan.n_parallel > 1:
        hints.append(f"fewer parallel slots (--parallel {max(1, plan.n_parallel // 2)})")
    hints.append("a second GPU")
    return "try " + ", ".join(hints)


def _speed_warning(plan: Plan, header: ModelHeader, request: FitRequest) -> str:
    host_weights = plan.host.weights_bytes
    return (
        f"predicted {plan.decode_tok_s:.1f} tok/s is below the {request.min_speed_tok_s:g} tok/s "
        f"floor: {gib(host_weights)} of weights stay in host memory "
        f"({plan.n_gpu_layers}/{plan.n_layer + 1} layers on the GPU"
        + (f", experts of {plan.n_cpu_moe} layers in RAM" if plan.n_cpu_moe else "")
        + f"); {_advice(plan, header, request)}"
    )


def _link_warning(plan: Plan, hardware: Hardware) -> list[str]:
    """The network, not the devices, sets the pace: say so, with the numbers."""
    if not plan.link_transfers or plan.decode_tok_s <= 0:
        return []
    token_s = 1.0 / plan.decode_tok_s
    if plan.link_seconds < token_s - plan.link_seconds:
        return []
    return [
        f"the network sets the pace: {plan.link_transfers} transfers per token to RPC hosts at "
        f"{hardware.link_latency_s * 1000:.2f} ms round trip and "
        f"{hardware.link_bytes_s * 8 / 1e6:.0f} Mbit/s take {plan.link_seconds * 1000:.1f} of "
        f"{token_s * 1000:.1f} ms per token; a faster link, fewer hosts, or more layers on "
        "each host would help"
    ]


def _does_not_fit(plan: Plan, header: ModelHeader, request: FitRequest) -> DoesNotFitError:
    gpu_free = sum(max(0, d.capacity_bytes - d.margin_bytes) for d in plan.gpus)
    host = plan.host
    needed = sum(d.total_bytes for d in plan.devices)
    available = gpu_free + host.capacity_bytes
    return DoesNotFitError(
        f"{quant_name(header)} ({header.path.name}) does not fit with {plan.n_ctx_slot} tokens per "
        f"conversation x {plan.n_parallel}: needs "
        f"{gib(needed)} of GPU + host memory ({gib(host.total_bytes)} in host RAM with "
        f"{plan.n_gpu_layers}/{plan.n_layer + 1} layers on the GPU), has {gib(gpu_free)} of GPU "
        f"memory (after a {gib(request.gpu_margin_bytes)} margin per GPU) and "
        f"{gib(host.capacity_bytes)} of available RAM; {_advice(plan, header, request)}",
        needed_bytes=needed,
        available_bytes=available,
    )


def _wanted_ctx(header: ModelHeader, request: FitRequest, notes: list[str],
                warnings: list[str], cap: int = DEFAULT_CTX_CAP) -> int:
    """Tokens per conversation: asked for, the training context (0), or up to `cap`."""
    trained = header.n_ctx_train or cap
    if request.n_ctx == 0:
        notes.append(f"context: the model's training context, {trained} tokens (--ctx-size 0)")
        return trained
    if request.n_ctx is None:
        wanted = min(trained, cap)
        notes.append(
            f"{wanted} tokens per conversation: the model's training context ({trained}) capped "
            f"at {cap}; --ctx-size N asks for more, 0 for all of it"
        )
        return wanted
    if header.n_ctx_train and request.n_ctx > header.n_ctx_train:
        warnings.append(
            f"--ctx-size {request.n_ctx} is above the model's training context "
            f"({header.n_ctx_train}):"
            " answers degrade past it unless the model was trained for RoPE scaling"
        )
    return request.n_ctx


def _layout_notes(fitter: _Fitter) -> list[str]:
    """What the architecture's memory holds beyond a plain KV cache."""
    facts, notes = fitter.facts, []
    layout = facts.layout
    if layout.n_recurrent:
        per_seq = sum(fitter.state_per_seq)
        notes.append(
            f"{layout.n_recurrent} of {layout.n_layer_trunk} layers are recurrent: their state, "
            f"{per_seq / 2**20:.1f} MiB per conversation whatever its length, is in the KV column"
            f"; {sum(layout.attention)} layers have a KV cache"
        )
        if fitter.request.n_rs_seq:
            notes.append(
                f"{fitter.request.n_rs_seq} more copies of each conversation's recurrent state "
                "(n_rs_seq, to roll rejected guesses back) are in the KV column too"
            )
    if fitter.mtp:
        notes.append(
            f"the file's MTP block ({gib(facts.mtp_bytes)}) is loaded for spec_type draft-mtp; "
            "its draft context adds a KV cache layer and a compute buffer (counted)"
        )
    elif fitter.request.mtp:
        notes.append("spec_type draft-mtp: the file has no MTP block, the engine will refuse it")
    if facts.skipped_bytes:
        notes.append(
            f"the file's MTP block ({gib(facts.skipped_bytes)}) is not loaded: llama.cpp uses it "
            "only for speculative decoding"
        )
    return notes


def _swa_notes(fitter: _Fitter, n_ctx: int, request: FitRequest) -> list[str]:
    """What the full-size sliding-window cache costs against llama-server's small one."""
    if not fitter.facts.layout.has_swa:
        return []
    n_seq = request.n_parallel or 1
    this = sum(fitter.shape(n_ctx, n_seq)[1])
    other_request = replace(request, swa_full=not request.swa_full)
    other = sum(_Fitter(fitter.header, fitter.hardware, other_request).shape(n_ctx, n_seq)[1])
    full, small = (this, other) if request.swa_full else (other, this)
    if request.swa_full:
        return [
            f"full-size sliding-window cache (--swa-full): KV {gib(full)} at {n_ctx} tokens, "
            f"where the small one (--no-swa-full, the default) needs {gib(small)}"
        ]
    return [
        f"small sliding-window cache (--no-swa-full, the default): KV {gib(small)} at {n_ctx} "
        f"tokens instead of {gib(full)} full-size; context checkpoints in host memory keep "
        "prompt reuse"
    ]


def fit_header(header: ModelHeader, hardware: Hardware, request: FitRequest | None = None) -> Plan:
    """The plan for one model file; raises DoesNotFitError when no configuration fits.

    Context comes first: each conversation gets the context asked for (by default up to 32768
    tokens with a GPU, 8192 on the CPU alone), each in its own KV stream so no user's context is
    taken by another's; then as many parallel slots (AUTO_SLOTS, unless --parallel fixes them)
    as fit with every layer on the GPU; only then, if the context was not fixed, is it halved
    (not below 4096); last, layers (or MoE experts) move to host memory, with one slot.
    """
    plan = _fit_header(header, hardware, request or FitRequest())
    assert plan is not None  # with offload allowed a plan comes back or DoesNotFitError
    return plan


def _fit_header(
    header: ModelHeader,
    hardware: Hardware,
    request: FitRequest,
    min_ctx: int = MIN_SHRUNK_CTX,
    offload: bool = True,
) -> Plan | None:
    """fit_header, with the floor the context may be halved to; offload False: None when no
    context down to min_ctx fits every layer on the GPU(s)."""
    request = request.for_model(header.path)  # a hub quant's own projector
    fitter = _Fitter(header, hardware, request)
    notes = [MODELLED_NOTE, *hardware.notes]
    warnings: list[str] = []
    cap = DEFAULT_CTX_CAP if hardware.gpus else CPU_CTX_CAP
    wanted = _wanted_ctx(header, request, notes, warnings, cap)
    slot_options = (request.n_parallel,) if request.n_parallel else AUTO_SLOTS
    notes += _swa_notes(fitter, wanted, request) + _layout_notes(fitter)
    full = n_layer_all = header.n_layer + 1

    if request.n_gpu_layers is not None:  # explicit mode: exactly this configuration
        n_gpu_layers = request.n_gpu_layers
        if n_gpu_layers < 0 or n_gpu_layers > full:
            n_gpu_layers = full
        candidates = [fitter.plan((wanted, n), n_gpu_layers) for n in slot_options]
        plan = next((p for p in candidates if p.fits), candidates[-1])
        for device in plan.devices:
            if not device.fits:
                warnings.append(
                    f"does not fit {device.name}: needs {gib(device.total_bytes)}"
                    f" + {gib(device.margin_bytes)} margin, has {gib(device.capacity_bytes)}"
                )
        return _finish(plan, header, request, warnings, notes, hardware)

    contexts = [wanted]
    if request.n_ctx is None:
        while contexts[-1] // 2 >= min_ctx:
            contexts.append(contexts[-1] // 2)
    chosen: Plan | None = None
    for ctx in contexts:
        for n_seq in slot_options:
            plan = fitter.plan((ctx, n_seq), full)
            if plan.fits:
                chosen = plan
                break
        if chosen is not None:
            if ctx != wanted:
                notes.append(
                    f"context shrunk from {wanted} to {chosen.n_ctx_slot} tokens per conversation "
                    "so that every layer fits on the GPU; --ctx-size keeps a longer one with fewer "
                    "GPU layers"
                )
            break
    if chosen is None and not offload:
        return None
    if chosen is None:
        one = (wanted, min(slot_options))
        options = [fitter.most_layers(one)]
        if header.is_moe and request.cpu_moe is not False:
            moe = fitter.fewest_cpu_moe(one)
            if moe is not None:
                options.append(moe)
        fitting = [p for p in options if p.fits]
        if not fitting:
            raise _does_not_fit(options[0], header, request)
        chosen = max(fitting, key=lambda p: p.decode_tok_s)
        if chosen.n_cpu_moe:
            notes.append(
                f"MoE: every layer on the GPU with the experts of the first "
                f"{chosen.n_cpu_moe} layers in host memory (--n-cpu-moe) decodes faster "
                "than moving whole layers"
            )
        elif header.is_moe and len(options) > 1:
            notes.append("MoE: moving whole layers decodes faster than keeping experts in RAM")
        if chosen.n_gpu_layers < n_layer_all:
            warnings.append(
                f"partial offload: {chosen.n_gpu_layers}/{n_layer_all} layers on the GPU, "
                f"{gib(chosen.host.weights_bytes)} of weights in host memory"
            )
    if request.n_parallel is None and chosen.n_parallel < max(AUTO_SLOTS):
        notes.append(
            f"{chosen.n_parallel} slot(s): more parallel conversations would not fit beside "
            f"{chosen.n_ctx_slot} tokens each with this offload; --parallel N sets them"
        )
    return _finish(chosen, header, request, warnings, notes, hardware)


def _finish(
    plan: Plan,
    header: ModelHeader,
    request: FitRequest,
    warnings: list[str],
    notes: list[str],
    hardware: Hardware,
) -> Plan:
    if plan.decode_tok_s < request.min_speed_tok_s:
        warnings.append(_speed_warning(plan, header, request))
    warnings += _link_warning(plan, hardware)
    return replace(plan, warnings=tuple(warnings), notes=tuple(notes))


def _quality_key(header: ModelHeader) -> float:
    return header.bits_per_weight


def _desktop_choice(
    ordered: Sequence[ModelHeader],
    hardware: Hardware,
    request: FitRequest,
    label: Callable[[ModelHeader], str],
) -> Plan | None:
    """The order a desktop user wants (balanced objective, context and layers not fixed, a GPU):
    the wanted context (up to 32768 tokens) entirely on the GPU with the best quant of 4 bits or
    more that keeps it there; when none does, each such quant from the best shrinks its context
    down to 8192 before the next quant down is tried; then the quants below 4 bits the same way;
    then any quant down to 4096 tokens; None when nothing fits on the GPU at all (the caller
    then offloads)."""
    if (request.objective != "balanced" or request.n_ctx is not None
            or request.n_gpu_layers is not None or not hardware.gpus):
        return None
    good = [h for h in ordered if h.bits_per_weight >= DESKTOP_MIN_BITS]
    low = [h for h in ordered if h.bits_per_weight < DESKTOP_MIN_BITS]
    stages = ((good, 1 << 30), (good, DESKTOP_MIN_CTX), (low, DESKTOP_MIN_CTX),
              (list(ordered), MIN_SHRUNK_CTX))
    for headers, min_ctx in stages:
        for header in headers:
            plan = _fit_header(header, hardware, request, min_ctx=min_ctx, offload=False)
            if plan is not None:
                note = (
                    "desktop order: the context (up to 32768 tokens) entirely on the GPU with the "
                    "best quant of 4+ bits that keeps it there; else a shorter context, not below "
                    "8192 before the next quant down; then lower quants; then offload"
                )
                return replace(plan, quant=label(header), notes=(*plan.notes, note))
    return None


def fit_ladder(
    headers: Sequence[ModelHeader],
    hardware: Hardware,
    request: FitRequest | None = None,
    quality_losses: Mapping[Path, float] | None = None,
    labels: Mapping[Path, str] | None = None,
) -> Plan:
    """Choose among quants of one model (see the module docstring for the rules).

    balanced (default): the highest-quality quant that meets the speed floor, preferring quants
    that fit entirely on the GPU(s): a bigger quant partly in host memory is never chosen over a
    smaller one that fits entirely (it is always slower). quality: the highest-quality quant that
    meets the floor, partial offload allowed. speed: the fastest plan.
    Nothing meets the floor: the fastest plan (quality: the best quant that fits), with a warning.
    With request.max_quality_loss, quants whose measured loss (quality_losses, by path) exceeds
    it are rejected before anything else. `labels` names each file's quant where the declared
    type is ambiguous (unsloth's UD-Q4_K_XL declares Q4_K_M): `models.ladder_labels`.
    """
    request = request or FitRequest()
    if not headers:
        raise ValueError("fit_ladder needs at least one header")
    names = {h.path: (labels or {}).get(h.path) or quant_name(h) for h in headers}
    if len(set(names.values())) < len(names):  # still ambiguous: the file names tell them apart
        names = {path: path.name.removesuffix(".gguf") for path in names}

    def label(header: ModelHeader) -> str:
        return names[header.path]

    ordered = sorted(headers, key=_quality_key, reverse=True)
    ladder = tuple(label(h) for h in ordered)
    files = tuple(str(h.path) for h in ordered)
    plans: list[tuple[ModelHeader, Plan]] = []
    reasons: dict[str, str] = {}
    errors: list[DoesNotFitError] = []
    limit = request.max_quality_loss
    if limit is not None:
        losses = quality_losses or {}
        for header in ordered:
            loss = losses.get(header.path)
            if loss is not None and loss > limit:
                reasons[label(header)] = (
                    f"measured quality loss {loss:.4f} (mean KL divergence) exceeds "
                    f"--max-quality-loss {limit:g}"
                )
        ordered = [h for h in ordered if label(h) not in reasons]
        if not ordered:
            raise DoesNotFitError(
                f"every quant exceeds --max-quality-loss {limit:g} "
                f"({'; '.join(f'{q}: {r}' for q, r in reasons.items())}); raise the limit or "
                "get a higher-precision quant"
            )
    for header in ordered:
        try:
            plan = fit_header(header, hardware, request)
            plans.append((header, replace(plan, quant=label(header))))
        except DoesNotFitError as exc:
            errors.append(exc)
            reasons[label(header)] = f"does not fit: {exc}"
    if not plans:
        smallest = errors[-1]
        raise DoesNotFitError(
            f"no quant of this model fits ({', '.join(ladder)}); smallest: {smallest}",
            smallest.needed_bytes,
            smallest.available_bytes,
        )
    floor = request.min_speed_tok_s
    fast = [(h, p) for h, p in plans if p.decode_tok_s >= floor]
    objective = request.objective
    chosen: Plan
    desktop = _desktop_choice(ordered, hardware, request, label)
    if desktop is not None:
        chosen = desktop
    elif objective == "speed":
        chosen = max((p for _, p in plans), key=lambda p: p.decode_tok_s)
    elif fast:
        full = [p for _, p in fast if p.full_offload]
        chosen = full[0] if (full and objective == "balanced") else fast[0][1]
    elif objective == "quality":
        chosen = plans[0][1]
    else:
        chosen = max((p for _, p in plans), key=lambda p: p.decode_tok_s)
    best_full = next((p for _, p in plans if p.full_offload), None)
    for _, plan in plans:
        if plan.quant == chosen.quant:
            continue
        better_quality = ladder.index(plan.quant) < ladder.index(chosen.quant)
        if better_quality and plan.full_offload and plan.n_ctx_slot < chosen.n_ctx_slot:
            reasons[plan.quant] = (
                f"fits on the GPU only with {plan.n_ctx_slot} tokens per conversation; "
                f"{chosen.quant} keeps {chosen.n_ctx_slot} (context first)"
            )
        elif plan.decode_tok_s < floor:
            reasons[plan.quant] = (
                f"{plan.decode_tok_s:.1f} tok/s is below the {floor:g} tok/s "
                f"floor ({plan.n_gpu_layers}/{plan.n_layer + 1} layers on GPU)"
            )
        elif better_quality and not plan.full_offload and best_full is not None:
            reasons[plan.quant] = (
                f"partial offload ({plan.n_gpu_layers}/{plan.n_layer + 1} layers on GPU) decodes "
                f"{plan.decode_tok_s:.1f} tok/s, slower than {best_full.quant} fully on the GPU "
                f"({best_full.decode_tok_s:.1f} tok/s); --objective quality prefers it"
            )
        elif better_quality:
            reasons[plan.quant] = (
                f"slower ({plan.decode_tok_s:.1f} tok/s) than "
                f"{chosen.quant} ({chosen.decode_tok_s:.1f} tok/s)"
            )
        else:
            reasons[plan.quant] = f"lower quality than {chosen.quant}, which also fits"
    warnings = list(chosen.warnings)
    if not fast and not any("below" in w for w in warnings):
        warnings.append(_speed_warning(chosen, ordered[0], request))
    rejected = tuple((q, reasons[q]) for q in ladder if q in reasons)
    return replace(
        chosen, rejected=rejected, ladder=ladder, ladder_files=files, warnings=tuple(warnings)
    )
