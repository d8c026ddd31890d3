"""rtnl reads the same links, kinds, TAP owners and addresses as
pyroute2's full parse (which it replaces in snapshot() for speed)."""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Interface
from typing import Any

import pytest

from qvmd import rtnl, tuntap
from qvmd.linkstate import LinkState, TunInfo
from qvmd.nlworker import NetlinkWorker
from tests.netns import netns, nsrun

pytestmark = pytest.mark.root


def pyroute2_link(msg: Any) -> LinkState:
    """The reference: the same fields through pyroute2's full parse."""
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    tun = None
    if kind == "tun":
        data = info.get_attr("IFLA_INFO_DATA")
        tun = TunInfo(
            owner=data.get_attr("IFLA_TUN_OWNER"),
            group=data.get_attr("IFLA_TUN_GROUP"),
            multi_queue=bool(data.get_attr("IFLA_TUN_MULTI_QUEUE")),
            persist=bool(data.get_attr("IFLA_TUN_PERSIST")),
            is_tap=data.get_attr("IFLA_TUN_TYPE") == 2,
        )
    return LinkState(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        up=bool(msg["flags"] & 1),
        carrier=bool(msg.get_attr("IFLA_CARRIER")),
        master=msg.get_attr("IFLA_MASTER"),
        mac=msg.get_attr("IFLA_ADDRESS") or "",
        tun=tun,
    )


def pyroute2_snapshot(ipr: Any) -> dict[str, LinkState]:
    out = {s.name: s for s in map(pyroute2_link, ipr.get_links())}
    by_index = {s.index: s for s in out.values()}
    for msg in ipr.get_addr(family=socket.AF_INET):
        by_index[msg["index"]].addresses.append(
            IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
        )
    return out


def test_rtdump_matches_pyroute2() -> None:
    with netns("rt") as ns:
        nsrun(ns, "ip", "link", "add", "br0", "type", "bridge")
        nsrun(ns, "ip", "addr", "add", "10.9.0.1/24", "dev", "br0")
        nsrun(ns, "ip", "addr", "add", "10.9.1.1/16", "dev", "br0")
        nsrun(ns, "ip", "link", "set", "br0", "up")
        nsrun(ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        nsrun(ns, "ip", "link", "set", "v0", "master", "br0", "up")
        worker = NetlinkWorker(ns)
        try:

            def make_taps(_ipr: Any) -> None:
                tuntap.create_tap("t0", 1000, None, False)
                tuntap.create_tap("t1", 0, 4242, True)

            worker.run_sync(make_taps)
            nsrun(ns, "ip", "link", "set", "t0", "master", "br0", "up")
            ours = worker.run_sync(lambda _ipr: rtnl.dump_links())
            theirs = worker.run_sync(pyroute2_snapshot)
            one_by_one = {
                name: worker.run_sync(lambda _ipr, n=name: rtnl.get_link(n)) for name in theirs
            }
            missing = worker.run_sync(lambda _ipr: rtnl.get_link("nosuchlink"))
        finally:
            worker.close()
    assert set(ours) == set(theirs) == {"lo", "br0", "v0", "v1", "t0", "t1"}
    for name in ours:
        assert ours[name] == theirs[name] == one_by_one[name], name
    assert missing is None
    assert ours["t1"].tun is not None and ours["t1"].tun.group == 4242
    assert ours["t1"].tun.multi_queue and ours["t0"].master == ours["br0"].index
    assert IPv4Interface("10.9.1.1/16") in ours["br0"].addresses


def test_set_link_enslaves_and_sets_up_in_one_request() -> None:
    with netns("rtset") as ns:
        nsrun(ns, "ip", "link", "add", "br0", "type", "bridge")
        nsrun(ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        worker = NetlinkWorker(ns)
        try:
            br, v0 = (worker.run_sync(lambda _ipr, n=n: rtnl.get_link(n)) for n in ("br0", "v0"))
            assert br is not None and v0 is not None and not v0.up and v0.master is None
            worker.run_sync(lambda _ipr: rtnl.set_link(v0.index, master=br.index, up=True))
            after = worker.run_sync(lambda _ipr: rtnl.get_link("v0"))
            assert after is not None and after.up and after.master == br.index
            worker.run_sync(lambda _ipr: rtnl.set_link(v0.index, up=False))
            down = worker.run_sync(lambda _ipr: rtnl.get_link("v0"))
            assert down is not None and not down.up and down.master == br.index
            with pytest.raises(OSError, match="RTM_NEWLINK failed") as err:
                worker.run_sync(lambda _ipr: rtnl.set_link(99999, up=True))
            assert err.value.errno == errno.ENODEV
        finally:
            worker.close()
