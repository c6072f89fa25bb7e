"""Predicted decode and prompt speed of a placement (pure arithmetic).

Decode, one token at the start of a conversation (like llama-bench's tg128):
- a GPU streams its weights once per token: bytes / (0.93 x bandwidth), plus ~3 ms of launch and
  synchronisation per token (fits published llama.cpp figures: RTX 3090 8B Q4_K_M 115 tok/s,
  RTX 4090 131, 8B F16 47 / 55);
- host-side layers cost their weights' elements over the CPU's quantized dot-product rate
  (threads x per-core rate) plus half (the part not overlapped) of their bytes over the host's
  measured copy bandwidth: on few cores the CPU is compute-bound (2 threads decode Gemma 3 270M
  about twice as fast as 1, which bandwidth alone would not explain). The rate is
  CPU_ELEMENTS_PER_FLOP x the probe's float32 matmul FLOP/s per core. Both constants are
  calibrated on one 2-core AVX-512 VM against llama.cpp decoding Gemma 3 270M Q4_K_M with 1 and
  2 threads; on many-core desktops the CPU term is likely pessimistic.
- MoE layers read only n_expert_used of n_expert experts per token.
- Remote devices (llama.cpp's RPC backend) compute like local ones of their kind, and a token
  pays the network for every change between this host and a remote device along the layers:
  a round trip plus the activations (n_embd floats), and the logits (n_vocab floats) when the
  output layer is remote. llama.cpp's scheduler waits for each remote result before the next
  device starts, so these add up rather than overlap.

Prompt processing (compute bound, per micro-batch of n_ubatch tokens): 2 FLOP per weight per
token at the GPU's effective prefill throughput; layers kept in host memory are copied to the GPU
for each micro-batch (llama.cpp's op offload) over PCIe; without a GPU the CPU does it at
CPU_PREFILL_EFFICIENCY x its matmul FLOP/s.
"""

from __future__ import annotations

from dataclasses import dataclass

GPU_BANDWIDTH_EFFICIENCY = 0.93
GPU_TOKEN_OVERHEAD_S = 0.003
CPU_ELEMENTS_PER_FLOP = 0.045
# Host weight streaming overlaps the dot products in part: half its time shows (same calibration).
HOST_BANDWIDTH_OVERLAP = 0.5
# With repacked CPU weights (CPU_REPACK) llama.cpp's interleaved integer kernels are so much faster
# that streaming the weights dominates and barely overlaps: fitted to Gemma 3 270M Q4_K_M decoding
# 82.9 tok/s on 1 thread and 87.8 on 2 on a 2-core AMD EPYC VM (probe: 40.2 GB/s copy, 235 GFLOP/s;
# scripts/bench_fit.py): 1.75 x bytes / copy bandwidth + elements / (1.7 x FLOP/s per core x cores).
# Two points from one model and one machine: an estimate elsewhere.
REPACK_BYTES_FACTOR = 1.75
REPACK_ELEMENTS_PER_FLOP = 1.7
CPU_PREFILL_EFFICIENCY = 0.5
# What one more token adds to a CPU decode step of a few tokens (speculative verification), as a
# share of the step: 9 ms of 12.4 ms for SmolLM2-135M Q4_1 on 2 cores (scripts/bench_spec.py:
# n-gram guesses at 0.86-0.91 acceptance gained x1.08-1.10). One model, one machine.
CPU_BATCH_TOKEN_SHARE = 0.7
PCIE_BYTES_S = 25e9  # PCIe 4.0 x16, what host-to-device copies reach in practice


@dataclass(frozen=True)
class DeviceWork:
    """What one device reads and computes per generated token."""

    read_bytes: int
    elements: int


def decode_seconds_per_token(
    gpu_work: list[tuple[DeviceWork, float]],  # (work, bandwidth bytes/s) per GPU
    host_work: DeviceWork,
    host_bandwidth_bytes_s: float,
    host_rate_elements_s: float,
    host_bytes_factor: float = HOST_BANDWIDTH_OVERLAP,
) -> float:
    """`host_bytes_factor`: how much of the host's weight streaming shows in the token time
    (HOST_BANDWIDTH_OVERLAP, or REPACK_BYTES_FACTOR with repacked weights)."""
    seconds = 0.0
    if any(work.read_bytes for work, _ in gpu_work):
        seconds += GPU_TOKEN_OVERHEAD_S
        for work, bandwidth in gpu_work:
            seconds += work.read_bytes / (GPU_BANDWIDTH_EFFICIENCY * bandwidth)
    if host_work.read_bytes:
        seconds += host_bytes_factor * host_work.read_bytes / host_bandwidth_bytes_s
        seconds += host_work.elements / host_rate_elements_s
    return seconds


def link_seconds_per_token(
    transfers: list[int], latency_s: float, link_bytes_s: float
) -> float:
    """Network time of one token: each transfer between this host and a remote device (or
    between two remote devices, through this host) is one round trip plus its bytes."""
    return sum(latency_s + n_bytes / link_bytes_s for n_bytes in transfers)


def prompt_tokens_per_second(
    gpu_elements: list[tuple[int, float]],  # (weight elements, effective FLOP/s) per GPU
    host_work: DeviceWork,
    host_prefill_flops: float,
    n_ubatch: int,
    first_gpu_flops: float | None,
) -> float:
    """Prompt tokens per second for micro-batches of n_ubatch tokens."""
    seconds = 0.0  # per micro-batch
    for elements, flops in gpu_elements:
        seconds += 2 * elements * n_ubatch / flops
    if host_work.elements:
        if first_gpu_flops is not None and n_ubatch >= 32:
            # op offload: host weights go over PCIe and are multiplied on the first GPU
            seconds += host_work.read_bytes / PCIE_BYTES_S
            seconds += 2 * host_work.elements * n_ubatch / first_gpu_flops
        else:
            seconds += 2 * host_work.elements * n_ubatch / host_prefill_flops
    return n_ubatch / seconds if seconds > 0 else 0.0
