"""Diagnose why lab traffic may not flow, from facts the caller gathered.

Pure: input is the `nft -j list ruleset` dump (Firewall.list_ruleset()),
the ip_forward value and the default route's interface; output is a list of
findings in plain words, each with the fix.

The important check is for *other* tables: a packet must pass every base
chain on a hook, so an accept in our table does not help if Docker's
`table ip filter { chain FORWARD { policy drop } }` drops it. We follow
each foreign forward-hook chain for a few representative packets (a guest
opening a connection outwards, the replies, a port-forwarded connection in)
through a small evaluator that understands the matches such chains use
(interfaces, addresses, conntrack state, protocol, ports) and treats
anything else as "unknown" (reported as a warning, not an error).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from typing import Any

from qvmd.firewall.ruleset import OUR_TABLES
from qvmd.model import Lab

JSON = dict[str, Any]
ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    severity: str  # ERROR or WARNING
    summary: str
    fix: str = ""


@dataclass(frozen=True)
class Probe:
    """A representative packet; None means "not known" for the evaluator."""

    what: str
    iifname: str | None
    oifname: str | None
    saddr: IPv4Address | None
    daddr: IPv4Address | None
    ct_state: str
    ct_status: frozenset[str] = field(default_factory=frozenset)
    l4proto: str = "tcp"
    dport: int = 443


def diagnose(
    lab: Lab,
    ruleset: JSON,
    *,
    ip_forward: bool | None = None,
    default_route_dev: str | None = None,
    bridge_nf_call_iptables: bool = False,
) -> list[Finding]:
    findings: list[Finding] = []
    if ip_forward is False:
        findings.append(
            Finding(
                ERROR,
                "IPv4 forwarding is off (net.ipv4.ip_forward = 0): guests reach the host "
                "but nothing beyond it.",
                "sysctl -w net.ipv4.ip_forward=1 (qvmd turns it on at start; something "
                "turned it off since)",
            )
        )
    objects = [o for o in ruleset.get("nftables", []) if "metainfo" not in o]
    tables = {(o["table"]["family"], o["table"]["name"]) for o in objects if "table" in o}
    for family, name in OUR_TABLES:
        if (family, name) not in tables:
            what = "masquerade, port forwards" if family == "inet" else "anti-spoofing"
            findings.append(
                Finding(
                    ERROR,
                    f"qvmd's nft table '{family} {name}' is missing: no {what}.",
                    "restart qvmd (systemctl restart qvmd) so it re-creates its tables",
                )
            )
    if default_route_dev is None:
        findings.append(
            Finding(
                WARNING,
                "The host has no IPv4 default route: guests can reach the host and each "
                "other, nothing else.",
                "connect the host to a network (qvmd masquerades through whichever "
                "interface carries the default route)",
            )
        )
    elif default_route_dev == lab.bridge:
        findings.append(
            Finding(
                ERROR,
                f"The default route goes through the lab bridge {lab.bridge}: lab traffic "
                "would be sent back into the lab.",
                f"remove that route (ip route del default dev {lab.bridge})",
            )
        )
    findings += foreign_forward_drops(lab, objects, default_route_dev, bridge_nf_call_iptables)
    return findings


# Stands for the uplink when the default route is unknown: a name no rule
# spells, so `oifname "docker0"` is false for it and `oifname != "docker0"` true.
UNKNOWN_UPLINK = "(uplink)"
# Stands for "somewhere on the internet" (TEST-NET-2).
OUTSIDE = IPv4Address("198.51.100.1")


def lab_probes(lab: Lab, uplink: str | None, bridged: bool) -> list[Probe]:
    uplink = uplink or UNKNOWN_UPLINK
    guest = lab.guests[0].ip if lab.guests else next(lab.subnet.hosts())
    probes = [
        Probe("new connections from guests outwards", lab.bridge, uplink, guest, OUTSIDE, "new"),
        Probe("replies to guests' connections", uplink, lab.bridge, OUTSIDE, guest, "established"),
        Probe(
            "port-forwarded connections into the lab",
            uplink,
            lab.bridge,
            OUTSIDE,
            guest,
            "new",
            frozenset({"dnat"}),
        ),
    ]
    if bridged:
        # With br_netfilter's bridge-nf-call-iptables (Docker loads it),
        # even frames between guests on the bridge go through the forward hook.
        probes.append(Probe("traffic between guests", lab.bridge, lab.bridge, guest, guest, "new"))
    return probes


def foreign_forward_drops(
    lab: Lab, objects: list[JSON], uplink: str | None, bridged: bool = False
) -> list[Finding]:
    chains: dict[tuple[str, str, str], JSON] = {}
    rules: dict[tuple[str, str, str], list[list[JSON]]] = {}
    sets: dict[tuple[str, str, str], list[Any]] = {}
    for o in objects:
        if "chain" in o:
            c = o["chain"]
            chains[(c["family"], c["table"], c["name"])] = c
        elif "rule" in o:
            r = o["rule"]
            rules.setdefault((r["family"], r["table"], r["chain"]), []).append(r.get("expr", []))
        for kind in ("set", "map"):
            if kind in o:
                s = o[kind]
                sets[(s["family"], s["table"], s["name"])] = s.get("elem", [])

    findings: list[Finding] = []
    for key, chain in sorted(chains.items()):
        family, table, name = key
        if (family, table) in OUR_TABLES or chain.get("hook") != "forward":
            continue
        if family not in ("ip", "inet"):
            continue
        ev = _Evaluator(family, table, rules, sets)
        for probe in lab_probes(lab, uplink, bridged):
            verdict = ev.run_base(name, chain.get("policy", "accept"), probe)
            if verdict == "accept":
                continue
            findings.append(_drop_finding(lab, chains, key, chain, probe, verdict == "drop"))
    return findings


def _drop_finding(
    lab: Lab,
    chains: dict[tuple[str, str, str], JSON],
    key: tuple[str, str, str],
    chain: JSON,
    probe: Probe,
    certain: bool,
) -> Finding:
    family, table, name = key
    where = (
        f"table '{family} {table}', chain '{name}' (hook forward, priority "
        f"{chain.get('prio')}, policy {chain.get('policy', 'accept')})"
    )
    verb = "drops" if certain else "may drop (rules it cannot judge decide)"
    summary = (
        f"{where} {verb} {probe.what}. A packet must pass every table's forward chain, "
        "so qvmd's own accept cannot override it."
    )
    br = lab.bridge
    if (family, table, "DOCKER-USER") in chains:
        summary += " This is Docker's FORWARD chain (policy drop)."
        fix = (
            f"let the lab through Docker's user chain: iptables -I DOCKER-USER -i {br} -j ACCEPT"
            f" && iptables -I DOCKER-USER -o {br} -j ACCEPT (qvmd's table still refuses "
            "unforwarded connections into the lab); make it permanent in your firewall "
            "start-up, Docker does not keep it"
        )
    elif "firewalld" in table:
        fix = f"put {br} in a firewalld zone or policy that allows forwarding (as libvirt's zone)"
    else:
        fix = (
            f"add accepts for the lab at the top of that chain: nft insert rule {family} "
            f"{table} {name} iifname {br} accept; nft insert rule {family} {table} {name} "
            f"oifname {br} accept (qvmd's table still refuses unforwarded connections "
            "into the lab)"
        )
    return Finding(ERROR if certain else WARNING, summary, fix)


class _Evaluator:
    """Follows one table's chains for one probe: accept, drop or unknown."""

    def __init__(
        self,
        family: str,
        table: str,
        rules: dict[tuple[str, str, str], list[list[JSON]]],
        sets: dict[tuple[str, str, str], list[Any]],
    ) -> None:
        self.family = family
        self.table = table
        self.rules = rules
        self.sets = sets
        self.uncertain = False

    def run_base(self, chain: str, policy: str, probe: Probe) -> str:
        self.uncertain = False
        verdict = self._run(chain, probe, 0)
        if verdict in ("continue", "return"):
            verdict = "drop" if policy == "drop" else "accept"
        if verdict == "drop" and self.uncertain:
            return "unknown"
        return verdict

    def _run(self, chain: str, probe: Probe, depth: int) -> str:
        if depth > 16:  # nft itself refuses deeper jump chains
            self.uncertain = True
            return "continue"
        for expr in self.rules.get((self.family, self.table, chain), []):
            verdict = self._rule(expr, probe, depth)
            if verdict != "continue":
                return verdict
        return "continue"

    def _rule(self, exprs: list[JSON], probe: Probe, depth: int) -> str:
        for e in exprs:
            if "match" in e:
                m = self._match(e["match"], probe)
                if m is None:
                    # Assume it does not match but remember that we guessed.
                    self.uncertain = True
                    return "continue"
                if not m:
                    return "continue"
            elif "accept" in e:
                return "accept"
            elif "drop" in e or "reject" in e:
                return "drop"
            elif "return" in e:
                return "return"
            elif "jump" in e or "goto" in e:
                kind = "jump" if "jump" in e else "goto"
                sub = self._run(e[kind]["target"], probe, depth + 1)
                if sub in ("accept", "drop"):
                    return sub
                if kind == "goto":
                    return "return"
        return "continue"

    def _match(self, m: JSON, probe: Probe) -> bool | None:
        op = m.get("op", "==")
        left, right = m.get("left"), m.get("right")
        value = self._value(left, probe)
        if value is _UNKNOWN:
            return None
        if isinstance(right, str) and right.startswith("@"):
            elems = self.sets.get((self.family, self.table, right[1:]))
            if elems is None:
                return None
            right = {"set": elems}
        hit = _compare(value, right)
        if hit is None:
            return None
        return not hit if op == "!=" else hit

    def _value(self, left: Any, probe: Probe) -> Any:
        if not isinstance(left, dict):
            return _UNKNOWN
        if "meta" in left:
            key = left["meta"].get("key")
            if key in ("iifname", "oifname"):
                v = probe.iifname if key == "iifname" else probe.oifname
                return _UNKNOWN if v is None else v
            if key == "l4proto":
                return probe.l4proto
            if key == "nfproto":
                return "ipv4"
            return _UNKNOWN
        if "payload" in left:
            p = left["payload"]
            proto, fld = p.get("protocol"), p.get("field")
            if proto == "ip" and fld in ("saddr", "daddr"):
                v4 = probe.saddr if fld == "saddr" else probe.daddr
                return _UNKNOWN if v4 is None else v4
            if proto == "ip" and fld == "protocol":
                return probe.l4proto
            if proto in ("tcp", "th") and fld == "dport":
                return probe.dport
            return _UNKNOWN
        if "ct" in left:
            key = left["ct"].get("key")
            if key == "state":
                return frozenset({probe.ct_state})
            if key == "status":
                return probe.ct_status
        return _UNKNOWN


_UNKNOWN = object()


def _compare(value: Any, right: Any) -> bool | None:
    """Does `value` match the nft JSON right-hand side? None if we cannot tell."""
    if isinstance(right, dict) and "set" in right:
        results = [_compare(value, r) for r in right["set"]]
        if any(results):
            return True
        return None if None in results else False
    if isinstance(right, list):
        # A list is a set of flags (ct state) or of values.
        return _compare(value, {"set": right})
    if isinstance(value, frozenset):  # flag sets: ct state / ct status
        return isinstance(right, str) and right in value
    if isinstance(value, IPv4Address):
        return _addr_in(value, right)
    if isinstance(value, str) and isinstance(right, str):
        # nft interface wildcards: "docker*"
        return fnmatch.fnmatchcase(value, right) if right.endswith("*") else value == right
    if isinstance(value, int) and isinstance(right, int):
        return value == right
    if isinstance(value, int) and isinstance(right, dict) and "range" in right:
        lo, hi = right["range"]
        return isinstance(lo, int) and isinstance(hi, int) and lo <= value <= hi
    return None


def _addr_in(addr: IPv4Address, right: Any) -> bool | None:
    try:
        if isinstance(right, str):
            return addr == ip_address(right)
        if isinstance(right, dict) and "prefix" in right:
            net = ip_network(f"{right['prefix']['addr']}/{right['prefix']['len']}", strict=False)
            return isinstance(net, IPv4Network) and addr in net
        if isinstance(right, dict) and "range" in right:
            lo, hi = (ip_address(x) for x in right["range"])
            return isinstance(lo, IPv4Address) and isinstance(hi, IPv4Address) and lo <= addr <= hi
    except (ValueError, TypeError, KeyError):
        return None
    return None
