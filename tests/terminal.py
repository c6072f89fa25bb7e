"""A child process on a pseudo-terminal: what a person at a keyboard would see and type."""

from __future__ import annotations

import os
import platform
import pty
import select
import time

# System calls a process waiting for its terminal sleeps in: read, and the select/poll family
# (readline), by architecture (the numbers /proc/PID/syscall shows).
_WAITING_SYSCALLS = {
    "x86_64": {"0", "7", "23", "270", "271"},
    "aarch64": {"63", "72", "73"},
}


class Terminal:
    """A child process on a pseudo-terminal: what a person at a keyboard would see and type."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: its stdin, stdout and stderr are the terminal
            os.execve(argv[0], argv, env)
        self.pid, self.fd, self.seen = pid, fd, ""

    def _read(self, timeout_s: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if ready:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"the terminal closed: {self.seen[-2000:]!r}"
            self.seen += chunk.decode(errors="replace")

    def read_until(self, text: str, timeout_s: float = 240.0, since: int = 0) -> str:
        """Read until `text` shows at or after position `since` of what was seen."""
        deadline = time.monotonic() + timeout_s
        while text not in self.seen[since:]:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} in {self.seen[-2000:]!r}"
            self._read(remaining)
        return self.seen

    def wait_for(self, text: str, timeout_s: float) -> bool:
        """Whether `text` shows within timeout_s (no failure when it does not)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._read(remaining)
        return True

    def read_more(self, n_chars: int, timeout_s: float = 240.0) -> None:
        goal, deadline = len(self.seen) + n_chars, time.monotonic() + timeout_s
        while len(self.seen) < goal:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"nothing more after {self.seen[-2000:]!r}"
            self._read(remaining)

    def wait_reading(self, timeout_s: float = 240.0) -> bool:
        """Wait until the child sleeps waiting for its terminal, so a key (a Ctrl-C) typed now
        reaches the wait, not the moment between drawing a prompt and waiting (where Python
        loses a signal until the next one). False where /proc cannot tell."""
        waiting = _WAITING_SYSCALLS.get(platform.machine())
        if waiting is None:
            return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.pid}/stat") as stat:
                    state = stat.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{self.pid}/syscall") as syscall:
                    number = syscall.read().split()[0]
            except (OSError, IndexError):
                return False
            if state == "S" and number in waiting:
                return True
            time.sleep(0.01)  # polling a state, not waiting for time to pass
        raise AssertionError(f"the child never waited for input: {self.seen[-2000:]!r}")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_code(self, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # keep the terminal drained so the child never blocks on a write
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:
                pass
        raise AssertionError(f"chat did not exit: {self.seen[-2000:]!r}")
