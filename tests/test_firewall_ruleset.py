"""The pure parts of the firewall: ruleset builder and doctor. No root.

The default lab's ruleset is compared with tests/golden/firewall_default.json
(regenerate with QVMD_UPDATE_GOLDEN=1 and review the diff). The netns tests
(test_firewall_netns.py) prove the same JSON does what it says in a kernel.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvmd.errors import InvalidArgument
from qvmd.firewall import doctor
from qvmd.firewall.forwards import PortForward
from qvmd.firewall.ruleset import build_ruleset, count_rules
from qvmd.model import Guest, Lab, default_lab, derive_mac

GOLDEN = Path(__file__).parent / "golden" / "firewall_default.json"
LAB = default_lab()


def lab_with(n: int) -> Lab:
    """The default lab with n guests in 10.42.0.0/16."""
    guests = []
    for i in range(n):
        ip = IPv4Address(int(IPv4Address("10.42.1.0")) + i)
        guests.append(
            Guest(f"g{i}", f"g{i}.qvm0.lan", ip, derive_mac(ip), f"qvm0tap{i}", LAB.tap_owner)
        )
    return replace(LAB, gateway=IPv4Interface("10.42.0.1/16"), guests=tuple(guests))


def objects(ruleset: dict[str, Any], kind: str, family: str | None = None) -> list[dict[str, Any]]:
    return [
        o[kind]
        for o in ruleset["nftables"]
        if kind in o and (family is None or o[kind]["family"] == family)
    ]


def named(ruleset: dict[str, Any], kind: str, family: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects(ruleset, kind, family) if o["name"] == name]
    return found


def rules(ruleset: dict[str, Any], family: str, chain: str) -> list[list[dict[str, Any]]]:
    return [r["expr"] for r in objects(ruleset, "rule", family) if r["chain"] == chain]


def test_default_lab_matches_golden() -> None:
    text = json.dumps(build_ruleset(LAB), indent=2) + "\n"
    if os.environ.get("QVMD_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), f"{GOLDEN} missing; run with QVMD_UPDATE_GOLDEN=1"
    assert text == GOLDEN.read_text(), f"ruleset differs from {GOLDEN}"


def test_rule_count_does_not_grow_with_guests_or_forwards() -> None:
    small = build_ruleset(LAB)
    big_lab = lab_with(1000)
    fwd = [PortForward("tcp", 10000 + i, f"g{i}", 22, 1000) for i in range(200)]
    big = build_ruleset(big_lab, fwd)
    assert count_rules(small) == count_rules(big) == 25
    # ... while the elements do.
    assert len(named(big, "set", "bridge", "port_ip")["elem"]) == 1000
    assert len(named(big, "map", "inet", "forward_addr")["elem"]) == 200


@settings(max_examples=30, deadline=None)
@given(
    st.integers(min_value=0, max_value=40),
    st.sets(st.integers(min_value=1024, max_value=65535), max_size=20),
)
def test_rule_count_is_constant(n_guests: int, ports: set[int]) -> None:
    lab = lab_with(n_guests)
    fwd = [PortForward("udp", p, f"g{p % n_guests}", 53, 0) for p in ports] if n_guests else []
    assert count_rules(build_ruleset(lab, fwd)) == count_rules(build_ruleset(LAB))


def test_forwards_fill_both_maps_with_the_guest_address() -> None:
    rs = build_ruleset(
        LAB, [PortForward("tcp", 6443, "cp", 6443, 1000), PortForward("udp", 5353, "wk-2", 53, 0)]
    )
    assert named(rs, "map", "inet", "forward_addr")["elem"] == [
        [{"concat": ["tcp", 6443]}, "10.42.0.10"],
        [{"concat": ["udp", 5353]}, "10.42.0.12"],
    ]
    assert named(rs, "map", "inet", "forward_port")["elem"] == [
        [{"concat": ["tcp", 6443]}, 6443],
        [{"concat": ["udp", 5353]}, 53],
    ]


@pytest.mark.parametrize(
    ("forwards", "message"),
    [
        ([PortForward("tcp", 6443, "nope", 6443, 0)], "unknown guest 'nope'"),
        ([PortForward("tcp", 6443, "cp", 1, 0), PortForward("tcp", 6443, "wk-1", 2, 0)], "twice"),
        ([PortForward("sctp", 6443, "cp", 1, 0)], "protocol"),
        ([PortForward("tcp", 0, "cp", 1, 0)], "outside 1-65535"),
        ([PortForward("tcp", 1, "cp", 70000, 0)], "outside 1-65535"),
    ],
)
def test_bad_forwards_are_refused(forwards: list[PortForward], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        build_ruleset(LAB, forwards)


def test_only_bound_taps_are_checked() -> None:
    rs = build_ruleset(LAB, bound_taps=["qvm0tap1"])
    assert named(rs, "set", "bridge", "bound_ports")["elem"] == ["qvm0tap1"]
    assert named(rs, "set", "bridge", "port_mac")["elem"] == [
        {"concat": ["qvm0tap1", "52:54:0a:2a:00:0b"]}
    ]
    assert named(rs, "set", "bridge", "port_ip")["elem"] == [{"concat": ["qvm0tap1", "10.42.0.11"]}]
    none = build_ruleset(LAB, bound_taps=[])
    assert "elem" not in named(none, "set", "bridge", "bound_ports")
    with pytest.raises(InvalidArgument, match="not the TAP of any guest"):
        build_ruleset(LAB, bound_taps=["eth0"])


def test_services_port_is_trusted_before_any_check() -> None:
    first = rules(build_ruleset(LAB), "bridge", "prerouting")[0]
    assert first == [
        {
            "match": {
                "op": "==",
                "left": {"meta": {"key": "iifname"}},
                "right": LAB.services.bridge_port,
            }
        },
        {"accept": None},
    ]


def test_masquerade_names_no_uplink() -> None:
    """Whatever interface carries the default route, with whatever address."""
    (masq, _hairpin) = rules(build_ruleset(LAB), "inet", "postrouting")
    ifaces = [e["match"] for e in masq if "match" in e and "meta" in e["match"]["left"]]
    assert ifaces == [{"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "qvm0"}]
    assert {"masquerade": None} in masq


def test_lab_values_come_from_the_model() -> None:
    lab = replace(LAB, bridge="lab7", gateway=IPv4Interface("192.168.77.1/24"))
    text = json.dumps(build_ruleset(lab))
    assert '"lab7"' in text and "192.168.77.0" in text
    assert '"qvm0"' not in text and "10.42.0.0" not in text


def test_host_ports_open_to_lab() -> None:
    rs = build_ruleset(LAB, host_ports_open_to_lab=[("tcp", 22), ("udp", 69), ("tcp", 22)])
    assert named(rs, "set", "inet", "host_ports_open_to_lab")["elem"] == [
        {"concat": ["tcp", 22]},
        {"concat": ["udp", 69]},
    ]
    with pytest.raises(InvalidArgument):
        build_ruleset(LAB, host_ports_open_to_lab=[("icmp", 1)])


def test_builder_is_pure() -> None:
    fwd = (PortForward("tcp", 6443, "cp", 6443, 0),)
    assert build_ruleset(LAB, fwd) == build_ruleset(LAB, fwd)
    assert default_lab() == LAB


# -- doctor --------------------------------------------------------------------

# `nft -j list ruleset` (nft 1.0.6) of Docker's filter table as iptables-nft
# leaves it: FORWARD with policy drop, accepting only docker0's traffic.
DOCKER = json.loads(
    r"""{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "filter", "handle": 1}}, {"chain": {"family": "ip", "table": "filter", "name": "DOCKER", "handle": 1}}, {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-ISOLATION-STAGE-1", "handle": 2}}, {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-ISOLATION-STAGE-2", "handle": 3}}, {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 4, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}, {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 5}}, {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-ISOLATION-STAGE-1", "handle": 6, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}}, {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "DOCKER-ISOLATION-STAGE-2"}}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-ISOLATION-STAGE-1", "handle": 7, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"return": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-ISOLATION-STAGE-2", "handle": 8, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-ISOLATION-STAGE-2", "handle": 9, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"return": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 10, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "DOCKER-USER"}}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 11, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "DOCKER-ISOLATION-STAGE-1"}}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 12, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 13, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "DOCKER"}}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 14, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}}, {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 15, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-USER", "handle": 16, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"return": null}]}}]}"""  # noqa: E501
)


def ours() -> list[dict[str, Any]]:
    return list(build_ruleset(LAB)["nftables"])


def dump(*extra: dict[str, Any]) -> dict[str, Any]:
    return {"nftables": [*ours(), *extra]}


def with_docker_user_rules(*exprs: list[dict[str, Any]]) -> dict[str, Any]:
    rs = json.loads(json.dumps(DOCKER))
    items = rs["nftables"]
    # Users insert their rules before Docker's final `return`.
    last = max(
        i for i, o in enumerate(items) if "rule" in o and o["rule"]["chain"] == "DOCKER-USER"
    )
    for e in reversed(exprs):
        items.insert(
            last, {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-USER", "expr": e}}
        )
    return {"nftables": ours() + items}


def iif(name: str, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": "iifname"}}, "right": name}}


def oif(name: str, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": "oifname"}}, "right": name}}


ACCEPT = {"accept": None}


def test_healthy_host_has_no_findings() -> None:
    assert doctor.diagnose(LAB, dump(), ip_forward=True, default_route_dev="eth0") == []


def test_docker_forward_drop_is_named_with_the_fix() -> None:
    docker = {"nftables": ours() + DOCKER["nftables"]}
    findings = doctor.diagnose(LAB, docker, ip_forward=True, default_route_dev="eth0")
    assert {f.severity for f in findings} == {"error"}
    # Outbound, replies and forwards are all dropped: one finding each.
    assert len(findings) == 3
    f = findings[0]
    assert "table 'ip filter', chain 'FORWARD'" in f.summary and "policy drop" in f.summary
    assert "Docker" in f.summary
    assert "iptables -I DOCKER-USER -i qvm0 -j ACCEPT" in f.fix
    assert "iptables -I DOCKER-USER -o qvm0 -j ACCEPT" in f.fix


def test_docker_with_the_fix_applied_is_fine() -> None:
    fixed = with_docker_user_rules([iif("qvm0"), ACCEPT], [oif("qvm0"), ACCEPT])
    assert doctor.diagnose(LAB, fixed, ip_forward=True, default_route_dev="eth0") == []


def test_docker_with_only_outbound_fixed_still_breaks_replies() -> None:
    half = with_docker_user_rules([iif("qvm0"), ACCEPT])
    summaries = [
        f.summary for f in doctor.diagnose(LAB, half, ip_forward=True, default_route_dev="eth0")
    ]
    assert len(summaries) == 2
    assert "replies to guests' connections" in summaries[0]
    assert "port-forwarded connections" in summaries[1]


def foreign(
    family: str, table: str, chain: str, *exprs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Another program's table: one forward chain with policy drop and these rules."""
    base = {"family": family, "table": table}
    return [
        {"table": {"family": family, "name": table}},
        {
            "chain": {
                **base,
                "name": chain,
                "type": "filter",
                "hook": "forward",
                "prio": 0,
                "policy": "drop",
            }
        },
        *({"rule": {**base, "chain": chain, "expr": e}} for e in exprs),
    ]


def test_wildcards_sets_and_unknown_uplink() -> None:
    either = {"set": ["docker0", "qvm0"]}
    fw = foreign(
        "inet",
        "fw",
        "fwd",
        [iif("qvm*"), ACCEPT],
        [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": either}}, ACCEPT],
    )
    assert doctor.diagnose(LAB, dump(*fw), ip_forward=True, default_route_dev="wlan0") == []
    # No default route: a warning about it, and the evaluator still decides.
    findings = doctor.diagnose(LAB, dump(*fw), ip_forward=True)
    assert [f.severity for f in findings] == ["warning"]
    assert "default route" in findings[0].summary


def test_rules_it_cannot_judge_give_a_warning_not_an_error() -> None:
    socket = {"match": {"op": "==", "left": {"socket": {"key": "transparent"}}, "right": 1}}
    fw = foreign("ip", "x", "FWD", [socket, ACCEPT])
    findings = doctor.diagnose(LAB, dump(*fw), ip_forward=True, default_route_dev="eth0")
    assert findings and {f.severity for f in findings} == {"warning"}
    assert "may drop" in findings[0].summary
    assert "nft insert rule ip x FWD iifname qvm0 accept" in findings[0].fix


def test_br_netfilter_adds_guest_to_guest_probe() -> None:
    fw = foreign(
        "ip",
        "x",
        "FWD",
        [iif("qvm0"), oif("qvm0", "!="), ACCEPT],
        [oif("qvm0"), iif("qvm0", "!="), ACCEPT],
    )
    d = dump(*fw)
    assert doctor.diagnose(LAB, d, ip_forward=True, default_route_dev="eth0") == []
    (f,) = doctor.diagnose(
        LAB, d, ip_forward=True, default_route_dev="eth0", bridge_nf_call_iptables=True
    )
    assert "traffic between guests" in f.summary


def test_host_checks() -> None:
    only_inet = {"nftables": [o for o in ours() if next(iter(o.values()))["family"] == "inet"]}
    findings = doctor.diagnose(LAB, only_inet, ip_forward=False, default_route_dev="qvm0")
    text = [f.summary for f in findings]
    assert any("ip_forward = 0" in t for t in text)
    assert any("'bridge qvm' is missing: no anti-spoofing" in t for t in text)
    assert any("default route goes through the lab bridge" in t for t in text)
    assert all(f.severity == "error" for f in findings) and len(findings) == 3
    assert all(f.fix for f in findings)
