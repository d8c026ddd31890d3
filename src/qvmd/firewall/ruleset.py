"""The nftables ruleset qvmd owns, as libnftables JSON: a pure function of the lab.

Two tables, both named `qvm`:

* `inet qvm` routes the lab: forwarding policy, masquerade towards whatever
  interface carries the default route (no uplink name or address is ever
  configured), DNAT for port forwards (from outside, from guests and from
  the host itself), and what guests may send to the host.
* `bridge qvm` is per-TAP anti-spoofing: frames from a TAP bound to a guest
  must carry that guest's MAC and IPv4 address, ARP included.

Everything that grows with the lab (guests, bound TAPs, forwards) is a set or
map element, never a rule, so the rule count is the same for 3 guests or
1,000 and a change is a one-transaction swap of elements.

The result uses the same object form `nft -j list ruleset` prints
({"nftables": [{"table": ...}, {"chain": ...}, ...]}); apply.py turns it into
one transaction. Priorities are numbers because libnftables 1.0.6 refuses the
named form `dstnat` for the nat output hook.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qvmd.errors import InvalidArgument
from qvmd.firewall.forwards import PortForward, validate_port, validate_proto
from qvmd.model import Lab

TABLE = "qvm"
INET = "inet"
BRIDGE = "bridge"
OUR_TABLES = ((INET, TABLE), (BRIDGE, TABLE))

# Netfilter priorities (nft's names in comments).
PRIO_FILTER = 0  # filter
PRIO_DSTNAT = -100  # dstnat
PRIO_SRCNAT = 100  # srcnat
PRIO_BRIDGE_FILTER = -200  # filter, in the bridge family

LOOPBACK_NET = "127.0.0.0/8"

JSON = dict[str, Any]


# -- expression helpers: each returns one libnftables JSON expression ---------


def _meta(key: str) -> JSON:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> JSON:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: JSON, right: Any, op: str = "==") -> JSON:
    return {"match": {"op": op, "left": left, "right": right}}


def _prefix(net: str) -> JSON:
    addr, length = net.split("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def _concat(*exprs: JSON) -> JSON:
    return {"concat": list(exprs)}


def _counter(name: str) -> JSON:
    return {"counter": name}


ACCEPT: JSON = {"accept": None}
DROP: JSON = {"drop": None}
REJECT: JSON = {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}


class _Table:
    """Collects the objects of one table in the order nft needs them."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.objects: list[JSON] = [{"table": {"family": family, "name": TABLE}}]

    def _base(self) -> JSON:
        return {"family": self.family, "table": TABLE}

    def counter(self, name: str) -> None:
        self.objects.append({"counter": {**self._base(), "name": name}})

    def set(self, name: str, type_: str | list[str], elems: list[Any]) -> None:
        obj: JSON = {**self._base(), "name": name, "type": type_}
        if elems:
            obj["elem"] = elems
        self.objects.append({"set": obj})

    def map(self, name: str, type_: list[str], data: str, elems: list[Any]) -> None:
        obj: JSON = {**self._base(), "name": name, "type": type_, "map": data}
        if elems:
            obj["elem"] = elems
        self.objects.append({"map": obj})

    def chain(self, name: str, type_: str, hook: str, prio: int) -> None:
        self.objects.append(
            {
                "chain": {
                    **self._base(),
                    "name": name,
                    "type": type_,
                    "hook": hook,
                    "prio": prio,
                    # Accept by default: we only judge lab traffic; everything
                    # else is left to whatever other tables the host has.
                    "policy": "accept",
                }
            }
        )

    def rule(self, chain: str, *expr: JSON, comment: str | None = None) -> None:
        obj: JSON = {**self._base(), "chain": chain, "expr": list(expr)}
        if comment:
            obj["comment"] = comment
        self.objects.append({"rule": obj})


def _validated_forwards(lab: Lab, forwards: Iterable[PortForward]) -> list[PortForward]:
    out: dict[tuple[str, int], PortForward] = {}
    for f in forwards:
        validate_proto(f.proto)
        validate_port(f.host_port, "host port")
        validate_port(f.guest_port, "guest port")
        if lab.guest(f.guest) is None:
            raise InvalidArgument(
                f"forward {f.proto}/{f.host_port} names unknown guest {f.guest!r}"
            )
        if f.key in out:
            raise InvalidArgument(f"{f.proto} host port {f.host_port} is forwarded twice")
        out[f.key] = f
    return [out[k] for k in sorted(out)]


def _validated_ports(ports: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    return sorted({(validate_proto(p), validate_port(n)) for p, n in ports})


def build_inet_table(
    lab: Lab,
    forwards: Iterable[PortForward] = (),
    host_ports_open_to_lab: Iterable[tuple[str, int]] = (),
) -> list[JSON]:
    br = lab.bridge
    subnet = str(lab.subnet)
    t = _Table(INET)

    for name in ("localnet_dropped", "input_rejected", "outbound_rejected", "inbound_rejected"):
        t.counter(name)

    # Two maps with the same key instead of one map to "address . port":
    # libnftables 1.0.6 JSON cannot parse a concatenated map value type.
    fwd = _validated_forwards(lab, forwards)
    to_addr, to_port = [], []
    for f in fwd:
        g = lab.guest(f.guest)
        assert g is not None  # checked by _validated_forwards
        to_addr.append([_concat_value(f.proto, f.host_port), str(g.ip)])
        to_port.append([_concat_value(f.proto, f.host_port), f.guest_port])
    t.map("forward_addr", ["inet_proto", "inet_service"], "ipv4_addr", to_addr)
    t.map("forward_port", ["inet_proto", "inet_service"], "inet_service", to_port)
    t.set(
        "host_ports_open_to_lab",
        ["inet_proto", "inet_service"],
        [_concat_value(p, n) for p, n in _validated_ports(host_ports_open_to_lab)],
    )

    from_lab = _match(_meta("iifname"), br)
    to_lab = _match(_meta("oifname"), br)
    tcp_udp = _match(_meta("l4proto"), {"set": ["tcp", "udp"]})
    proto_port = _concat(_meta("l4proto"), _payload("th", "dport"))
    established = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
    dnat_done = _match({"ct": {"key": "status"}}, "dnat", "in")
    lab_source = _match(_payload("ip", "saddr"), _prefix(subnet))

    # What the lab may send to the host itself.
    t.chain("input", "filter", "input", PRIO_FILTER)
    # Established first: replies to a localhost forward arrive from the
    # bridge already un-NATed to 127.0.0.1 (kube-proxy's rule for
    # CVE-2020-8558 makes the same exception).
    t.rule("input", from_lab, established, ACCEPT)
    t.rule(
        "input",
        from_lab,
        _match(_payload("ip", "daddr"), _prefix(LOOPBACK_NET)),
        _counter("localnet_dropped"),
        DROP,
        comment="route_localnet is on for the bridge (localhost forwards); never let guests in",
    )
    t.rule("input", from_lab, _match(_meta("l4proto"), "icmp"), ACCEPT, comment="ping the gateway")
    t.rule("input", from_lab, tcp_udp, _match(proto_port, "@host_ports_open_to_lab"), ACCEPT)
    t.rule("input", from_lab, _counter("input_rejected"), REJECT)

    t.chain("forward", "filter", "forward", PRIO_FILTER)
    t.rule("forward", to_lab, established, ACCEPT)
    # With br_netfilter (bridge-nf-call-iptables=1, which Docker turns on)
    # frames bridged between two ports of the lab bridge also pass this hook;
    # they include DHCP from 0.0.0.0 to the services port. Which sources a
    # port may use is the bridge table's business (anti-spoofing), so bridged
    # lab traffic is accepted as a whole here.
    t.rule("forward", from_lab, to_lab, ACCEPT, comment="bridged within the lab")
    t.rule("forward", from_lab, lab_source, ACCEPT, comment="lab to anywhere, guest to guest")
    t.rule("forward", from_lab, _counter("outbound_rejected"), REJECT, comment="not a lab source")
    t.rule("forward", to_lab, dnat_done, ACCEPT, comment="port forwards")
    t.rule("forward", to_lab, _counter("inbound_rejected"), REJECT, comment="not forwarded")

    # Forwards answer on every local address: the uplink's (whatever it is
    # now), the gateway's (guests) and loopback (the host itself).
    dnat: JSON = {
        "dnat": {
            "family": "ip",
            "addr": {"map": {"key": proto_port, "data": "@forward_addr"}},
            "port": {"map": {"key": proto_port, "data": "@forward_port"}},
        }
    }
    local_dest = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    t.chain("prerouting", "nat", "prerouting", PRIO_DSTNAT)
    t.rule("prerouting", local_dest, tcp_udp, dnat)
    t.chain("output", "nat", "output", PRIO_DSTNAT)
    t.rule("output", local_dest, tcp_udp, dnat, comment="forwards used from the host itself")

    t.chain("postrouting", "nat", "postrouting", PRIO_SRCNAT)
    t.rule(
        "postrouting",
        lab_source,
        _match(_meta("oifname"), br, "!="),
        {"masquerade": None},
        comment="lab to the outside, with whatever address the uplink has",
    )
    # Hairpin: a forwarded connection from a guest or from host loopback
    # would get its reply straight from the target guest (same subnet) or
    # not at all (127/8 is not routable on the bridge); source-NAT it to the
    # gateway so the reply comes back through conntrack.
    t.rule(
        "postrouting",
        to_lab,
        dnat_done,
        _match(_payload("ip", "saddr"), {"set": [_prefix(LOOPBACK_NET), _prefix(subnet)]}),
        {"masquerade": None},
        comment="hairpin forwards",
    )
    return t.objects


def _concat_value(*values: str | int) -> JSON:
    return {"concat": list(values)}


def build_bridge_table(lab: Lab, bound_taps: Iterable[str] | None = None) -> list[JSON]:
    """Anti-spoofing for TAPs bound to a guest; the services port is trusted.

    Frames from a port that is not bound pass unchecked: before QEMU's TAP is
    bound to a guest record there is nobody to compare it with.
    """
    if bound_taps is None:
        guests = list(lab.guests)
    else:
        guests = []
        for tap in sorted(set(bound_taps)):
            g = lab.guest_by_tap(tap)
            if g is None:
                raise InvalidArgument(f"TAP {tap!r} is not the TAP of any guest")
            guests.append(g)
    guests.sort(key=lambda g: g.tap)

    t = _Table(BRIDGE)
    for name in ("spoofed_mac", "spoofed_arp", "spoofed_ip", "other_l2"):
        t.counter(name)
    t.set("bound_ports", "ifname", [g.tap for g in guests])
    t.set("port_mac", ["ifname", "ether_addr"], [_concat_value(g.tap, g.mac) for g in guests])
    t.set("port_ip", ["ifname", "ipv4_addr"], [_concat_value(g.tap, str(g.ip)) for g in guests])

    c = "prerouting"
    port = _meta("iifname")
    ether_type = _payload("ether", "type")
    t.chain(c, "filter", "prerouting", PRIO_BRIDGE_FILTER)
    t.rule(c, _match(port, lab.services.bridge_port), ACCEPT, comment="host services")
    t.rule(c, _match(port, "@bound_ports", "!="), ACCEPT)
    t.rule(
        c,
        _match(_concat(port, _payload("ether", "saddr")), "@port_mac", "!="),
        _counter("spoofed_mac"),
        DROP,
    )
    t.rule(
        c,
        _match(ether_type, "arp"),
        _match(_concat(port, _payload("arp", "saddr ether")), "@port_mac", "!="),
        _counter("spoofed_arp"),
        DROP,
    )
    # Sender 0.0.0.0 is an RFC 5227 address probe, which a guest sends
    # before it uses its own address.
    t.rule(
        c,
        _match(ether_type, "arp"),
        _match(_payload("arp", "saddr ip"), "0.0.0.0", "!="),
        _match(_concat(port, _payload("arp", "saddr ip")), "@port_ip", "!="),
        _counter("spoofed_arp"),
        DROP,
    )
    t.rule(c, _match(ether_type, "arp"), ACCEPT)
    # A DHCP client has no address yet and sends from 0.0.0.0.
    t.rule(
        c,
        _match(ether_type, "ip"),
        _match(_payload("ip", "saddr"), "0.0.0.0"),
        _match(_payload("udp", "sport"), 68),
        _match(_payload("udp", "dport"), 67),
        ACCEPT,
    )
    t.rule(
        c,
        _match(ether_type, "ip"),
        _match(_concat(port, _payload("ip", "saddr")), "@port_ip", "!="),
        _counter("spoofed_ip"),
        DROP,
    )
    t.rule(c, _match(ether_type, "ip"), ACCEPT)
    # The lab is IPv4: like libvirt's clean-traffic filter, any other
    # protocol (IPv6, VLAN tags, ...) from a bound guest is dropped.
    t.rule(c, _counter("other_l2"), DROP, comment="not IPv4 or ARP")
    return t.objects


def build_ruleset(
    lab: Lab,
    forwards: Iterable[PortForward] = (),
    bound_taps: Iterable[str] | None = None,
    host_ports_open_to_lab: Iterable[tuple[str, int]] = (),
) -> JSON:
    """Both tables. `bound_taps=None` means every guest's TAP is bound."""
    objects = build_inet_table(lab, forwards, host_ports_open_to_lab)
    objects += build_bridge_table(lab, bound_taps)
    return {"nftables": objects}


def count_rules(ruleset: JSON) -> int:
    return sum(1 for obj in ruleset["nftables"] if "rule" in obj)
