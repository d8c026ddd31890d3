"""rtnetlink events that wake the reconciler.

A plain netlink socket subscribed to link, IPv4 address and IPv4 route
groups, read from the event loop (add_reader: no thread, no polling). Events
about interfaces that are not ours are dropped here; ours only *schedule* a
reconcile — the reconciler decides what, if anything, differs. That is also
why qvmd's own changes cannot loop: the pass they trigger finds nothing to do.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable

from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
# RTNLGRP_IPV4_NETCONF (24): writing net.ipv4.ip_forward is announced here.
RTMGRP_IPV4_NETCONF = 1 << (24 - 1)
RTM_NEWNETCONF = 80
_NLMSGHDR = struct.Struct("=IHHII")


def open_event_socket() -> socket.socket:
    """Open in the namespace of the calling thread (that is the one it watches)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    # A large buffer makes ENOBUFS (lost events) rare during TAP storms; when
    # it still happens we resync fully, which is always correct.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_NETCONF))
    sock.setblocking(False)
    return sock


class _EventSocket:
    """A non-blocking socket read by the event loop until stopped."""

    def __init__(self, sock: socket.socket, wake: Callable[..., None]) -> None:
        self.sock = sock
        self.wake = wake

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def stop(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        finally:
            self.sock.close()

    def _readable(self) -> None:
        raise NotImplementedError


class NetlinkMonitor(_EventSocket):
    def __init__(
        self,
        sock: socket.socket,
        is_ours: Callable[[str], bool],
        wake: Callable[..., None],
        where: str,
        is_tap: Callable[[str], bool] = lambda _name: False,
    ) -> None:
        super().__init__(sock, wake)
        self.is_ours = is_ours
        self.is_tap = is_tap
        self.where = where
        self.marshal = MarshalRtnl()
        self.names: dict[int, str] = {}  # ifindex -> name, learnt from link events
        # Called with a TAP's name when it is deleted while a process held it.
        self.on_lost_tap: Callable[[str], None] | None = None

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.wake(f"{self.where}: event overflow, full resync")
                    continue
                raise
            reason = self._relevant(data)
            if reason:
                self.wake(reason)

    def _relevant(self, data: bytes) -> str | None:
        if _has_type(data, RTM_NEWNETCONF):
            # pyroute2's marshal does not know netconf; the header is enough.
            return f"{self.where}: IPv4 forwarding setting changed"
        reason = None
        for msg in self.marshal.parse(data):
            event = msg.get("event", "")
            if event in ("RTM_NEWLINK", "RTM_DELLINK"):
                name = msg.get_attr("IFLA_IFNAME") or ""
                self.names[msg["index"]] = name
                if self.is_tap(name):
                    # Only this TAP needs a look: a scoped pass, not a full one.
                    self.wake(f"{self.where}: {event} {name}", tap=name)
                    lost = event == "RTM_DELLINK" and msg.get_attr("IFLA_CARRIER")
                    if lost and self.on_lost_tap is not None:
                        self.on_lost_tap(name)
                elif self.is_ours(name):
                    reason = f"{self.where}: {event} {name}"
            elif event in ("RTM_NEWADDR", "RTM_DELADDR"):
                name = self.names.get(msg["index"], "")
                if not name or self.is_ours(name):
                    reason = f"{self.where}: {event} on {name or msg['index']}"
            elif event == "RTM_DELROUTE" or (event == "RTM_NEWROUTE" and msg["dst_len"] == 0):
                # A deleted route may be the lab's own subnet route.
                reason = f"{self.where}: {event}"
        return reason


def _has_type(data: bytes, wanted: int) -> bool:
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if msg_type == wanted:
            return True
        if length < _NLMSGHDR.size:
            return False
        offset += (length + 3) & ~3
    return False


NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1


def open_nft_event_socket() -> socket.socket:
    """nftables change notifications (what `nft monitor` reads)."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    sock.setblocking(False)
    return sock


class NftMonitor(_EventSocket):
    """Any ruleset change wakes the healer, which compares our tables with
    what it applied; our own applies wake it too and find nothing to do."""

    def _readable(self) -> None:
        changed = False
        while True:
            try:
                self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
            changed = True
        if changed:
            self.wake("nftables ruleset changed")
