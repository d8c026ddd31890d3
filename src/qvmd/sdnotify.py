"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

Written out (a dozen lines) rather than taken from python-systemd so the
daemon also runs in a plain venv, and so tests can observe it on a socket of
their own.
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self.address = env.get("NOTIFY_SOCKET", "")
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        valid = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if valid else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str) -> None:
        """notify(READY="1", STATUS="...") — silently nothing without a socket."""
        if not self.address:
            return
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace socket
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        # Never block the event loop on a notification: a receiver that does
        # not read (a full queue) loses a datagram, not our loop.
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
            contextlib.suppress(BlockingIOError, ConnectionRefusedError, FileNotFoundError),
        ):
            sock.sendto(msg, socket.MSG_DONTWAIT, addr)
