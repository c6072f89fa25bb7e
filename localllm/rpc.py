"""llama.cpp RPC hosts: parse `HOST:PORT[=SIZE],...`, apply the address policy, ask for memory.

A second machine runs llama.cpp's `rpc-server`, which exposes its GPU (or CPU) as a ggml device;
llama.cpp places layers on it as if it were local. This module speaks just enough of that
protocol to plan with: the handshake (HELLO, with the protocol version), DEVICE_COUNT and
GET_DEVICE_MEMORY. The engine registers the hosts with ggml's own RPC client
(`localllm.engine.rpc`); nothing here moves tensors.

Wire format (ggml/src/ggml-rpc/ggml-rpc.cpp, protocol 7.0.0 as vendored in llama-cpp-python
0.3.36), little-endian, packed:
    request:  | command (1 byte) | payload size (uint64) | payload |
    response: | payload size (uint64) | payload |
The first command on a connection must be HELLO. `rpc-server` serves one client at a time: while
a localllm server holds a host, a query waits in the listen queue until `timeout_s`.

The protocol has no authentication and lets a client read and write the server's memory, so a
host must have a private, loopback or link-local address unless the `rpc_allow_public` setting
says otherwise.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from localllm.errors import (
    RpcAddressError,
    RpcProtocolError,
    RpcUnreachableError,
    SettingsError,
)
from localllm.hardware import GPUInfo, Hardware, lookup_gpu, parse_size

# ggml-rpc.h of the vendored llama.cpp: a server answers with its version; the client accepts the
# same major and a minor no newer than its own.
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
DEFAULT_PORT = 50052  # rpc-server's default
DEFAULT_LATENCY_S = 0.0005  # a gigabit LAN's round trip, when nothing was measured or given

_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14  # fixed across versions ("RPC_CMD_HELLO must be always 14")
_CMD_DEVICE_COUNT = 15
_CONN_CAPS_SIZE = 24  # transport capabilities (RDMA); all zero means plain TCP
_MAX_DEVICES = 16  # GGML_RPC_MAX_SERVERS: a sanity bound on what a server may claim


@dataclass(frozen=True)
class RpcEndpoint:
    """One rpc-server: where it listens, and optionally memory given by hand (bytes)."""

    host: str
    port: int
    memory_bytes: int | None = None

    @property
    def address(self) -> str:
        """`host:port`, as llama.cpp's RPC client takes it."""
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True)
class RpcDevice:
    """A device one rpc-server exposes. `reported` is False when the memory was given by hand."""

    endpoint: RpcEndpoint
    index: int
    free_bytes: int
    total_bytes: int
    reported: bool = True

    @property
    def name(self) -> str:
        return f"{self.endpoint.address}#{self.index}"


@dataclass(frozen=True)
class RpcServerInfo:
    """What one rpc-server said about itself (or, unreachable, what the user gave)."""

    endpoint: RpcEndpoint
    version: tuple[int, int, int] | None  # None: not contacted
    devices: tuple[RpcDevice, ...]
    round_trip_s: float | None = None  # one request and its reply, as measured by the query


def parse_rpc_servers(text: str | Sequence[str] | None) -> tuple[RpcEndpoint, ...]:
    """`'10.0.0.2:50052,10.0.0.3:50052=24GiB'` (or a list of such parts) -> endpoints.

    A host without a port gets rpc-server's default (50052). `=SIZE` is that host's device memory
    given by hand: for planning ahead, or for a host that cannot be asked.
    """
    if text is None:
        return ()
    parts = [text] if isinstance(text, str) else list(text)
    endpoints: list[RpcEndpoint] = []
    for part in (p.strip() for chunk in parts for p in chunk.split(",")):
        if not part:
            continue
        endpoints.append(_parse_one(part))
    seen: set[str] = set()
    for endpoint in endpoints:
        if endpoint.address in seen:
            raise SettingsError(f"RPC host {endpoint.address} is listed twice")
        seen.add(endpoint.address)
    return tuple(endpoints)


def _parse_one(part: str) -> RpcEndpoint:
    where, _, memory = part.partition("=")
    where = where.strip()
    if where.startswith("["):
        raise SettingsError(
            f"RPC host {where!r}: llama.cpp's RPC client takes an IPv4 address or a host name, "
            "not an IPv6 address"
        )
    host, sep, port_text = where.rpartition(":")
    if not sep:
        host, port_text = where, str(DEFAULT_PORT)
    if not host or ":" in host or any(c.isspace() for c in host):
        raise SettingsError(
            f"cannot read the RPC host {part!r}; write it like 192.168.1.20:50052 "
            "(or 192.168.1.20:50052=24GiB to give its memory by hand)"
        )
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise SettingsError(f"RPC host {part!r}: the port must be a number from 1 to 65535")
    memory_bytes: int | None = None
    if memory.strip():
        memory_bytes = parse_size(memory)
        if memory_bytes <= 0:
            raise SettingsError(f"RPC host {part!r}: the memory must be more than zero")
    return RpcEndpoint(host, port, memory_bytes)


def is_private_address(address: str) -> bool:
    """Loopback, RFC 1918, link-local, CGNAT (Tailscale-style) and IPv6 ULA: not the internet."""
    ip = ipaddress.ip_address(address)
    return not ip.is_global and not ip.is_multicast and not ip.is_unspecified


def check_address(endpoint: RpcEndpoint, allow_public: bool = False) -> None:
    """Refuse a host that resolves to a public address, unless allowed; RpcAddressError."""
    if allow_public:
        return
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        raise RpcUnreachableError(
            endpoint.address, f"the host name does not resolve ({exc}); check the spelling"
        ) from exc
    addresses = {str(info[4][0]) for info in infos}
    public = sorted(a for a in addresses if not is_private_address(a))
    if public:
        raise RpcAddressError(
            endpoint.address,
            f"it resolves to the public address {', '.join(public)}; llama.cpp's RPC protocol "
            "is unauthenticated and gives any client the host's memory. Use a private network "
            "or a VPN, or set rpc_allow_public = true if you really mean it",
        )


def query_server(
    endpoint: RpcEndpoint, timeout_s: float = 5.0, allow_public: bool = False
) -> RpcServerInfo:
    """Ask one rpc-server for its version and each device's memory.

    Raises RpcAddressError (policy), RpcUnreachableError (no answer within timeout_s: down,
    firewalled, or busy serving another client) or RpcProtocolError (wrong version or a reply
    that is not rpc-server's).
    """
    check_address(endpoint, allow_public)
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s)
    except OSError as exc:
        raise RpcUnreachableError(endpoint.address, _connect_hint(exc)) from exc
    with sock:
        sock.settimeout(timeout_s)
        try:
            hello = _call(sock, _CMD_HELLO, bytes(_CONN_CAPS_SIZE), 4 + _CONN_CAPS_SIZE)
        except TimeoutError as exc:
            raise RpcUnreachableError(
                endpoint.address,
                f"it accepted the connection but did not answer within {timeout_s:g} s; "
                "rpc-server serves one client at a time, so another client (a running "
                "localllm serve?) may hold it",
            ) from exc
        except (OSError, _Malformed) as exc:
            raise RpcProtocolError(
                endpoint.address,
                f"the handshake failed ({exc}); is this an rpc-server of llama.cpp's protocol "
                f"{RPC_PROTO_MAJOR}.x?",
            ) from exc
        version = (hello[0], hello[1], hello[2])
        if version[0] != RPC_PROTO_MAJOR or version[1] > RPC_PROTO_MINOR:
            raise RpcProtocolError(
                endpoint.address,
                f"it speaks RPC protocol {'.'.join(map(str, version))}, this build speaks "
                f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.x; build rpc-server from the same "
                "llama-cpp-python version (scripts/build-rpc.sh) on that host",
            )
        try:
            (count,) = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4))
            if not 0 < count <= _MAX_DEVICES:
                raise _Malformed(f"it claims {count} devices")
            devices = []
            round_trips = []
            for index in range(count):
                started = time.perf_counter()
                reply = _call(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", index), 16)
                round_trips.append(time.perf_counter() - started)
                free, total = struct.unpack("<QQ", reply)
                devices.append(RpcDevice(endpoint, index, free, total))
        except (OSError, _Malformed) as exc:
            raise RpcProtocolError(endpoint.address, f"a memory query failed ({exc})") from exc
    return RpcServerInfo(endpoint, version, tuple(devices), min(round_trips))


def resolve_servers(
    endpoints: Iterable[RpcEndpoint],
    timeout_s: float = 5.0,
    allow_public: bool = False,
    must_answer: bool = False,
) -> tuple[RpcServerInfo, ...]:
    """Every host's devices for planning: memory given by hand wins, else the host is asked.

    A host with memory given by hand that cannot be reached is planned as one device of that
    size (planning ahead) unless `must_answer` (serving); one without fails with
    RpcUnreachableError naming it.
    """
    infos: list[RpcServerInfo] = []
    for endpoint in endpoints:
        if endpoint.memory_bytes is not None:
            given = RpcDevice(endpoint, 0, endpoint.memory_bytes, endpoint.memory_bytes, False)
            try:
                asked = query_server(endpoint, timeout_s, allow_public)
            except RpcUnreachableError:
                if must_answer:
                    raise
                infos.append(RpcServerInfo(endpoint, None, (given,)))
                continue
            infos.append(RpcServerInfo(endpoint, asked.version, (given,), asked.round_trip_s))
            continue
        try:
            infos.append(query_server(endpoint, timeout_s, allow_public))
        except RpcUnreachableError as exc:
            raise RpcUnreachableError(
                endpoint.address,
                f"{exc.problem}. Start it there (rpc-server --host 0.0.0.0 --port "
                f"{endpoint.port}), or give its memory by hand to plan ahead: "
                f"{endpoint.address}=24GiB",
            ) from exc
    return tuple(infos)


class _Malformed(Exception):
    """A reply that is not what rpc-server sends."""


def _call(sock: socket.socket, command: int, payload: bytes, reply_size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", command, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != reply_size:
        raise _Malformed(f"a reply of {size} bytes where {reply_size} were expected")
    return _recv_exact(sock, reply_size)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        chunk = sock.recv(n)
        if not chunk:
            raise _Malformed("the server closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _connect_hint(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: no rpc-server listens there (is it started, on that port?)"
    if isinstance(exc, TimeoutError):
        return "the connection timed out: the host is down or a firewall drops the port"
    return f"cannot connect ({exc})"


def hardware_with_rpc(
    hardware: Hardware,
    servers: Sequence[RpcServerInfo],
    device: str = "rtx3090",
    latency_s: float | None = None,
    link_bytes_s: float = 125e6,
) -> Hardware:
    """`hardware` with every RPC host's devices placed before its local GPUs (llama.cpp's order).

    `device` says what the hosts lend, for speed (the protocol reports memory only): a card in
    localllm.hardware's table, or "cpu" for an rpc-server without GPU (priced like this host's
    CPU). The link's round trip is `latency_s`, else the slowest measured one, else 0.5 ms.
    """
    spec = None if device.lower() == "cpu" else lookup_gpu(device)
    if spec is None and device.lower() != "cpu":
        raise SettingsError(f"rpc_device {device!r} is neither 'cpu' nor a known card")
    remote: list[GPUInfo] = []
    for server in servers:
        for rpc_device in server.devices:
            remote.append(
                GPUInfo(
                    name=spec.name if spec else "CPU",
                    total_bytes=rpc_device.total_bytes,
                    free_bytes=rpc_device.free_bytes,
                    bandwidth_bytes_s=(
                        spec.bandwidth_bytes_s if spec else hardware.host.memory_bandwidth_bytes_s
                    ),
                    # A CPU device's prompt rate is the fitter's host CPU rate (it prices it).
                    prefill_flops=spec.prefill_flops if spec else hardware.host.matmul_flops,
                    index=len(remote),
                    source="rpc",
                    endpoint=server.endpoint.address,
                    is_cpu=spec is None,
                )
            )
    if latency_s is None:
        measured = [s.round_trip_s for s in servers if s.round_trip_s is not None]
        latency_s = max(measured) if measured else DEFAULT_LATENCY_S
    notes = list(hardware.notes)
    given = [s.endpoint.address for s in servers if any(not d.reported for d in s.devices)]
    if given:
        notes.append(f"RPC memory given by hand for {', '.join(given)}")
    notes.append(
        f"RPC devices priced as {spec.name if spec else 'this host CPU'} (rpc_device); network "
        f"{latency_s * 1000:.2f} ms round trip, {link_bytes_s * 8 / 1e6:.0f} Mbit/s"
    )
    return replace(
        hardware,
        gpus=(*remote, *(g for g in hardware.gpus if g.endpoint is None)),
        link_latency_s=latency_s,
        link_bytes_s=link_bytes_s,
        notes=tuple(notes),
    )


def hardware_for_settings(
    hardware: Hardware, settings: Any, must_answer: bool = False
) -> tuple[Hardware, tuple[RpcServerInfo, ...]]:
    """`hardware` plus the RPC hosts `settings.rpc` names (unchanged when it names none)."""
    endpoints = parse_rpc_servers(getattr(settings, "rpc", None))
    if not endpoints:
        return hardware, ()
    servers = resolve_servers(
        endpoints, allow_public=settings.rpc_allow_public, must_answer=must_answer
    )
    latency_ms = settings.rpc_latency_ms
    combined = hardware_with_rpc(
        hardware,
        servers,
        settings.rpc_device,
        latency_ms / 1000 if latency_ms is not None else None,
        settings.rpc_bandwidth_mbit * 1e6 / 8,
    )
    return combined, servers
