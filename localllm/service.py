"""Behave well under systemd: the sd_notify protocol and the watchdog, without libsystemd.

With `Type=notify` systemd passes `NOTIFY_SOCKET` (a filesystem path, or `@name` for a socket in
the abstract namespace) and waits for a datagram carrying `READY=1` before it calls the service
started. With `WatchdogSec=` it also passes `WATCHDOG_USEC` (and `WATCHDOG_PID`) and restarts the
service when `WATCHDOG=1` stops arriving within that interval.

How the server uses it (uvicorn never notifies on its own):

    notify_status("loading model ...")      # shows in `systemctl status`
    notify_extend_timeout(120)              # a slow model load asks for more start time
    ... load the model, start listening ...
    notify_ready()                          # only now do dependants start
    task = asyncio.create_task(watchdog_loop())
    ... on SIGTERM: notify_stopping(), drain, exit

`watchdog_loop` pings from the event loop itself, so a wedged loop (a blocking call, a deadlock)
stops the pings and systemd restarts the service; a thread pinging on its own would hide that.

Every function is a cheap no-op returning False outside systemd, so callers never branch on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


def _socket_address(raw: str) -> bytes | None:
    """NOTIFY_SOCKET as an AF_UNIX address: `@name` is the abstract namespace (leading NUL)."""
    if raw.startswith("@"):
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return os.fsencode(raw)
    # systemd 254+ may also pass "vsock:CID:PORT" (for VMs); a local server never gets one.
    return None


def notify(state: str) -> bool:
    """Send one sd_notify datagram (newline-separated `VAR=value` lines).

    Returns True when it was sent, False when not under systemd or the socket refused it: a
    failed notification must never take the server down, so errors are logged, not raised.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    address = _socket_address(raw)
    if address is None:
        log.debug("NOTIFY_SOCKET %r is not a unix socket; not notifying", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", raw, exc)
        return False
    return True


def notify_ready(status: str | None = None) -> bool:
    """Tell systemd the service is up (model loaded, socket listening)."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}")


def notify_stopping() -> bool:
    """Tell systemd a graceful shutdown has begun."""
    return notify("STOPPING=1")


def notify_status(text: str) -> bool:
    """A one-line status shown by `systemctl status localllm`."""
    return notify(f"STATUS={_one_line(text)}")


def notify_extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before systemd gives up on start-up or shutdown (a slow load)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")


def notify_watchdog() -> bool:
    """One keep-alive ping."""
    return notify("WATCHDOG=1")


def _one_line(text: str) -> str:
    # A newline would start another VAR=value assignment in the datagram.
    return " ".join(text.splitlines())


def watchdog_interval_s() -> float | None:
    """The watchdog timeout systemd set for this process, in seconds; None when there is none.

    `WATCHDOG_PID`, when set, names the process the watchdog is meant for: a child process that
    inherited the environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    return value / 1_000_000 if value > 0 else None


async def watchdog_loop(healthy: Callable[[], bool] | None = None) -> None:
    """Ping WATCHDOG=1 every half interval until cancelled; returns at once without a watchdog.

    `healthy`, if given, is asked before each ping; returning False skips it, so a stuck engine
    (say, a generation thread that never returns) gets the service restarted too.
    """
    interval = watchdog_interval_s()
    if interval is None:
        return
    # Half the interval, as sd_watchdog_enabled(3) recommends: one late tick is not fatal.
    period = interval / 2
    log.info("systemd watchdog: %.3g s, pinging every %.3g s", interval, period)
    while True:
        if healthy is None or healthy():
            notify_watchdog()
        else:
            log.warning("not pinging the systemd watchdog: the engine reports unhealthy")
        await asyncio.sleep(period)
