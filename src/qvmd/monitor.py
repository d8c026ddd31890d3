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
from collections.abc import Callable, Iterator

from qvmd import rtnl

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
# RTNLGRP_IPV4_NETCONF (24): writing net.ipv4.ip_forward is announced here.
RTMGRP_IPV4_NETCONF = 1 << (24 - 1)
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNETCONF = 24, 25, 80
_EVENT = {
    RTM_NEWADDR: "RTM_NEWADDR",
    RTM_DELADDR: "RTM_DELADDR",
    RTM_NEWROUTE: "RTM_NEWROUTE",
    RTM_DELROUTE: "RTM_DELROUTE",
}
AF_BRIDGE = 7
NETCONFA_IFINDEX, NETCONFA_IFINDEX_ALL = 1, -1
_S32 = struct.Struct("=i")
_NLMSGHDR = struct.Struct("=IHHII")
_IFA_INDEX = struct.Struct("=I")  # ifaddrmsg.ifa_index, at offset 4


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
    """Link, address and route events of one namespace.

    Events are read with rtnl's parser (pyroute2's costs ~0.3 ms a
    message, and every TAP request makes several). A link event about one
    of our links that leaves what qvmd reconciles unchanged — the bridge's
    "features changed" or carrier flip each time a port comes or goes — wakes
    nothing: at 1,000 TAPs a full pass costs tens of milliseconds.
    """

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
        self.names: dict[int, str] = {}  # ifindex -> name, learnt from link events
        # ifindex -> the reconciled fields of our links as last announced
        self.seen: dict[int, tuple[object, ...]] = {}
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
                    self.seen.clear()  # events were lost: trust nothing remembered
                    self.wake(f"{self.where}: event overflow, full resync")
                    continue
                raise
            reason = self._relevant(data)
            if reason:
                self.wake(reason)

    def _relevant(self, data: bytes) -> str | None:
        reason = None
        for msg_type, payload in _messages(data):
            if msg_type == RTM_NEWNETCONF:
                if _netconf_ifindex(payload) == NETCONFA_IFINDEX_ALL:
                    reason = f"{self.where}: IPv4 forwarding setting changed"
            elif msg_type in (RTM_NEWLINK, RTM_DELLINK):
                reason = self._link_event(msg_type == RTM_DELLINK, payload) or reason
            elif msg_type in (RTM_NEWADDR, RTM_DELADDR) and len(payload) >= 8:
                index = _IFA_INDEX.unpack_from(payload, 4)[0]
                name = self.names.get(index, "")
                if not name or self.is_ours(name):
                    reason = f"{self.where}: {_EVENT[msg_type]} on {name or index}"
            elif msg_type == RTM_DELROUTE or (
                msg_type == RTM_NEWROUTE and len(payload) > 1 and payload[1] == 0
            ):
                # A deleted route may be the lab's own subnet route; a new
                # default route (dst_len 0) may change the uplink.
                reason = f"{self.where}: {_EVENT[msg_type]}"
        return reason

    def _link_event(self, deleted: bool, payload: bytes) -> str | None:
        if len(payload) < 16 or payload[0] == AF_BRIDGE:
            # AF_BRIDGE: bridge-port details, also announced as a plain
            # link event when anything qvmd reconciles changes.
            return None
        link = rtnl.parse_link(payload)
        event = "RTM_DELLINK" if deleted else "RTM_NEWLINK"
        before = self.names.get(link.index)
        self.names[link.index] = link.name
        if self.is_tap(link.name):
            # Only this TAP needs a look: a scoped pass, not a full one.
            self.wake(f"{self.where}: {event} {link.name}", tap=link.name)
            if deleted and link.carrier and self.on_lost_tap is not None:
                self.on_lost_tap(link.name)
            return None
        if not self.is_ours(link.name):
            self.seen.pop(link.index, None)
            if before is not None and before != link.name and self.is_ours(before):
                return f"{self.where}: {before} renamed to {link.name}"
            return None
        if deleted:
            self.seen.pop(link.index, None)
            return f"{self.where}: {event} {link.name}"
        fields = (link.name, link.kind, link.up, link.master, link.mac)
        if self.seen.get(link.index) == fields:
            return None
        self.seen[link.index] = fields
        return f"{self.where}: {event} {link.name}"


def _netconf_ifindex(payload: bytes) -> int | None:
    """Which device a netconf event is about. Writing ip_forward announces
    NETCONFA_IFINDEX_ALL; every new link (each TAP) announces its own."""
    for attr, value in rtnl.attrs(payload, 4, len(payload)):  # after struct netconfmsg
        if attr == NETCONFA_IFINDEX and len(value) >= 4:
            return int(_S32.unpack_from(value)[0])
    return None


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return
        yield msg_type, data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


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
