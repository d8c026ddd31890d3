"""link_drift: what differs from the desired links, one line each (pure)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

from qvmd.links import TapSpec
from qvmd.linkstate import LinkState, TunInfo
from qvmd.model import default_lab
from qvmd.plane import link_drift

LAB = default_lab()
TAPS = {g.tap: TapSpec(g.tap, 0, None) for g in LAB.guests}


def healthy() -> tuple[dict[str, LinkState], LinkState]:
    have = {
        "qvm0": LinkState(1, "qvm0", "bridge", True, True, None, "", None, [LAB.gateway]),
        "qvm0-svc": LinkState(2, "qvm0-svc", "veth", True, True, 1, ""),
    }
    for i, g in enumerate(LAB.guests):
        have[g.tap] = LinkState(
            10 + i, g.tap, "tun", True, False, 1, "", TunInfo(0, None, False, True, True)
        )
    svc = LinkState(5, "veth0", "veth", True, True, None, "", None, [IPv4Interface("10.42.0.2/24")])
    return have, svc


def test_no_drift_when_everything_is_as_desired() -> None:
    have, svc = healthy()
    assert link_drift(LAB, TAPS, have, svc, IPv4Address("10.42.0.1"), True) == []


def test_each_difference_is_one_line() -> None:
    have, _ = healthy()
    have["qvm0"].addresses.clear()
    del have["qvm0tap1"]
    tap2 = have["qvm0tap2"]
    have["qvm0tap2"] = LinkState(
        tap2.index, tap2.name, "tun", False, False, None, "", TunInfo(4242, None, True, True, True)
    )
    assert link_drift(LAB, TAPS, have, None, None, False) == [
        "bridge qvm0 lacks 10.42.0.1/24",
        "TAP qvm0tap1 is missing",
        "TAP qvm0tap2 is owned by uid 4242, not 0",
        "TAP qvm0tap2 has multi_queue=True",
        "TAP qvm0tap2 is not on qvm0",
        "TAP qvm0tap2 is down",
        "qvm-services/veth0 is missing",
        "IPv4 forwarding is off",
    ]
