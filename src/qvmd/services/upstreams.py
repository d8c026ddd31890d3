"""The host's own upstream resolvers, for dnsmasq to forward outside names to.

Read from the host, never hard-coded: /etc/resolv.conf, or, when that points
at systemd-resolved's stub (127.0.0.53), resolved's list of real servers in
/run/systemd/resolve/resolv.conf. dnsmasq runs in the services namespace, so
an address only reachable from the host's own namespace is useless there and
is skipped with a reason (the caller can show the reasons, e.g. in doctor):

- loopback (127.0.0.0/8, ::1): the namespace has its own loopback;
- IPv6: the lab network is IPv4-only, the namespace has no IPv6 route;
- link-local: the link it is scoped to is not in the namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_UPSTREAM_CONF = Path("/run/systemd/resolve/resolv.conf")
# resolved's stub listeners: the DNS stub and the "proxy" stub.
RESOLVED_STUBS = frozenset({IPv4Address("127.0.0.53"), IPv4Address("127.0.0.54")})


@dataclass(frozen=True)
class Upstreams:
    servers: tuple[IPv4Address, ...]
    skipped: tuple[tuple[str, str], ...]  # (address as written, why it was skipped)
    source: str  # the file the servers came from


def parse_nameservers(text: str) -> tuple[tuple[str, IPv4Address | IPv6Address | None], ...]:
    """Every `nameserver` line of a resolv.conf, in order.

    Each entry is (the text as written, the parsed address or None when it
    does not parse). A zone suffix (`fe80::1%eth0`) parses as link-local.
    """
    found: list[tuple[str, IPv4Address | IPv6Address | None]] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        raw = words[1]
        try:
            addr: IPv4Address | IPv6Address | None = ip_address(raw.split("%", 1)[0])
        except ValueError:
            addr = None
        found.append((raw, addr))
    return tuple(found)


def points_at_resolved_stub(text: str) -> bool:
    return any(addr in RESOLVED_STUBS for _raw, addr in parse_nameservers(text))


def usable_upstreams(text: str, source: str) -> Upstreams:
    """The nameservers of `text` that the services namespace can reach."""
    servers: list[IPv4Address] = []
    skipped: list[tuple[str, str]] = []
    for raw, addr in parse_nameservers(text):
        if addr is None:
            skipped.append((raw, "not an IP address"))
        elif addr.is_loopback:
            skipped.append((raw, "loopback, unreachable from the services namespace"))
        elif addr.is_link_local:
            skipped.append((raw, "link-local, its link is not in the services namespace"))
        elif isinstance(addr, IPv6Address):
            skipped.append((raw, "IPv6, the lab network is IPv4-only"))
        elif addr.is_unspecified or addr.is_multicast:
            skipped.append((raw, "not a unicast address"))
        elif addr not in servers:
            servers.append(addr)
    return Upstreams(tuple(servers), tuple(skipped), source)


def choose_upstreams(
    resolv_conf: str,
    resolved_conf: str | None,
    resolv_path: str = str(RESOLV_CONF),
    resolved_path: str = str(RESOLVED_UPSTREAM_CONF),
) -> Upstreams:
    """Pure decision: use resolved's real servers when resolv.conf is its stub.

    `resolved_conf` is the text of resolved's upstream file, or None when
    that file does not exist (resolved not running). The paths only name
    the source in the result.
    """
    if resolved_conf is not None and points_at_resolved_stub(resolv_conf):
        return usable_upstreams(resolved_conf, resolved_path)
    return usable_upstreams(resolv_conf, resolv_path)


def read_host_upstreams(
    resolv_conf: Path = RESOLV_CONF, resolved_conf: Path = RESOLVED_UPSTREAM_CONF
) -> Upstreams:
    """Read the host's files (in qvmd's own mount namespace) and choose.

    A missing resolv.conf means no upstream: dnsmasq then refuses outside
    names and still answers the lab's own.
    """
    try:
        main = resolv_conf.read_text()
    except FileNotFoundError:
        main = ""
    try:
        resolved: str | None = resolved_conf.read_text()
    except FileNotFoundError:
        resolved = None
    return choose_upstreams(main, resolved, str(resolv_conf), str(resolved_conf))
