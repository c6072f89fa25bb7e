"""Benchmark a model split over llama.cpp rpc-servers on loopback against a local load.

Starts two rpc-server processes on 127.0.0.1 (from scripts/build-rpc.sh's cache), then loads the
embedded Gemma 3 270M in a child process with the RPC-enabled libllama, four ways: all local,
all on one host, all on two hosts, and split three ways (this host + two). Each run generates
greedy tokens and reports llama.cpp's decode speed. "Boundaries" counts the device changes a
token's activations cross on the way through the layers and back, each a network transfer.
Every process uses one thread, so the rows differ by where the layers sit and how often a token
crosses the network, not by core counts. It also times the protocol's handshake round trip,
and prints what the fitter predicts for each placement (with the link it measured: the memory
query's round trip and TCP throughput over loopback).

    .venv/bin/python scripts/bench_rpc.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localllm.errors import RpcUnreachableError  # noqa: E402
from localllm.fitter import FitRequest, fit_header  # noqa: E402
from localllm.gguf_header import read_header  # noqa: E402
from localllm.hardware import Hardware, probe_host  # noqa: E402
from localllm.models import embedded_model_path  # noqa: E402
from localllm.rpc import RpcEndpoint, RpcServerInfo, hardware_with_rpc, query_server  # noqa: E402

CHILD = ROOT / "tests" / "rpc_child.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_server(
    rpc_server: Path, log_dir: Path, name: str
) -> tuple[RpcEndpoint, subprocess.Popen[bytes]]:
    port = _free_port()
    with (log_dir / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(
            [str(rpc_server), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = RpcEndpoint("127.0.0.1", port)
    deadline = time.monotonic() + 30
    while True:
        try:
            query_server(endpoint, timeout_s=2)
            return endpoint, process
        except RpcUnreachableError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"rpc-server did not start (log: {log_dir / name}.log)") from None
            time.sleep(0.1)


def _run(lib: Path, spec: dict[str, object]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, str(CHILD), json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "LLAMA_CPP_LIB_PATH": str(lib)},
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"the engine failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _handshake_ms(endpoint: RpcEndpoint, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        query_server(endpoint, timeout_s=2)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _loopback_bytes_s(n_bytes: int = 256 * 1024**2) -> float:
    """TCP throughput over 127.0.0.1: what the RPC link is here."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        received = [0]

        def drain() -> None:
            conn, _ = listener.accept()
            with conn:
                while chunk := conn.recv(1 << 20):
                    received[0] += len(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        block = bytes(1 << 20)
        started = time.perf_counter()
        with socket.create_connection(listener.getsockname()) as sender:
            for _ in range(n_bytes // len(block)):
                sender.sendall(block)
        reader.join()
        return received[0] / (time.perf_counter() - started)


def _predicted(
    model: Path, infos: list[RpcServerInfo], n_gpu_layers: int, latency_s: float, bytes_s: float
) -> float:
    """The fitter's decode tok/s for this placement (one thread everywhere, no repacking)."""
    hardware = Hardware((), probe_host(), 1, cpu_repack=False)
    if infos:
        hardware = hardware_with_rpc(hardware, infos, "cpu", latency_s, bytes_s)
    request = FitRequest(
        n_ctx=512, n_parallel=1, n_gpu_layers=n_gpu_layers, n_ubatch=512, n_batch=512
    )
    return fit_header(read_header(model), hardware, request).decode_tok_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median reported)")
    parser.add_argument("--build", type=Path, help="scripts/build-rpc.sh's cache folder")
    args = parser.parse_args()

    build = args.build or Path(
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "build-rpc.sh"), "--print-dir"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    rpc_server, lib = build / "bin" / "rpc-server", build / "lib"
    if not rpc_server.is_file():
        raise SystemExit(f"no rpc-server in {build}: run scripts/build-rpc.sh first")
    model = embedded_model_path(ROOT / "models")

    with tempfile.TemporaryDirectory() as tmp:
        servers = [_start_server(rpc_server, Path(tmp), f"rpc{i}") for i in range(2)]
        try:
            (a, _), (b, _) = servers
            base = {"model": str(model), "max_tokens": args.tokens}
            rows = [
                ("local (CPU, 1 thread)", 0, {}),
                ("1 host: all layers remote", 2, {"rpc": a.address, "n_gpu_layers": -1}),
                (
                    "2 hosts: all layers remote",
                    3,
                    {"rpc": f"{a.address},{b.address}", "n_gpu_layers": -1, "tensor_split": [1, 1]},
                ),
                (
                    "3 ways: 7 local, 6 + 5 remote layers",
                    3,
                    {"rpc": f"{a.address},{b.address}", "n_gpu_layers": 12, "tensor_split": [1, 1]},
                ),
            ]
            latency = _handshake_ms(a)
            infos = {e.address: query_server(e) for e, _ in servers}
            round_trip_s = max(i.round_trip_s or 0.0 for i in infos.values())
            link_bytes_s = _loopback_bytes_s()
            print(f"loopback RPC handshake round trip (connect + HELLO + memory): {latency:.2f} ms")
            print(
                f"link for the fitter: {round_trip_s * 1e6:.0f} us round trip (memory query), "
                f"{link_bytes_s * 8 / 1e9:.1f} Gbit/s (TCP over loopback)"
            )
            print(
                f"embedded Gemma 3 270M Q4_K_M, {args.tokens} greedy tokens,"
                f" median of {args.repeats}"
            )
            # "fitter" is the plan's absolute figure (its CPU rate comes from the host probe);
            # "scaled" is the measured local speed times the fitter's ratio to its local figure,
            # which isolates what the RPC placement and link cost in the model.
            print(
                f"{'placement':38} {'boundaries':>10} {'decode tok/s':>13} {'vs local':>9} "
                f"{'fitter':>7} {'scaled':>7}  runs"
            )
            local_speed = local_predicted = 0.0
            texts = set()
            for name, hops, extra in rows:
                speeds = []
                for _ in range(args.repeats):
                    result = _run(lib, {**base, **extra})
                    speeds.append(float(result["decode_tokens_per_s"]))  # type: ignore[arg-type]
                    texts.add(result["text"])
                speed = statistics.median(speeds)
                local_speed = local_speed or speed
                used = [infos[h] for h in str(extra.get("rpc", "")).split(",") if h]
                ngl = int(extra.get("n_gpu_layers", 0))  # type: ignore[call-overload]
                predicted = _predicted(model, used, ngl, round_trip_s, link_bytes_s)
                local_predicted = local_predicted or predicted
                scaled = local_speed * predicted / local_predicted
                runs = " ".join(f"{s:.1f}" for s in speeds)
                print(
                    f"{name:38} {hops:>10} {speed:>13.1f} {speed / local_speed:>8.2f}x "
                    f"{predicted:>7.1f} {scaled:>7.1f}  {runs}"
                )
            print(f"greedy text identical in every run: {len(texts) == 1}")
        finally:
            for _, process in servers:
                process.send_signal(signal.SIGKILL)
                process.wait()


if __name__ == "__main__":
    main()
