"""Which kernel events wake the healer, and how wide a pass they ask for.

Real events from a real namespace, read by the real NetlinkMonitor (driven
by hand: the socket is non-blocking, no event loop needed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from qvmd import monitor
from qvmd.nlworker import NetlinkWorker
from tests.netns import netns, nsrun

pytestmark = pytest.mark.root

BRIDGE = ("ip", "link", "add", "qvm0", "address", "52:54:0a:2a:00:01", "type", "bridge")


class Recorder:
    def __init__(self) -> None:
        self.full: list[str] = []
        self.taps: set[str] = set()
        self.lost: list[str] = []

    def wake(self, reason: str, tap: str | None = None) -> None:
        if tap is None:
            self.full.append(reason)
        else:
            self.taps.add(tap)

    def take(self) -> tuple[list[str], set[str]]:
        out = (self.full, self.taps)
        self.full, self.taps = [], set()
        return out


@pytest.fixture
def watched() -> Iterator[tuple[str, monitor.NetlinkMonitor, Recorder]]:
    with netns("mon") as ns:
        worker = NetlinkWorker(ns)
        try:
            sock = worker.run_sync(lambda _ipr: monitor.open_event_socket())
        finally:
            worker.close()
        rec = Recorder()
        mon = monitor.NetlinkMonitor(
            sock,
            is_ours=lambda name: name in ("qvm0", "qvm0-svc"),
            wake=rec.wake,
            where="test",
            is_tap=lambda name: name.startswith("qvm0tap"),
        )
        mon.on_lost_tap = rec.lost.append
        try:
            yield ns, mon, rec
        finally:
            sock.close()


def events(
    ns: str, mon: monitor.NetlinkMonitor, rec: Recorder, *cmd: str
) -> tuple[list[str], set[str]]:
    nsrun(ns, *cmd)
    time.sleep(0.05)  # rtnetlink delivers synchronously; linkwatch (carrier) a little later
    mon._readable()
    return rec.take()


def test_tap_traffic_wakes_only_scoped_passes(
    watched: tuple[str, monitor.NetlinkMonitor, Recorder],
) -> None:
    ns, mon, rec = watched
    # With a fixed MAC, as qvmd makes it (else it follows its ports' MACs).
    full, _ = events(ns, mon, rec, *BRIDGE)
    assert full, "a new bridge of ours must wake a full pass"
    full, _ = events(ns, mon, rec, "ip", "link", "set", "qvm0", "up")
    assert full, "the bridge going up changes what qvmd reconciles"
    # A TAP joining and leaving the bridge makes the kernel announce the
    # bridge again (features, carrier): nothing qvmd reconciles changed.
    full, taps = events(ns, mon, rec, "ip", "tuntap", "add", "qvm0tap5", "mode", "tap")
    assert (full, taps) == ([], {"qvm0tap5"}), full
    full, taps = events(ns, mon, rec, "ip", "link", "set", "qvm0tap5", "master", "qvm0", "up")
    assert (full, taps) == ([], {"qvm0tap5"}), full
    full, taps = events(ns, mon, rec, "ip", "link", "del", "qvm0tap5")
    assert (full, taps) == ([], {"qvm0tap5"}), full
    assert rec.lost == []  # nobody held it
    # Links that are not ours wake nothing at all.
    assert events(
        ns, mon, rec, "ip", "link", "add", "x0", "type", "veth", "peer", "name", "x1"
    ) == (
        [],
        set(),
    )


@pytest.mark.parametrize(
    "fault",
    [
        ("ip", "link", "set", "qvm0", "down"),
        ("ip", "link", "set", "qvm0", "address", "02:00:00:00:00:07"),
        ("ip", "addr", "del", "10.42.0.1/24", "dev", "qvm0"),
        ("ip", "link", "set", "qvm0", "name", "qvmX"),
        ("ip", "link", "del", "qvm0"),
        ("ip", "link", "set", "qvm0-svc", "nomaster"),
        ("sysctl", "-qw", "net.ipv4.ip_forward=1"),
    ],
    ids=["down", "mac", "address", "rename", "delete", "port-detached", "ip_forward"],
)
def test_changes_to_what_qvmd_reconciles_wake_a_full_pass(
    watched: tuple[str, monitor.NetlinkMonitor, Recorder], fault: tuple[str, ...]
) -> None:
    ns, mon, rec = watched
    nsrun(ns, *BRIDGE)
    nsrun(ns, "ip", "addr", "add", "10.42.0.1/24", "dev", "qvm0")
    nsrun(ns, "ip", "link", "set", "qvm0", "up")
    nsrun(ns, "ip", "link", "add", "qvm0-svc", "type", "veth", "peer", "name", "peer0")
    nsrun(ns, "ip", "link", "set", "qvm0-svc", "master", "qvm0", "up")
    time.sleep(0.05)
    mon._readable()
    rec.take()
    full, _ = events(ns, mon, rec, *fault)
    assert full, f"{' '.join(fault)} woke nothing"
