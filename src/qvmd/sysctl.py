"""IPv4 forwarding of the namespace qvmd runs in.

/proc/sys/net is per network namespace (resolved for the opening thread), so
inside a sandbox this only ever changes the sandbox.
"""

from __future__ import annotations

from pathlib import Path

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def forwarding_enabled() -> bool:
    return IP_FORWARD.read_text().strip() == "1"


def set_forwarding(on: bool) -> None:
    IP_FORWARD.write_text("1\n" if on else "0\n")
