"""Named network namespaces (/run/netns/NAME), as `ip netns` manages them.

Thin wrappers over pyroute2.netns that never create a namespace by accident
(pyroute2's setns() creates a missing one by default) and tolerate absence
on removal.
"""

from __future__ import annotations

import os

from pyroute2 import netns as _netns

NETNS_RUN_DIR = "/run/netns"


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create(name: str) -> bool:
    """Create the namespace if missing; True when this call created it."""
    if exists(name):
        return False
    _netns.create(name)
    return True


def remove(name: str) -> bool:
    """Remove the namespace if present; True when this call removed it."""
    if not exists(name):
        return False
    _netns.remove(name)
    return True


def enter(name: str) -> None:
    """Move the calling thread into namespace `name` (which must exist).

    Threads started afterwards inherit it, which is how the whole daemon
    runs inside a sandbox: enter first, then start the event loop.
    """
    _netns.setns(name, flags=0)
