"""llama.cpp RPC: the host parser and address policy, the protocol client, and a model split over
two real rpc-server processes on loopback plus the local host.

The split tests need the RPC build of scripts/build-rpc.sh (rpc-server plus an RPC-enabled
libllama); where it is absent they skip and say how to get it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from localllm.engine import Engine, EngineConfig
from localllm.errors import (
    ModelLoadError,
    RpcAddressError,
    RpcProtocolError,
    RpcUnreachableError,
    SettingsError,
)
from localllm.fitter import FitRequest, fit_header, format_plan
from localllm.gguf_header import ModelHeader, read_header
from localllm.hardware import GIB, GPUProbe, Hardware, HostInfo, parse_gpu_names
from localllm.rpc import (
    RPC_PROTO_MAJOR,
    RpcEndpoint,
    RpcServerInfo,
    check_address,
    hardware_with_rpc,
    is_private_address,
    parse_rpc_servers,
    query_server,
    resolve_servers,
)
from localllm.settings import load_settings
from tests import gguf_factory as gf

REPO = Path(__file__).resolve().parent.parent
MIB = 1024**2
CHILD = Path(__file__).resolve().parent / "rpc_child.py"


# ------------------------------------------------------------------ parsing and address policy


def test_parse_hosts_ports_and_memory_given_by_hand() -> None:
    endpoints = parse_rpc_servers("192.168.1.20:50052, gpu-box:6000=24GiB,10.0.0.7")
    assert endpoints == (
        RpcEndpoint("192.168.1.20", 50052),
        RpcEndpoint("gpu-box", 6000, 24 * GIB),
        RpcEndpoint("10.0.0.7", 50052),  # rpc-server's default port
    )
    assert endpoints[1].address == "gpu-box:6000"
    assert parse_rpc_servers(["a:1", "b:2=512MiB"])[1].memory_bytes == 512 * 1024**2
    assert parse_rpc_servers("") == () and parse_rpc_servers(None) == ()


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("host:0", "port"),
        ("host:70000", "port"),
        ("host:http", "port"),
        (":50052", "cannot read"),
        ("[::1]:50052", "IPv6"),
        ("fe80::1:50052", "cannot read"),
        ("a:1=lots", "size"),
        ("a:1=0GiB", "more than zero"),
        ("a:1,a:1", "twice"),
    ],
)
def test_parse_rejects_what_llama_cpp_could_not_use(text: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=complaint):
        parse_rpc_servers(text)


@pytest.mark.parametrize(
    ("address", "private"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.9", True),
        ("192.168.178.20", True),
        ("169.254.10.1", True),  # link-local
        ("100.101.102.103", True),  # CGNAT: Tailscale and similar VPNs
        ("8.8.8.8", False),
        ("172.32.0.1", False),  # just outside 172.16/12
        ("1.1.1.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
    ],
)
def test_private_addresses(address: str, private: bool) -> None:
    assert is_private_address(address) is private


def test_a_public_host_is_refused_unless_allowed() -> None:
    public = RpcEndpoint("8.8.8.8", 50052)
    with pytest.raises(RpcAddressError, match="8.8.8.8.*unauthenticated.*rpc_allow_public"):
        check_address(public)
    check_address(public, allow_public=True)  # the setting lets it through
    check_address(RpcEndpoint("localhost", 50052))
    with pytest.raises(RpcAddressError):
        query_server(public, timeout_s=0.5)  # refused before any packet is sent


def test_unknown_host_name_is_unreachable() -> None:
    with pytest.raises(RpcUnreachableError, match="does not resolve"):
        check_address(RpcEndpoint("no-such-host.invalid", 50052))


# ------------------------------------------------------------------ the protocol client's errors


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_nothing_listening_is_unreachable_and_names_the_host() -> None:
    port = _free_port()
    with pytest.raises(RpcUnreachableError, match=f"127.0.0.1:{port}.*connection refused"):
        query_server(RpcEndpoint("127.0.0.1", port), timeout_s=1)


def test_a_host_that_accepts_but_never_answers_times_out() -> None:
    # rpc-server serves one client at a time: a held host looks exactly like this.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(RpcUnreachableError, match="one client at a time"):
            query_server(RpcEndpoint("127.0.0.1", port), timeout_s=0.5)
        assert time.monotonic() - started < 5


def _answer_once(listener: socket.socket, reply: bytes) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.recv(1 + 8 + 24)
        conn.sendall(reply)


def test_another_protocol_version_is_refused() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        # A HELLO reply of protocol major+1: size 28, then major, minor, patch, pad, caps.
        reply = (28).to_bytes(8, "little") + bytes([RPC_PROTO_MAJOR + 1, 0, 0, 0]) + bytes(24)
        server = threading.Thread(target=_answer_once, args=(listener, reply))
        server.start()
        with pytest.raises(RpcProtocolError, match=f"protocol {RPC_PROTO_MAJOR + 1}.0.0"):
            query_server(RpcEndpoint("127.0.0.1", port), timeout_s=2)
        server.join()


def test_memory_given_by_hand_plans_an_unreachable_host() -> None:
    port = _free_port()
    (info,) = resolve_servers([RpcEndpoint("127.0.0.1", port, 24 * GIB)], timeout_s=0.5)
    assert info.version is None
    assert [(d.total_bytes, d.reported) for d in info.devices] == [(24 * GIB, False)]
    with pytest.raises(RpcUnreachableError, match=f"127.0.0.1:{port}=24GiB"):
        resolve_servers([RpcEndpoint("127.0.0.1", port)], timeout_s=0.5)


def test_engine_refuses_rpc_cleanly_on_a_build_or_host_that_cannot(
    embedded_model_path: Path,
) -> None:
    # In this process llama_cpp is the stock build (no RPC): a clear load error, not an abort.
    # With an RPC build installed instead, the dead host is named before llama.cpp connects.
    port = _free_port()
    config = EngineConfig(
        model_path=embedded_model_path,
        n_ctx=256,
        n_parallel=1,
        n_gpu_layers=-1,
        rpc_servers=(RpcEndpoint("127.0.0.1", port),),
    )
    with pytest.raises((ModelLoadError, RpcUnreachableError)) as caught:
        Engine.load(config)
    if isinstance(caught.value, RpcUnreachableError):
        assert f"127.0.0.1:{port}" in str(caught.value)
    else:
        assert "build-rpc.sh" in str(caught.value)


# ------------------------------------------------------------------ planning across hosts

HOST = HostInfo(64 * GIB, 56 * GIB, 8, 16, 60e9, 1e12, "assumed")


def _given(address: str, memory: int) -> RpcServerInfo:
    (info,) = resolve_servers(parse_rpc_servers(f"{address}={memory // GIB}GiB"), timeout_s=0.2)
    return info


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory: pytest.TempPathFactory) -> ModelHeader:
    path = gf.write_gguf(tmp_path_factory.mktemp("rpc") / "70b.gguf", gf.LLAMA_70B)
    return read_header(path)


def test_remote_devices_come_first_and_take_layers_by_memory(llama70b: ModelHeader) -> None:
    """A 70B Q4_K_M (~40 GiB) on one local 24 GiB card does not fit; with two RPC hosts of
    24 and 12 GiB it does, split like llama.cpp: remote devices first, by free memory."""
    local = Hardware(parse_gpu_names("rtx3090"), HOST, 16)
    request = FitRequest(n_ctx=4096)
    alone = fit_header(llama70b, local, request)
    assert not alone.full_offload  # most of it stays in host memory
    a, b = _given("10.0.0.2:50052", 24 * GIB), _given("10.0.0.3:50052", 12 * GIB)
    hardware = hardware_with_rpc(local, [a, b], "rtx4090", latency_s=0.0005)
    plan = fit_header(llama70b, hardware, request)
    assert plan.full_offload and plan.fits
    names = [(d.name, d.description) for d in plan.devices]
    assert names == [
        ("RPC0", "10.0.0.2:50052 NVIDIA GeForce RTX 4090"),
        ("RPC1", "10.0.0.3:50052 NVIDIA GeForce RTX 4090"),
        ("CUDA0", "NVIDIA GeForce RTX 3090"),
        ("host", "host RAM"),
    ]
    rpc0, rpc1, cuda0, _ = plan.devices
    assert rpc0.overhead_bytes == rpc1.overhead_bytes == 0  # the server's own, not counted
    assert cuda0.overhead_bytes > 0
    assert rpc0.n_layers + rpc1.n_layers + cuda0.n_layers == 80
    assert rpc0.n_layers > cuda0.n_layers > rpc1.n_layers  # 24 GiB, 24 GiB local, 12 GiB
    assert all(d.kv_bytes > 0 for d in plan.gpus)  # each device holds its layers' cache
    assert plan.tensor_split is not None and len(plan.tensor_split) == 3
    assert plan.rpc_servers == ("10.0.0.2:50052", "10.0.0.3:50052")
    assert "--rpc 10.0.0.2:50052,10.0.0.3:50052" in plan.llama_server_command()
    # host -> RPC0 -> RPC1 -> CUDA0 (which holds the output layer): three network transfers.
    assert plan.link_transfers == 3
    text = format_plan(plan)
    assert "RPC0 10.0.0.2:50052" in text and "3 transfers per token" in text


def test_link_latency_adds_per_transfer_and_warns_when_it_dominates(
    llama70b: ModelHeader,
) -> None:
    a, b = _given("10.0.0.2:50052", 24 * GIB), _given("10.0.0.3:50052", 24 * GIB)
    base = Hardware((), HOST, 16)
    request = FitRequest(n_ctx=4096, n_gpu_layers=-1)
    lan = fit_header(llama70b, hardware_with_rpc(base, [a, b], "rtx4090", 0.0005), request)
    wan = fit_header(llama70b, hardware_with_rpc(base, [a, b], "rtx4090", 0.0505), request)
    # host -> RPC0 -> RPC1 (output) -> logits back: three transfers of 50 ms more each.
    assert lan.link_transfers == wan.link_transfers == 3
    extra = 1 / wan.decode_tok_s - 1 / lan.decode_tok_s
    assert extra == pytest.approx(3 * 0.05, rel=1e-6)
    assert not any("network sets the pace" in w for w in lan.warnings)
    assert any("network sets the pace" in w for w in wan.warnings)


def test_fit_cli_plans_hosts_given_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    from localllm.cli import main

    port = _free_port()  # nothing listens: the memory given by hand is planned
    assert main(["fit", "--rpc", f"127.0.0.1:{port}=8GiB", "--rpc-device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    remote = [d for d in data["devices"] if d["name"].startswith("RPC")]
    assert [(d["name"], d["capacity_bytes"]) for d in remote] == [("RPC0", 8 * GIB)]
    assert data["rpc_servers"] == [f"127.0.0.1:{port}"]
    assert f"--rpc 127.0.0.1:{port}" in data["llama_server_command"]


def test_rpc_settings_are_checked_at_start() -> None:
    with pytest.raises(SettingsError, match="rpc"):
        load_settings(rpc="10.0.0.2:http")
    with pytest.raises(SettingsError, match="--rpc-device voodoo5"):
        load_settings(rpc_device="voodoo5")
    assert load_settings(rpc="10.0.0.2:50052=24GiB").rpc == "10.0.0.2:50052=24GiB"


# ------------------------------------------------------------------ real rpc-servers (RPC build)


def _rpc_build_dir() -> Path:
    if os.environ.get("LOCALLLM_RPC_BUILD"):
        return Path(os.environ["LOCALLLM_RPC_BUILD"])
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-rpc.sh"), "--print-dir"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


@dataclass
class RpcBuild:
    server: Path
    lib: Path


@pytest.fixture(scope="module")
def rpc_build() -> RpcBuild:
    build = _rpc_build_dir()
    server, lib = build / "bin" / "rpc-server", build / "lib"
    if not (server.is_file() and (lib / "libggml-rpc.so").is_file()):
        pytest.skip(
            f"no RPC build at {build}: run scripts/build-rpc.sh once (about 15 minutes on two "
            "cores, then cached) to run the split-model tests"
        )
    return RpcBuild(server, lib)


@dataclass
class RpcServer:
    endpoint: RpcEndpoint
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def peak_allocated_bytes(self) -> int:
        """The most this server held for its client at once, from its GGML_RPC_DEBUG log."""
        live: dict[str, int] = {}
        peak = 0
        for line in self.log_path.read_text(errors="replace").splitlines():
            # [alloc_buffer] device: 0, size: N -> remote_ptr: P, remote_size: N
            # [free_buffer] remote_ptr: P
            if line.startswith("[alloc_buffer]") and "remote_size:" in line:
                pointer = line.split("remote_ptr:", 1)[1].split(",", 1)[0].strip()
                live[pointer] = int(line.rsplit("remote_size:", 1)[1].strip())
                peak = max(peak, sum(live.values()))
            elif line.startswith("[free_buffer]"):
                live.pop(line.split("remote_ptr:", 1)[1].strip(), None)
        return peak


def _start_rpc_server(build: RpcBuild, tmp: Path, name: str) -> RpcServer:
    port = _free_port()
    log_path = tmp / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(build.server), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GGML_RPC_DEBUG": "1"},
        )
    endpoint = RpcEndpoint("127.0.0.1", port)
    deadline = time.monotonic() + 30
    while True:
        try:
            query_server(endpoint, timeout_s=2)
            break
        except RpcUnreachableError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"rpc-server did not start: {log_path.read_text()}") from None
            time.sleep(0.1)
    return RpcServer(endpoint, process, log_path)


@pytest.fixture
def rpc_servers(rpc_build: RpcBuild, tmp_path: Path) -> Iterator[list[RpcServer]]:
    servers = [_start_rpc_server(rpc_build, tmp_path, f"rpc{i}") for i in range(2)]
    yield servers
    for server in servers:
        server.stop()


def _child(build: RpcBuild, spec: dict[str, object]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LLAMA_CPP_LIB_PATH": str(build.lib)},
    )


def _generate(build: RpcBuild, spec: dict[str, object]) -> dict[str, object]:
    child = _child(build, spec)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def test_rpc_server_reports_its_memory(rpc_servers: list[RpcServer]) -> None:
    # A CPU rpc-server's device is the host's RAM: ggml reports physical pages x page size.
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for server in rpc_servers:
        info = query_server(server.endpoint)
        assert info.version is not None and info.version[0] == RPC_PROTO_MAJOR
        assert [(d.index, d.total_bytes, d.free_bytes) for d in info.devices] == [(0, ram, ram)]


def _mib_by_device(lines: list[str]) -> dict[str, float]:
    """MiB per device from llama.cpp's load log: "CPU", or a remote host's "host:port".

    Remote buffers are named after the device index on their server and the server:
    "load_tensors: RPC0[127.0.0.1:4242] model buffer size =    81.52 MiB".
    """
    found: dict[str, float] = {}
    for line in lines:
        body = line.split(":", 1)[-1].strip()
        if "buffer size" not in body or "=" not in body:
            continue
        label = body.split()[0]
        device = label.split("[", 1)[1].rstrip("]") if "[" in label else label.split("_")[0]
        mib = float(body.rsplit("=", 1)[1].split("MiB")[0])
        found[device] = found.get(device, 0.0) + mib
    return found


def test_split_three_ways_gives_the_local_text(
    rpc_build: RpcBuild, rpc_servers: list[RpcServer], embedded_model_path: Path
) -> None:
    """Gemma 3 270M has 18 layers: with 12 of the 19 positions offloaded, halved, layers 7-12 go
    to the first host, 13-17 and the output layer to the second, and the token embedding and
    layers 0-6 stay on this host."""
    base = {"model": str(embedded_model_path), "max_tokens": 24}
    local = _generate(rpc_build, base)
    rpc = ",".join(s.endpoint.address for s in rpc_servers)
    split = _generate(rpc_build, {**base, "rpc": rpc, "n_gpu_layers": 12, "tensor_split": [1, 1]})
    assert split["text"] == local["text"] and local["text"]

    per_device = _mib_by_device(split["memory_lines"])  # type: ignore[arg-type]
    assert set(per_device) == {"CPU"} | {s.endpoint.address for s in rpc_servers}, per_device
    # The fitter's plan for the same load: the hosts as their memory query reports them.
    hardware = hardware_with_rpc(
        Hardware((), HOST, 1, cpu_repack=False),
        [query_server(s.endpoint) for s in rpc_servers],
        "cpu",
    )
    request = FitRequest(n_ctx=512, n_parallel=1, n_gpu_layers=12, n_ubatch=512, n_batch=512)
    plan = fit_header(read_header(embedded_model_path), hardware, request)
    assert plan.tensor_split == (0.5, 0.5)
    for server, device in zip(rpc_servers, plan.gpus, strict=True):
        # What this host's llama.cpp says it put on a remote device (weights, KV cache, compute
        # buffer) is what that rpc-server allocated, to the rounding of the log's MiB figures.
        allocated = server.peak_allocated_bytes() / MIB
        assert abs(allocated - per_device[server.endpoint.address]) < 0.05, (allocated, per_device)
        # The fitter: weights and KV cache exact, the compute buffer (modelled) within 3 MiB.
        assert device.description.startswith(server.endpoint.address)
        log_lines = [line for line in split["memory_lines"] if server.endpoint.address in line]  # type: ignore[union-attr]
        weights = _mib_by_device([line for line in log_lines if "model buffer" in line])
        assert device.weights_bytes / MIB == pytest.approx(
            weights[server.endpoint.address], abs=0.01
        )
        planned = (device.total_bytes - device.overhead_bytes) / MIB
        assert abs(planned - allocated) < 3.0, (device, allocated)


def test_losing_a_host_mid_stream_fails_cleanly(
    rpc_build: RpcBuild, rpc_servers: list[RpcServer], embedded_model_path: Path
) -> None:
    first, doomed = rpc_servers
    spec = {
        "model": str(embedded_model_path),
        "rpc": f"{first.endpoint.address},{doomed.endpoint.address}",
        "n_gpu_layers": -1,
        "tensor_split": [1, 1],
        "max_tokens": 400,
        "mode": "stream",
    }
    child = _child(rpc_build, spec)
    assert child.stdout is not None and child.stderr is not None
    try:
        tokens = 0
        while tokens < 3:
            line = child.stdout.readline()
            assert line, f"the stream ended early: {child.stderr.read()[-3000:]}"
            tokens += line.startswith("token")
        doomed.stop()
        killed_at = time.monotonic()
        rest = child.stdout.read()  # until the process ends
        returncode = child.wait(timeout=60)
        took = time.monotonic() - killed_at
        err = child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
    from localllm.engine.rpc import EXIT_HOST_LOST

    assert returncode == EXIT_HOST_LOST, err[-3000:]
    assert took < 30
    error_line = next(line for line in rest.splitlines() if line.startswith("error"))
    assert "RpcHostLostError" in error_line
    assert doomed.endpoint.address in error_line
    assert first.endpoint.address not in error_line, err[-2000:]  # the live host is not blamed
    assert f"RPC host {doomed.endpoint.address}" in err  # and the log names it too


def test_serve_across_hosts_and_a_host_that_goes_away(
    rpc_build: RpcBuild, rpc_servers: list[RpcServer], embedded_model_path: Path
) -> None:
    """`localllm serve --rpc` loads with the fitter's plan over both hosts; when one dies
    mid-stream the stream ends with a 503-class error naming it and the server exits 75."""
    import httpx

    from localllm.engine.rpc import EXIT_HOST_LOST

    first, doomed = rpc_servers
    port = _free_port()
    command = [
        sys.executable, "-m", "localllm", "serve", str(embedded_model_path),
        "--rpc", f"{first.endpoint.address},{doomed.endpoint.address}", "--rpc-device", "cpu",
        "--port", str(port), "--parallel", "1", "--n-ctx", "512", "--threads", "1",
        "--n-batch", "512",
    ]  # fmt: skip
    server = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LLAMA_CPP_LIB_PATH": str(rpc_build.lib)},
    )
    assert server.stderr is not None
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.5)
        body = {"prompt": "The three primary colours are", "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"]

        events: list[str] = []
        stream_body = {**body, "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=stream_body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    doomed.stop()
        returncode = server.wait(timeout=60)
        log = server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert errors, events[-5:]
    assert errors[0]["code"] == "rpc_host_unavailable"
    assert doomed.endpoint.address in errors[0]["message"]
    assert first.endpoint.address not in errors[0]["message"]
    assert events[-1] == "[DONE]"
    assert returncode == EXIT_HOST_LOST
    assert f"RPC host {doomed.endpoint.address}" in log


def test_doctor_reports_rpc_build_and_each_host(
    rpc_servers: list[RpcServer], tmp_path: Path
) -> None:
    from localllm.doctor import doctor_report, format_doctor
    from localllm.engine.build import BackendDevice, BuildInfo, RepackProbe

    cpu = BackendDevice("CPU", "x86", "cpu", 24 * GIB, 24 * GIB)
    stock = BuildInfo("0.3.36", False, ("CPU",), (cpu,))
    rpc_backend = BuildInfo("0.3.36", False, ("CPU", "RPC"), (cpu,))
    up, dead = rpc_servers[0].endpoint.address, f"127.0.0.1:{_free_port()}"
    settings = load_settings(None, models_dir=tmp_path / "models", rpc=f"{up},{dead}")
    probes = {
        "gpus": GPUProbe((), "none"),
        "host": HOST,
        "repack": RepackProbe(False, "cache", "fixed"),
    }

    report = doctor_report(settings, None, (), build=stock, **probes)  # type: ignore[arg-type]
    first, second = report.rpc_hosts
    assert (first.address, first.reachable, first.version) == (up, True, f"{RPC_PROTO_MAJOR}.0.0")
    assert first.devices and "free of" in first.devices[0]
    assert (second.address, second.reachable) == (dead, False)
    assert second.error is not None and "connection refused" in second.error
    errors = [a for a in report.advice if a.level == "error"]
    assert any("no RPC backend" in a.message and "build-rpc.sh" in (a.fix or "") for a in errors)
    assert any(dead in a.message for a in errors) and not report.ok
    assert "RPC hosts (this build's RPC backend: no)" in format_doctor(report)

    with_rpc = doctor_report(settings, None, (), build=rpc_backend, **probes)  # type: ignore[arg-type]
    assert not any("no RPC backend" in a.message for a in with_rpc.advice)
    assert any(a.level == "ok" and up in a.message for a in with_rpc.advice)
