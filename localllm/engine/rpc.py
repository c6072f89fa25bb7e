"""Remote ggml devices through llama.cpp's own RPC backend, bound with ctypes.

llama-cpp-python binds `llama_supports_rpc` but not the calls that add a host, so this module
reaches ggml's RPC backend the way llama.cpp's `--rpc` flag does (common/arg.cpp,
add_rpc_devices): `ggml_backend_reg_by_name("RPC")`, then `ggml_backend_rpc_add_server` through
`ggml_backend_reg_get_proc_address`. The devices of each host go to the model explicitly
(`llama_model_params.devices`) instead of into ggml's global registry, in llama.cpp's own default
order: RPC hosts first (in the order given), then the local GPUs (every non-RPC device of GPU type;
llama.cpp's own selection also drops duplicate and integrated GPUs). `tensor_split` follows that
order.

llama.cpp's RPC client aborts the process when it cannot reach a host (ggml-rpc.cpp:
GGML_ABORT("Failed to connect ..."), RPC_STATUS_ASSERT after any failed send or receive). Two
guards keep that from being a silent crash:
- before llama.cpp connects, every host is asked over the same protocol from Python
  (`localllm.rpc.query_server`), which fails with an RpcError that names the host;
- while a model uses remote devices, ggml's abort callback names the host that went away, fails
  the waiting requests with RpcHostLostError (503), gives them `HOST_LOST_GRACE_S` to reach
  their clients and ends the process with EXIT_HOST_LOST, for the supervisor to restart it. The
  process cannot carry on: the abort comes from inside llama.cpp, which holds a half-done graph.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from localllm.engine import build
from localllm.errors import ModelLoadError, RpcHostLostError
from localllm.rpc import RpcEndpoint, RpcServerInfo, query_server

log = logging.getLogger(__name__)

EXIT_HOST_LOST = 75  # EX_TEMPFAIL: try again later (systemd's Restart=on-failure restarts)
HOST_LOST_GRACE_S = 1.0

_GGML_BACKEND_DEVICE_TYPE_GPU = 1  # enum ggml_backend_dev_type: CPU 0, GPU 1, IGPU 2, ACCEL 3

_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)


def _ggml() -> Any:
    """The libggml llama.cpp loaded (engine.build's), with the RPC-side calls declared too."""
    lib = build.ggml_library()
    ptr, size, text = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "ggml_backend_reg_by_name": (ptr, [text]),
        "ggml_backend_reg_get_proc_address": (ptr, [ptr, text]),
        "ggml_backend_reg_dev_count": (size, [ptr]),
        "ggml_backend_reg_dev_get": (ptr, [ptr, size]),
        "ggml_backend_dev_backend_reg": (ptr, [ptr]),
        "ggml_set_abort_callback": (ptr, [_ABORT_CALLBACK]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def supports_rpc() -> bool:
    """Whether the loaded llama.cpp was built with GGML_RPC=ON."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


@dataclass(frozen=True)
class RemoteDevice:
    """A ggml device on an rpc-server, as registered in this process."""

    endpoint: RpcEndpoint
    name: str  # ggml's name: RPC0, RPC1, ... in the order added
    handle: int  # ggml_backend_dev_t


class RpcAttachment:
    """The remote hosts of one loaded model: its device list and the lost-host guard."""

    def __init__(
        self,
        servers: tuple[RpcServerInfo, ...],
        devices: tuple[RemoteDevice, ...],
        model_devices: Any,
    ) -> None:
        self.servers = servers
        self.devices = devices
        self.model_devices = model_devices  # NULL-terminated ggml_backend_dev_t[], kept alive
        self._listeners: list[Callable[[RpcHostLostError], None]] = []
        self._lost = threading.Event()

    def on_host_lost(self, listener: Callable[[RpcHostLostError], None]) -> None:
        """Call `listener` (from llama.cpp's thread) before the process ends for a lost host."""
        self._listeners.append(listener)

    def handle_abort(self, message: str) -> None:
        """ggml is about to abort: if its RPC client failed, name the host, fail what waits and
        end the process cleanly; any other abort (a bug elsewhere) is not ours to dress up."""
        if "ggml-rpc" not in message:  # the message starts with the aborting source file
            return
        if self._lost.is_set():  # a second thread aborting too: the first one reports
            time.sleep(HOST_LOST_GRACE_S * 4)
            os._exit(EXIT_HOST_LOST)
        self._lost.set()
        endpoints = [server.endpoint for server in self.servers]
        # A host that just died may still hold its listening socket for a moment: ask twice.
        for wait_s in (0.2, 0.5):
            time.sleep(wait_s)
            states = {e: _connect_state(e) for e in endpoints}
            if "refused" in states.values():
                break
        # Refused is certain (nothing listens); a timeout may be a host that is off, or a live
        # one whose one-deep listen queue is full while it serves us; blame those only if no
        # host refused, and every host if none looks gone.
        lost = [e for e in endpoints if states[e] == "refused"]
        lost = lost or [e for e in endpoints if states[e] == "timeout"] or endpoints
        log.error("RPC hosts after the failure: %s", ", ".join(f"{e} {states[e]}" for e in states))
        error = RpcHostLostError(
            ", ".join(e.address for e in lost),
            "went away while the model was loaded on it; localllm stops (exit status "
            f"{EXIT_HOST_LOST}) so its supervisor restarts it once the host is back "
            f"(llama.cpp: {message.strip()})",
        )
        log.critical("%s", error)
        for listener in self._listeners:
            try:
                listener(error)
            except Exception:  # the process is ending; report and keep failing the others
                log.exception("failing requests after a lost RPC host")
        time.sleep(HOST_LOST_GRACE_S)
        logging.shutdown()
        os._exit(EXIT_HOST_LOST)


def attach(
    endpoints: Sequence[RpcEndpoint], allow_public: bool = False, timeout_s: float = 5.0
) -> RpcAttachment:
    """Check every host, add it to ggml's RPC backend and build the model's device list.

    Raises RpcError naming a host that is refused, unreachable or of another protocol version,
    ModelLoadError when this llama.cpp was built without RPC.
    """
    if not supports_rpc():
        raise ModelLoadError(
            "this llama-cpp-python was built without the RPC backend; build one with "
            "scripts/build-rpc.sh and install it (--install VENV), or point LLAMA_CPP_LIB_PATH "
            "at its lib/ folder"
        )
    # Ask first: llama.cpp itself would abort the process on a host it cannot reach.
    servers = tuple(query_server(e, timeout_s, allow_public) for e in endpoints)
    lib = _ggml()
    rpc_reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(rpc_reg, b"ggml_backend_rpc_add_server")
    if not rpc_reg or not address:
        raise ModelLoadError("llama.cpp's RPC backend has no ggml_backend_rpc_add_server")
    add_server = _ADD_SERVER(address)
    attachment_box: list[RpcAttachment] = []
    _install_abort_guard(lib, attachment_box)
    remote: list[RemoteDevice] = []
    for server in servers:
        reg = add_server(server.endpoint.address.encode())
        if not reg:
            raise ModelLoadError(f"RPC host {server.endpoint}: it exposes no device")
        for i in range(lib.ggml_backend_reg_dev_count(reg)):
            device = lib.ggml_backend_reg_dev_get(reg, i)
            name = lib.ggml_backend_dev_name(device).decode()
            remote.append(RemoteDevice(server.endpoint, name, device))
    local_gpus = [
        device
        for device in (lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count()))
        if lib.ggml_backend_dev_type(device) == _GGML_BACKEND_DEVICE_TYPE_GPU
        and lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(device)) != b"RPC"
    ]
    handles = [d.handle for d in remote] + local_gpus
    model_devices = (ctypes.c_void_p * (len(handles) + 1))(*handles, None)
    attachment = RpcAttachment(servers, tuple(remote), model_devices)
    attachment_box.append(attachment)
    for device in remote:
        log.info("RPC device %s on %s", device.name, device.endpoint)
    return attachment


# ggml keeps one abort callback per process; the ctypes wrapper must outlive every call to it.
_guard_lock = threading.Lock()
_installed: list[Any] = []


def _install_abort_guard(lib: Any, box: list[RpcAttachment]) -> None:
    def on_abort(message: bytes | None) -> None:
        text = (message or b"").decode("utf-8", "replace")
        if box:
            box[-1].handle_abort(text)  # ends the process when an RPC host went away
        # Not a lost host (or no model on RPC yet): llama.cpp's own abort follows.
        log.critical("llama.cpp aborted: %s", text)

    with _guard_lock:
        callback = _ABORT_CALLBACK(on_abort)
        lib.ggml_set_abort_callback(callback)
        _installed.append(callback)


def _connect_state(endpoint: RpcEndpoint, timeout_s: float = 1.0) -> str:
    """"open", "refused" or "timeout": a TCP connect, not a handshake, which a live rpc-server
    busy with our own connection would leave waiting."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "timeout"
