"""Benchmark a model split over llama.cpp rpc-servers on loopback against a local load.

Starts two rpc-server processes on 127.0.0.1 (from scripts/build-rpc.sh's cache), then loads the
embedded Gemma 3 270M in a child process with the RPC-enabled libllama, four ways: all local,
all on one host, all on two hosts, and split three ways (this host + two). Each run generates
greedy tokens and reports llama.cpp's decode speed. "Boundaries" counts the device changes a
token's activations cross on the way through the layers and back, each a network transfer.
Every process uses one thread, so the rows differ by where the layers sit and how often a token
crosses the network, not by core counts. It also times the protocol's handshake round trip.

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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localllm.errors import RpcUnreachableError  # noqa: E402
from localllm.models import embedded_model_path  # noqa: E402
from localllm.rpc import RpcEndpoint, query_server  # noqa: E402

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
            print(f"loopback RPC handshake round trip (connect + HELLO + memory): {latency:.2f} ms")
            print(
                f"embedded Gemma 3 270M Q4_K_M, {args.tokens} greedy tokens,"
                f" median of {args.repeats}"
            )
            print(f"{'placement':38} {'boundaries':>10} {'decode tok/s':>13} {'vs local':>9}  runs")
            local_speed = 0.0
            texts = set()
            for name, hops, extra in rows:
                speeds = []
                for _ in range(args.repeats):
                    result = _run(lib, {**base, **extra})
                    speeds.append(float(result["decode_tokens_per_s"]))  # type: ignore[arg-type]
                    texts.add(result["text"])
                speed = statistics.median(speeds)
                local_speed = local_speed or speed
                runs = " ".join(f"{s:.1f}" for s in speeds)
                print(f"{name:38} {hops:>10} {speed:>13.1f} {speed / local_speed:>8.2f}x  {runs}")
            print(f"greedy text identical in every run: {len(texts) == 1}")
        finally:
            for _, process in servers:
                process.send_signal(signal.SIGKILL)
                process.wait()


if __name__ == "__main__":
    main()
