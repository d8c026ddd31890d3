"""Named network namespaces (/run/netns/NAME), as `ip netns` manages them.

Thin wrappers over pyroute2.netns that never create a namespace by accident
(pyroute2's setns() creates a missing one by default) and tolerate absence
on removal.
"""

from __future__ import annotations

import ctypes
import os

from pyroute2 import netns as _netns

CLONE_NEWNS = 0x00020000

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


def is_netns(name: str) -> bool:
    """True when /run/netns/NAME is a bound namespace, not just the empty
    placeholder file a creation leaves when its bind mount is lost."""
    try:
        return os.stat(netns_path(name)).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def join_init_mount_ns() -> bool:
    """For `qvmd --prepare-netns` run by systemd as `ExecStartPre=+`: join
    PID 1's mount namespace when systemd put us in another one.

    systemd 252 (Debian 12) runs even a `+` command in a mount namespace of
    its own when the unit sandboxes the file system (PrivateTmp=,
    ProtectSystem=, ReadWritePaths=, ...: seen under a real systemd,
    docs/e2e-systemd.md); the `+` only skips the sandboxing options. A
    /run/netns bind mount made there vanishes when the command exits. Only
    when started by PID 1 itself for a unit (parent 1, INVOCATION_ID set):
    never when run from a shell, a test or another service's process tree.
    """
    if os.getppid() != 1 or not os.environ.get("INVOCATION_ID"):
        return False
    try:
        init, own = os.stat("/proc/1/ns/mnt"), os.stat("/proc/self/ns/mnt")
    except OSError:
        return False
    if (init.st_dev, init.st_ino) == (own.st_dev, own.st_ino):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/proc/1/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns(/proc/1/ns/mnt): {os.strerror(err)}")
    finally:
        os.close(fd)
    return True
