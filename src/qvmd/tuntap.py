"""Persistent TAP devices through the TUN driver's ioctls.

rtnetlink cannot create TUN/TAP devices; the kernel only offers the
/dev/net/tun character device. These few ioctls are all that QEMU's
`-netdev tap,ifname=...` needs to find a device it may attach to: the TAP
type, persistence, and an owner (uid and/or gid). The kernel lets a process
attach when its euid matches the owner or it is in the group — so a TAP
without either is open to anyone who can open /dev/net/tun, which is why
callers always pass an owner.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

TUN_PATH = "/dev/net/tun"

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE

IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000

_IFREQ = "16sH22x"  # struct ifreq: name, then the flags short, padded to 40 bytes


def tap_flags(multi_queue: bool, vnet_hdr: bool = True) -> int:
    """The flags QEMU uses for `-netdev tap`: the kernel refuses an attach
    whose IFF_MULTI_QUEUE differs from the device's, so it must match config."""
    flags = IFF_TAP | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    return flags


def _attach(name: str, flags: int) -> int:
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack(_IFREQ, name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _set_owner(fd: int, uid: int, gid: int | None) -> None:
    fcntl.ioctl(fd, TUNSETOWNER, uid)
    # The kernel refuses an invalid gid here, so a group, once set, can only
    # be removed by recreating the device (links.py does that when idle).
    if gid is not None:
        fcntl.ioctl(fd, TUNSETGROUP, gid)


def create_tap(name: str, uid: int, gid: int | None, multi_queue: bool) -> None:
    """Create a persistent TAP owned by uid/gid; EEXIST if the name is taken.

    IFF_TUN_EXCL makes the kernel fail instead of attaching to an existing
    device, so a race with another creator is an error, not a takeover.
    """
    fd = _attach(name, tap_flags(multi_queue) | IFF_TUN_EXCL)
    try:
        _set_owner(fd, uid, gid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def set_tap_owner(name: str, uid: int, gid: int | None, multi_queue: bool) -> None:
    """Change the owner of an existing persistent TAP.

    Attaching to a single-queue TAP that a process (QEMU) holds fails with
    EBUSY: the owner of a TAP in use cannot be changed, which is what we
    want — it would not affect the holder anyway.
    """
    try:
        fd = _attach(name, tap_flags(multi_queue))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise BlockingIOError(errno.EBUSY, f"TAP {name} is in use") from None
        raise
    try:
        _set_owner(fd, uid, gid)
    finally:
        os.close(fd)


def open_tap(name: str, multi_queue: bool = False) -> int:
    """Attach to an existing TAP the way QEMU does; returns the queue fd.

    Used by tests and diagnostics; the daemon never holds guest TAPs open.
    """
    return _attach(name, tap_flags(multi_queue))
