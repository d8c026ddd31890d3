"""The rtnetlink requests on qvmd's hot paths, without pyroute2.

pyroute2 parses every attribute of every link into Python objects (~0.3 ms
and tens of KB per link: 0.5 s and +33 MB for a dump of 1,000 TAPs) and
spends ~0.5 ms of Python on each request. qvmd reads a dozen fields, so
this module speaks the protocol itself for what runs per TAP request, per
event and per reconcile pass: dump the links (asking the kernel to leave
statistics out, IFLA_EXT_MASK) and IPv4 addresses, get one link by name,
parse a link message (also for the event monitor), and set a link's master
and up flag. Everything else — creating bridges and veths, addresses,
routes — stays with pyroute2. Called on a NetlinkWorker thread: sockets are
opened in that thread's namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Interface

from qvmd.linkstate import LinkState, TunInfo

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO = 1, 3, 10, 18
IFLA_EXT_MASK, IFLA_CARRIER = 29, 33
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_TUN_OWNER, IFLA_TUN_GROUP, IFLA_TUN_TYPE = 1, 2, 3
IFLA_TUN_PERSIST, IFLA_TUN_MULTI_QUEUE = 6, 7
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFF_UP = 0x1
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
_REQUEST_NAMES = {
    RTM_NEWLINK: "RTM_NEWLINK",
    RTM_GETLINK: "RTM_GETLINK",
    RTM_GETADDR: "RTM_GETADDR",
}
NLA_F_MASK = 0x3FFF  # nested/byte-order flags live in the top bits of nla_type

_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_NLA = struct.Struct("=HH")


def attrs(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4:
            return
        yield kind & NLA_F_MASK, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def _u32(value: bytes) -> int:
    return int(struct.unpack("=I", value[:4])[0])


def _request(
    sock: socket.socket, msg_type: int, body: bytes, dump: bool = True
) -> Iterator[tuple[int, bytes]]:
    """Send one request; yield (message type, payload) until DONE (a dump) or
    the acknowledgement (a single get: NLM_F_ACK ends it with error 0)."""
    seq = 1
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
    sock.send(_NLMSG.pack(_NLMSG.size + len(body), msg_type, flags, seq, 0) + body)
    while True:
        data = sock.recv(1 << 20)
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, kind, _flags, msg_seq, _pid = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size:
                return
            payload = data[offset + _NLMSG.size : offset + length]
            offset += (length + 3) & ~3
            if msg_seq != seq:
                continue
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                errno_ = -struct.unpack("=i", payload[:4])[0]
                if errno_:
                    what = _REQUEST_NAMES.get(msg_type, str(msg_type))
                    raise OSError(errno_, f"{what} failed: {os.strerror(errno_)}")
                return
            yield kind, payload


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    # Strict checking makes the kernel honour the filters in dump requests
    # (one link's addresses) instead of walking every device (1,000 TAPs).
    sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
    sock.bind((0, 0))
    return sock


_SKIP_STATS = _NLA.pack(8, IFLA_EXT_MASK) + struct.pack("=I", RTEXT_FILTER_SKIP_STATS)


def dump_links() -> dict[str, LinkState]:
    """Every link of the calling thread's namespace, with its IPv4 addresses."""
    with _socket() as sock:
        ifinfo = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _SKIP_STATS
        by_index = {
            state.index: state
            for state in (
                parse_link(payload)
                for kind, payload in _request(sock, RTM_GETLINK, ifinfo)
                if kind == RTM_NEWLINK
            )
        }
        _add_addresses(sock, by_index)
    return {state.name: state for state in by_index.values()}


def get_link(name: str) -> LinkState | None:
    """One link of the calling thread's namespace by name, with its IPv4
    addresses; None if there is no such link."""
    raw = name.encode()
    attr = _NLA.pack(4 + len(raw) + 1, IFLA_IFNAME) + raw + b"\0"
    attr += b"\0" * (-len(attr) % 4)
    with _socket() as sock:
        ifinfo = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr + _SKIP_STATS
        try:
            found = [
                p for k, p in _request(sock, RTM_GETLINK, ifinfo, dump=False) if k == RTM_NEWLINK
            ]
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        if not found:
            return None
        state = parse_link(found[0])
        _add_addresses(sock, {state.index: state}, state.index)
    return state


def set_link(index: int, master: int | None = None, up: bool | None = None) -> None:
    """Enslave link `index` to `master` and/or set it up or down, in one
    request; an error (the link vanished, ...) raises OSError."""
    body = _IFINFO.pack(
        socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP if up is not None else 0
    )
    if master is not None:
        body += _NLA.pack(8, IFLA_MASTER) + struct.pack("=I", master)
    with _socket() as sock:
        for _ in _request(sock, RTM_NEWLINK, body, dump=False):
            pass


def _add_addresses(sock: socket.socket, by_index: dict[int, LinkState], only: int = 0) -> None:
    """IPv4 addresses of the links in `by_index` (of link `only`, if not 0)."""
    request = _IFADDR.pack(socket.AF_INET, 0, 0, 0, only)
    for kind, payload in _request(sock, RTM_GETADDR, request):
        family, prefixlen, _flags, _scope, index = _IFADDR.unpack_from(payload)
        owner = by_index.get(index)
        if kind != RTM_NEWADDR or family != socket.AF_INET or owner is None:
            continue
        found = dict(attrs(payload, _IFADDR.size, len(payload)))
        # IFA_LOCAL is the interface's own address; IFA_ADDRESS the peer's
        # on point-to-point links and the same otherwise.
        raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
        if raw:
            owner.addresses.append(IPv4Interface(f"{socket.inet_ntoa(raw[:4])}/{prefixlen}"))


def parse_link(payload: bytes) -> LinkState:
    _family, _type, index, flags, _change = _IFINFO.unpack_from(payload)
    state = LinkState(
        index=index, name="", kind=None, up=bool(flags & 1), carrier=False, master=None, mac=""
    )
    for attr, value in attrs(payload, _IFINFO.size, len(payload)):
        if attr == IFLA_IFNAME:
            state.name = value.rstrip(b"\0").decode(errors="replace")
        elif attr == IFLA_MASTER:
            state.master = _u32(value)
        elif attr == IFLA_ADDRESS:
            state.mac = ":".join(f"{b:02x}" for b in value)
        elif attr == IFLA_CARRIER:
            state.carrier = bool(value[0])
        elif attr == IFLA_LINKINFO:
            info = dict(attrs(value, 0, len(value)))
            state.kind = info.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode() or None
            if state.kind == "tun" and IFLA_INFO_DATA in info:
                state.tun = _tun(info[IFLA_INFO_DATA])
    return state


def _tun(data: bytes) -> TunInfo:
    d = dict(attrs(data, 0, len(data)))
    return TunInfo(
        owner=_u32(d[IFLA_TUN_OWNER]) if IFLA_TUN_OWNER in d else None,
        group=_u32(d[IFLA_TUN_GROUP]) if IFLA_TUN_GROUP in d else None,
        multi_queue=bool(d.get(IFLA_TUN_MULTI_QUEUE, b"\0")[0]),
        persist=bool(d.get(IFLA_TUN_PERSIST, b"\0")[0]),
        is_tap=d.get(IFLA_TUN_TYPE, b"\0")[0] == 2,
    )
