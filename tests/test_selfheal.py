"""Fault injection against the real daemon (issue 7): every fault is repaired
without a restart, and how long that takes is measured and reported.

Each test runs qvmd (`python -m qvmd.daemon --netns NS`) in namespaces the
test made; faults are injected with the ordinary tools (`ip`, `nft`,
`sysctl`, `kill`) inside those namespaces only. "Repaired" means the whole
lab is back to what it was before the fault: bridge (kind, MAC, address,
up), the three lab TAPs (on the bridge, up), the services veth (on the
bridge, veth0 with its address and the default route), IPv4 forwarding, and
both `qvm` nft tables listing exactly as before (counters and handles
ignored). The lab is observed through a thread that entered the namespace
and holds its own netlink socket and libnftables context, so one check costs
about a millisecond and polling every 2 ms is real.

Bounds asserted are generous (CI machines are noisy); the issue's goal of
200 ms is reported, not asserted. Run with `-s` to see the times:

    .venv/bin/pytest -s -m root tests/test_selfheal.py

Tests once written as `xfail(strict=True)` for gaps have been flipped as the
daemon learnt to repair them; the suite is
green and documents the gap; when the daemon is fixed they XPASS and fail,
so they must then be flipped. docs/selfheal.md has the measured times.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nftables
import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pnetns

from tests import busenv
from tests.netns import netns, netns_exists, nsrun, run
from tests.qvmd_proc import Qvmd, qvmd_sandbox

pytestmark = pytest.mark.root

T = TypeVar("T")

FAULT_GUEST = str(Path(__file__).parent / "helpers" / "fault_guest.py")
POLL = 0.002  # seconds between checks
BOUND = 2.0  # asserted: repaired within this long (noisy CI)
GOAL = 0.2  # the goal for links and the nft table; reported only
BRIDGE, GATEWAY, SVC_ADDR, SUBNET = "qvm0", "10.42.0.1", "10.42.0.2", "10.42.0.0"
BRIDGE_MAC = "52:54:0a:2a:00:01"
TAPS = ("qvm0tap0", "qvm0tap1", "qvm0tap2")
SVC_PORT, SVC_IF = "qvm0-svc", "veth0"
CP_MAC, CP_IP = "52:54:0a:2a:00:0a", "10.42.0.10"  # guest cp, on qvm0tap0
WK1_MAC, WK1_IP = "52:54:0a:2a:00:0b", "10.42.0.11"  # guest wk-1, as a namespace
KILL_POINTS = 200  # what issue 7 asks for (~4 minutes); QVT_KILL_POINTS=N to change
UNDO_LINE = "something keeps undoing qvmd's changes"
IFF_UP = 0x1

RESULTS: list[tuple[str, str, float]] = []  # (fault, what, seconds), printed at the end


def record(fault: str, what: str, seconds: float) -> None:
    RESULTS.append((fault, what, seconds))
    flag = "" if seconds <= GOAL else f"  (over the {GOAL * 1000:.0f} ms goal)"
    print(f"\n[selfheal] {fault}: {what} {seconds * 1000:.1f} ms{flag}")


@pytest.fixture(scope="module", autouse=True)
def _times_table() -> Iterator[None]:
    yield
    if RESULTS:
        print("\n[selfheal] fault -> repaired (ms)")
        for fault, what, seconds in RESULTS:
            print(f"[selfheal]   {fault:32} {what:28} {seconds * 1000:9.1f}")


# -- observing a namespace cheaply ------------------------------------------


class Probe:
    """One thread inside a namespace with its own IPRoute and nft context.

    pyroute2's IPRoute must be used on the thread that made it, and a
    netlink socket belongs to the namespace of the thread that opened it.
    The thread keeps the namespace alive: close the probe before deleting
    the namespace it watches.
    """

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.inode = os.stat(f"/run/netns/{ns}").st_ino
        self._ipr: Any = None
        self._nft: Any = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"probe-{ns}")
        self._pool.submit(self._init).result(timeout=10)

    def _init(self) -> None:
        pnetns.setns(self.ns, flags=0)
        self._ipr = IPRoute()
        self._nft = nftables.Nftables()

    def call(self, fn: Callable[[Any, Any], T], timeout: float = 10) -> T:
        return self._pool.submit(lambda: fn(self._ipr, self._nft)).result(timeout=timeout)

    def current(self) -> bool:
        """False when the name now points at another (or no) namespace."""
        try:
            return os.stat(f"/run/netns/{self.ns}").st_ino == self.inode
        except FileNotFoundError:
            return False

    def close(self) -> None:
        def _close() -> None:
            if self._ipr is not None:
                self._ipr.close()

        with suppress(Exception):
            self._pool.submit(_close).result(timeout=5)
        self._pool.shutdown(wait=True)


def _links(ipr: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for msg in ipr.get_links():
        info = msg.get_attr("IFLA_LINKINFO")
        out[msg.get_attr("IFLA_IFNAME")] = {
            "index": msg["index"],
            "kind": info.get_attr("IFLA_INFO_KIND") if info else None,
            "up": bool(msg["flags"] & IFF_UP),
            "master": msg.get_attr("IFLA_MASTER"),
            "mac": msg.get_attr("IFLA_ADDRESS"),
            "addrs": set(),
        }
    by_index = {link["index"]: link for link in out.values()}
    for msg in ipr.get_addr(family=socket.AF_INET):
        link = by_index.get(msg["index"])
        if link is not None:
            link["addrs"].add(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
    return out


_NOISE = re.compile(r"counter packets \d+ bytes \d+|# handle \d+|packets \d+ bytes \d+")


def _nft_listing(nft: Any) -> str:
    text = ""
    for table in ("inet qvm", "bridge qvm"):
        rc, out, _err = nft.cmd(f"list table {table}")
        text += _NOISE.sub("", out) if rc == 0 else f"<{table} missing>\n"
    return text


def _main_problems(ipr: Any, nft: Any) -> tuple[list[str], str]:
    have = _links(ipr)
    bad: list[str] = []
    br = have.get(BRIDGE)
    if br is None or br["kind"] != "bridge":
        bad.append("bridge missing")
    else:
        if br["mac"] != BRIDGE_MAC:
            bad.append(f"bridge MAC {br['mac']}")
        if f"{GATEWAY}/24" not in br["addrs"]:
            bad.append("bridge address")
        if not br["up"]:
            bad.append("bridge down")
    for name in (*TAPS, SVC_PORT):
        link = have.get(name)
        if link is None:
            bad.append(f"{name} missing")
            continue
        if br is None or link["master"] != br["index"]:
            bad.append(f"{name} not on the bridge")
        if not link["up"]:
            bad.append(f"{name} down")
    if br is not None and not any(
        r["dst_len"] == 24
        and r.get_attr("RTA_DST") == SUBNET
        and r.get_attr("RTA_OIF") == br["index"]
        for r in ipr.get_routes(family=socket.AF_INET, table=254)
    ):
        bad.append("no route to the lab subnet via the bridge")
    if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
        bad.append("ip_forward 0")
    return bad, _nft_listing(nft)


def _svc_problems(ipr: Any, _nft: Any) -> list[str]:
    have = _links(ipr)
    veth = have.get(SVC_IF)
    if veth is None:
        return [f"{SVC_IF} missing"]
    bad = []
    if f"{SVC_ADDR}/24" not in veth["addrs"]:
        bad.append(f"{SVC_IF} address")
    if not veth["up"]:
        bad.append(f"{SVC_IF} down")
    if not have.get("lo", {}).get("up"):
        bad.append("svc lo down")
    gateways = [
        r.get_attr("RTA_GATEWAY")
        for r in ipr.get_routes(family=socket.AF_INET, table=254)
        if r["dst_len"] == 0
    ]
    if GATEWAY not in gateways:
        bad.append("svc default route")
    return bad


@dataclass
class Lab:
    q: Qvmd
    main: Probe
    svc: Probe | None
    nft_baseline: str = ""
    guests: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return self.q.netns

    @property
    def svc_ns(self) -> str:
        return self.q.services_netns

    def problems(self) -> list[str]:
        bad, listing = self.main.call(_main_problems)
        if self.nft_baseline and listing != self.nft_baseline:
            bad.append("nft tables differ")
        if self.svc is not None and not self.svc.current():
            self.svc.close()
            self.svc = None
        if self.svc is None and netns_exists(self.svc_ns):
            with suppress(OSError):
                self.svc = Probe(self.svc_ns)
        if self.svc is None:
            bad.append("services namespace missing")
        else:
            bad += self.svc.call(_svc_problems)
        return bad

    def close(self) -> None:
        for g in self.guests:
            g.kill()
            g.wait()
        if self.svc is not None:
            self.svc.close()
            self.svc = None
        self.main.close()

    def heal_lines(self) -> int:
        return self.q.output().count("self-heal repaired")


def wait_until(check: Callable[[], list[str]], limit: float, what: str) -> float:
    """Poll `check` (problems; [] = good) every POLL s; return the seconds taken."""
    t0 = time.monotonic()
    left = check()
    while left:
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"{what}: still {left} after {limit:g} s")
        time.sleep(POLL)
        left = check()
    return time.monotonic() - t0


def start_lab(q: Qvmd, env: dict[str, str] | None = None) -> Lab:
    q.start(env=env)
    q.wait_ready()
    lab = Lab(q, Probe(q.netns), None)
    try:
        # The first events of a start (linkwatch, the nft apply) settle first.
        wait_until(lab.problems, 10, "lab up after start")
        lab.nft_baseline = lab.main.call(_main_problems)[1]
        assert "<" not in lab.nft_baseline, lab.nft_baseline
    except BaseException:
        lab.close()
        raise
    return lab


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with qvmd_sandbox(tmp_path) as q:
        try:
            lab = start_lab(q)
            try:
                yield lab
            finally:
                lab.close()
                print(log_excerpt(q, 200))  # shown when the test failed
        finally:
            stop_and_sweep(q)


def stop_and_sweep(q: Qvmd) -> None:
    """SIGTERM (qvmd stops its children), then kill whatever still runs with
    our state dir: after `ip netns del` of the services namespace, children
    left in the orphaned namespace are out of reach of the sandbox cleanup."""
    q.stop(signal.SIGTERM)
    for pids in _procs_with(str(q.state_dir)).values():
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def settle(lab: Lab, quiet: float = 1.2, limit: float = 10) -> None:
    """Wait until the daemon's log stops growing: the kernel reports carrier
    changes of the start-up up to ~1 s late, and each wakes the healer (which
    would repair an undetectable fault by luck)."""
    size, since, t0 = len(lab.q.output()), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() - t0 < limit, "qvmd never went quiet"
        time.sleep(0.05)
        now = len(lab.q.output())
        if now != size:
            size, since = now, time.monotonic()


def log_excerpt(q: Qvmd, lines: int = 60) -> str:
    """The daemon's log without nfs-ganesha's start-up chatter."""
    keep = [
        line
        for line in q.output().splitlines()
        if " INFO qvmd.child.ganesha: " not in line
        and not re.search(r"dnsmasq(-dhcp)?\[\d+\]: (read|using) ", line)
    ]
    return "\n".join(keep[-lines:])


def ip(ns: str, *args: str) -> None:
    run(["ip", "-n", ns, *args])


def nft(ns: str, *args: str) -> str:
    return nsrun(ns, "nft", *args).stdout


def dig(ns: str, name: str = "cp.qvm0.lan", port: int = 53) -> str:
    res = nsrun(
        ns,
        "dig",
        "+short",
        "+time=1",
        "+tries=1",
        "-p",
        str(port),
        f"@{SVC_ADDR}",
        name,
        check=False,
        timeout=10,
    )
    return res.stdout.strip()


def dns_problems(lab: Lab, port: int = 53) -> list[str]:
    got = dig(lab.ns, port=port)
    return [] if got == CP_IP else [f"dig :{port} answered {got!r}"]


def inject(lab: Lab, fault: str, action: Callable[[], object], limit: float = 10) -> float:
    """Apply a fault, wait for the whole lab to be as before; return the time.

    The clock starts before the tool runs (an upper bound by the tool's few ms).
    """
    assert lab.problems() == []
    heals = lab.heal_lines()
    t0 = time.monotonic()
    action()
    try:
        wait_until(lab.problems, limit, f"{fault} not repaired")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- qvmd log ---\n{log_excerpt(lab.q)}") from None
    elapsed = time.monotonic() - t0
    record(fault, "lab repaired", elapsed)
    # The log line follows the repair by a few ms (the firewall check runs first).
    wait_until(lambda: [] if lab.heal_lines() > heals else ["no repair logged"], 3, fault)
    return elapsed


# -- each fault, repaired without a restart ---------------------------------


def _del_first_rule(ns: str) -> Callable[[], None]:
    def action() -> None:
        listing = json.loads(nft(ns, "-j", "-a", "list", "chain", "inet", "qvm", "forward"))
        handle = next(o["rule"]["handle"] for o in listing["nftables"] if "rule" in o)
        nft(ns, "delete", "rule", "inet", "qvm", "forward", "handle", str(handle))

    return action


LINK_FAULTS: dict[str, Callable[[Lab], Callable[[], object]]] = {
    "bridge deleted": lambda lab: lambda: ip(lab.ns, "link", "del", BRIDGE),
    "bridge set down": lambda lab: lambda: ip(lab.ns, "link", "set", BRIDGE, "down"),
    "TAP deleted": lambda lab: lambda: ip(lab.ns, "link", "del", "qvm0tap1"),
    "TAP nomaster": lambda lab: lambda: ip(lab.ns, "link", "set", "qvm0tap1", "nomaster"),
    "TAP set down": lambda lab: lambda: ip(lab.ns, "link", "set", "qvm0tap1", "down"),
    "bridge address removed": lambda lab: (
        lambda: ip(lab.ns, "addr", "del", f"{GATEWAY}/24", "dev", BRIDGE)
    ),
    "bridge MAC changed": lambda lab: (
        lambda: ip(lab.ns, "link", "set", BRIDGE, "address", "02:00:00:00:00:01")
    ),
    "veth0 address removed": lambda lab: (
        lambda: ip(lab.svc_ns, "addr", "del", f"{SVC_ADDR}/24", "dev", SVC_IF)
    ),
    "veth0 set down": lambda lab: lambda: ip(lab.svc_ns, "link", "set", SVC_IF, "down"),
    "svc default route deleted": lambda lab: lambda: ip(lab.svc_ns, "route", "del", "default"),
    "services veth pair deleted": lambda lab: lambda: ip(lab.ns, "link", "del", SVC_PORT),
    "nft table inet qvm deleted": lambda lab: lambda: nft(lab.ns, "delete", "table", "inet", "qvm"),
    "nft table bridge qvm deleted": lambda lab: (
        lambda: nft(lab.ns, "delete", "table", "bridge", "qvm")
    ),
    "nft rule deleted": lambda lab: _del_first_rule(lab.ns),
    "nft table flushed": lambda lab: lambda: nft(lab.ns, "flush", "table", "inet", "qvm"),
    "nft flush ruleset": lambda lab: lambda: nft(lab.ns, "flush", "ruleset"),
}
# Faults after which the services must answer again, not only the links.
# (No DNS query before the fault: the host has no ARP entry for 10.42.0.2;
# with one, see test_services_veth_recreated_dns_answers_again.)
TOUCH_SERVICES = {"veth0 address removed", "veth0 set down", "services veth pair deleted"}


@pytest.mark.parametrize("fault", list(LINK_FAULTS), ids=lambda f: f.replace(" ", "-"))
def test_fault_is_repaired_without_restart(lab: Lab, fault: str) -> None:
    pid = lab.q.proc.pid if lab.q.proc else None
    elapsed = inject(lab, fault, LINK_FAULTS[fault](lab))
    assert elapsed < BOUND, f"{fault}: repaired in {elapsed:.3f} s"
    if fault in TOUCH_SERVICES:
        t0 = time.monotonic()
        wait_until(lambda: dns_problems(lab), 5, f"DNS after {fault}")
        record(fault, "+ then DNS answering", time.monotonic() - t0)
    assert lab.q.proc is not None and lab.q.proc.pid == pid and lab.q.proc.poll() is None
    # Idle again: a later check finds nothing to do.
    time.sleep(0.3)
    assert lab.problems() == []


def test_dhcp_answers_after_the_services_veth_is_recreated(lab: Lab) -> None:
    with netns_guest(lab.ns, "gst1", "52:54:0a:2a:00:0c", None) as g:
        assert "obtained" in udhcpc(g), "DHCP did not work before the fault"
        inject(
            lab, "services veth pair deleted (DHCP)", LINK_FAULTS["services veth pair deleted"](lab)
        )
        t0 = time.monotonic()
        wait_until(lambda: [] if "obtained" in udhcpc(g) else ["no lease"], 8, "DHCP again")
        record("services veth pair deleted", "+ then DHCP answering", time.monotonic() - t0)


def udhcpc(ns: str) -> str:
    res = nsrun(
        ns,
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-f",
        "-t",
        "2",
        "-T",
        "1",
        "-s",
        "/bin/true",
        check=False,
        timeout=20,
    )
    return res.stdout + res.stderr


def test_ip_forward_turned_off_is_repaired(lab: Lab) -> None:
    settle(lab)

    def fault() -> None:
        nsrun(lab.ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")

    elapsed = inject(lab, "ip_forward set to 0", fault, limit=5)
    assert elapsed < BOUND


def test_bridge_subnet_route_deleted_is_repaired(lab: Lab) -> None:
    settle(lab)
    elapsed = inject(
        lab,
        "lab subnet route deleted",
        lambda: ip(lab.ns, "route", "del", f"{SUBNET}/24", "dev", BRIDGE),
        limit=5,
    )
    assert elapsed < BOUND


def _delete_services_namespace(lab: Lab) -> float:
    assert dns_problems(lab) == []  # also puts 10.42.0.2 in the host's ARP cache
    # Our probe must not keep the old namespace alive.
    assert lab.svc is not None
    lab.svc.close()
    lab.svc = None
    t0 = time.monotonic()
    run(["ip", "netns", "del", lab.svc_ns])
    return t0


def test_services_namespace_deleted_is_noticed(lab: Lab) -> None:
    settle(lab)
    t0 = _delete_services_namespace(lab)
    fault = "services namespace deleted"
    wait_until(lambda: [] if netns_exists(lab.svc_ns) else ["no namespace"], 3, fault)
    record(fault, "namespace back", time.monotonic() - t0)


def test_services_namespace_deleted_dns_answers_again(lab: Lab) -> None:
    fault = "services namespace deleted"
    t0 = _delete_services_namespace(lab)
    time.sleep(0.5)
    # qvmd does not notice by itself (previous test): wake it with another fault.
    ip(lab.ns, "link", "set", "qvm0tap1", "down")
    try:
        wait_until(lab.problems, 10, fault)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- qvmd log ---\n{log_excerpt(lab.q)}") from None
    record(fault + " (+ woken)", "lab repaired", time.monotonic() - t0)
    t1 = time.monotonic()
    wait_until(lambda: dns_problems(lab), BOUND, f"DNS after {fault}")
    record(fault + " (+ woken)", "+ then DNS answering", time.monotonic() - t1)


def test_services_veth_recreated_dns_answers_again(lab: Lab) -> None:
    assert dns_problems(lab) == []  # the host has 10.42.0.2 in its ARP cache
    fault = "services veth pair deleted"
    inject(lab, fault + " (ARP cached)", LINK_FAULTS[fault](lab))
    t1 = time.monotonic()
    wait_until(lambda: dns_problems(lab), BOUND, f"DNS after {fault}")
    record(fault + " (ARP cached)", "+ then DNS answering", time.monotonic() - t1)


def dnsmasq_pids(lab: Lab) -> list[int]:
    out = run(["ip", "netns", "pids", lab.svc_ns], check=False).stdout.split()
    pids = []
    for pid in out:
        with suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq":
                pids.append(int(pid))
    return pids


def test_dnsmasq_killed_answers_again_within_2s(lab: Lab) -> None:
    wait_until(lambda: dns_problems(lab), 5, "DNS before")
    (pid,) = dnsmasq_pids(lab)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: [] if dnsmasq_pids(lab) not in ([], [pid]) else ["old"], 5, "new dnsmasq")
    wait_until(lambda: dns_problems(lab), 5, "DNS after kill -9")
    elapsed = time.monotonic() - t0
    record("dnsmasq SIGKILL", "answering again", elapsed)
    assert elapsed < BOUND


def test_dns_redirect_table_deleted_is_repaired(lab: Lab) -> None:
    wait_until(lambda: dns_problems(lab, 5300), 5, "DNS on 5300 before")
    t0 = time.monotonic()
    nft(lab.svc_ns, "delete", "table", "inet", "qvm_dns")
    wait_until(lambda: dns_problems(lab, 5300), 5, "DNS on 5300 after the redirect was deleted")
    record("DNS redirect table deleted", "answering on 5300", time.monotonic() - t0)


def test_ganesha_killed_is_restarted(lab: Lab) -> None:
    def ganesha() -> list[int]:
        out = run(["ip", "netns", "pids", lab.svc_ns], check=False).stdout.split()
        return [int(p) for p in out if _comm(int(p)) == "ganesha.nfsd"]

    with suppress(AssertionError):
        wait_until(lambda: [] if ganesha() else ["none"], 5, "ganesha running")
    pids = ganesha()
    if not pids:
        pytest.skip("nfs-ganesha is not running in this lab")
    wait_until(lambda: nfs_problems(lab), 5, "NFS before")
    t0 = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: [] if ganesha() not in ([], pids) else ["old"], 5, "a new ganesha")
    record("ganesha SIGKILL", "running again", time.monotonic() - t0)
    wait_until(lambda: nfs_problems(lab), 5, "NFS after kill -9")
    elapsed = time.monotonic() - t0
    record("ganesha SIGKILL", "accepting on :2049 again", elapsed)
    assert elapsed < BOUND


def nfs_problems(lab: Lab) -> list[str]:
    """A TCP connect to the services address :2049, from the sandbox."""

    def connect(_ipr: Any, _nft: Any) -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect((SVC_ADDR, 2049))
            except OSError as exc:
                return str(exc)
        return ""

    err = lab.main.call(connect)
    return [f"NFS :2049 {err}"] if err else []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# -- guests and ping loss -----------------------------------------------------


@contextmanager
def netns_guest(lab_ns: str, port: str, mac: str, ip_addr: str | None) -> Iterator[str]:
    """A guest as a namespace: veth `port` (not a lab TAP name) on the bridge."""
    with netns("g") as g:
        ip(
            lab_ns,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            mac,
            "netns",
            g,
        )
        try:
            ip(lab_ns, "link", "set", port, "master", BRIDGE, "up")
            ip(g, "link", "set", "eth0", "up")
            if ip_addr is not None:
                ip(g, "addr", "add", f"{ip_addr}/24", "dev", "eth0")
                ip(g, "route", "add", "default", "via", GATEWAY)
            wait_forwarding(lab_ns, port)
            yield g
        finally:
            run(["ip", "-n", lab_ns, "link", "del", port], check=False)


def wait_forwarding(ns: str, port: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = nsrun(ns, "bridge", "-j", "link", "show", "dev", port).stdout
        if json.loads(out)[0].get("state") == "forwarding":
            return
        time.sleep(0.02)
    raise AssertionError(f"bridge port {port} never reached forwarding")


def tap_guest(lab: Lab, tap: str = "qvm0tap0", mac: str = CP_MAC, ip_addr: str = CP_IP) -> None:
    """A QEMU-like process holding `tap`, answering ARP and ping as the guest."""
    proc = subprocess.Popen(
        [sys.executable, FAULT_GUEST, lab.ns, tap, "0", mac, ip_addr],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lab.guests.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "attached"
    wait_forwarding(lab.ns, tap)


class Ping:
    """`ping -i 0.01 -c N -W 1` in a namespace; counts sent and received."""

    def __init__(self, ns: str, target: str, seconds: float) -> None:
        self.what = f"{ns} -> {target}"
        self.count = int(seconds / 0.01)
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "ping",
                "-n",
                "-q",
                "-i",
                "0.01",
                "-c",
                str(self.count),
                "-W",
                "1",
                target,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def result(self) -> tuple[int, int, str]:
        out, _ = self.proc.communicate(timeout=60)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        return int(m.group(1)), int(m.group(2)), out


def test_bridge_deleted_ping_loss_is_bounded(lab: Lab) -> None:
    tap_guest(lab)
    nsrun(lab.ns, "ping", "-c1", "-W2", CP_IP)
    pings = Ping(lab.ns, CP_IP, 4)
    time.sleep(1)
    inject(lab, "bridge deleted (TAP guest pinged)", LINK_FAULTS["bridge deleted"](lab))
    sent, got, out = pings.result()
    lost = sent - got
    record("bridge deleted", f"ping loss {lost}/{sent} pkts =", lost * 0.01)
    # The TAP guest's fd survived: the re-enslaved TAP carries on.
    assert got > 0 and lab.guests[0].poll() is None, out
    assert lost * 0.01 < BOUND, out
    nsrun(lab.ns, "ping", "-c1", "-W2", CP_IP)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_loses_no_packet(lab: Lab, sig: int) -> None:
    tap_guest(lab)
    with netns_guest(lab.ns, "gst0", WK1_MAC, WK1_IP) as g:
        nsrun(g, "ping", "-c1", "-W2", GATEWAY)
        nsrun(g, "ping", "-c1", "-W2", CP_IP)
        pings = [Ping(lab.ns, CP_IP, 4), Ping(g, GATEWAY, 4), Ping(g, CP_IP, 4)]
        time.sleep(0.8)
        t0 = time.monotonic()
        lab.q.stop(sig)
        lab.q.start()
        lab.q.wait_ready()
        record(
            f"restart ({signal.Signals(sig).name})", "stop+start to READY", time.monotonic() - t0
        )
        results = [(p.what, *p.result()) for p in pings]
    for what, sent, got, out in results:
        print(f"[selfheal] restart {signal.Signals(sig).name}: {what}: {got}/{sent} received")
        assert sent == got, f"{what} lost {sent - got} across the restart:\n{out}"
    assert lab.problems() == []


# -- not a loop -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_after_a_repair(lab: Lab) -> None:
    assert lab.q.proc is not None
    pid = lab.q.proc.pid
    inject(lab, "bridge deleted (idle check)", LINK_FAULTS["bridge deleted"](lab))
    time.sleep(1.0)  # linkwatch reports carrier changes up to ~1 s late
    size = len(lab.q.output())
    cpu0 = cpu_seconds(pid)
    time.sleep(2.0)
    used = cpu_seconds(pid) - cpu0
    print(f"\n[selfheal] idle after a repair: {used * 1000:.0f} ms CPU in 2 s")
    assert used < 0.1, f"qvmd used {used:.2f} s of CPU while nothing happened"
    assert len(lab.q.output()) == size, f"qvmd kept logging:\n{lab.q.output()[size:]}"


def test_actor_deleting_the_bridge_in_a_loop(lab: Lab) -> None:
    assert lab.q.proc is not None
    pid = lab.q.proc.pid
    stop = threading.Event()
    deleted = [0]

    def actor(ipr: Any, _nft: Any) -> None:
        while not stop.is_set():
            idx = ipr.link_lookup(ifname=BRIDGE)
            if idx:
                with suppress(Exception):
                    ipr.link("del", index=idx[0])
                    deleted[0] += 1
            time.sleep(0.001)

    actor_probe = Probe(lab.ns)
    try:
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        job = threading.Thread(target=actor_probe.call, args=(actor, 30))
        job.start()
        time.sleep(10)
        stop.set()
        job.join(timeout=10)
        wall = time.monotonic() - t0
        share = (cpu_seconds(pid) - cpu0) / wall
    finally:
        actor_probe.close()
    t1 = time.monotonic()
    try:
        wait_until(lab.problems, 15, "lab after the actor stopped")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{log_excerpt(lab.q)}") from None
    recovery = time.monotonic() - t1
    print(
        f"\n[selfheal] bridge-delete actor: {deleted[0]} deletions in {wall:.1f} s, "
        f"qvmd CPU {share * 100:.1f} % of one core, recovered {recovery:.2f} s after"
    )
    record("bridge delete loop (10 s)", "recovered after actor", recovery)
    assert share < 0.6, f"qvmd used {share * 100:.0f} % of a core"
    assert recovery < 8
    assert UNDO_LINE in lab.q.output()
    assert lab.q.proc is not None and lab.q.proc.poll() is None


# -- D-Bus: Healed signal, status counters -----------------------------------


class SignalCollector:
    """A dbus-fast client in its own thread collecting org.qvm.Net signals."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.signals: list[tuple[str, list[Any]]] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "signal collector did not connect"

    async def _main(self) -> None:
        from dbus_fast import BusType, Message, MessageType
        from dbus_fast.aio import MessageBus

        bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()

        def on_message(msg: Message) -> None:
            if msg.message_type is MessageType.SIGNAL and msg.interface == "org.qvm.Net":
                self.signals.append((msg.member or "", list(msg.body)))

        bus.add_message_handler(on_message)
        await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=["type='signal',interface='org.qvm.Net'"],
            )
        )
        self._ready.set()
        await self._stop.wait()
        bus.disconnect()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)


@contextmanager
def bus_lab(tmp_path: Path, system_bus: str) -> Iterator[Lab]:
    with qvmd_sandbox(tmp_path, bus=system_bus) as q:
        try:
            lab = start_lab(q, env=busenv.clean_env(system_bus))
            try:
                yield lab
            finally:
                lab.close()
                print(log_excerpt(q, 200))
        finally:
            stop_and_sweep(q)


def qvmctl(bus: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qvmd.cli", "--bus", bus, *args],
        env=busenv.clean_env(bus),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healed_signal_and_status_counters(
    tmp_path: Path, system_bus: str, polkitd_running: busenv.Polkitd
) -> None:
    with bus_lab(tmp_path, system_bus) as lab:
        sigs = SignalCollector(system_bus)
        try:
            inject(lab, "TAP deleted (bus)", LINK_FAULTS["TAP deleted"](lab))
            inject(lab, "bridge address removed (bus)", LINK_FAULTS["bridge address removed"](lab))
            deadline = time.monotonic() + 3
            while (
                time.monotonic() < deadline
                and len([s for s in sigs.signals if s[0] == "Healed"]) < 2
            ):
                time.sleep(0.02)
        finally:
            sigs.close()
        healed = [body for member, body in sigs.signals if member == "Healed"]
        print(f"\n[selfheal] Healed signals: {healed}")
        details = " | ".join(str(b) for b in healed)
        assert any("qvm0tap1" in str(b) for b in healed), details
        assert any(GATEWAY in str(b) for b in healed), details
        status = qvmctl(system_bus, "status")
        assert status.returncode == 0, status.stderr
        print(status.stdout)
        m = re.search(r"self-heal: (\d+) passes, (\d+) repairs, (\d+) errors", status.stdout)
        assert m, status.stdout
        assert int(m.group(2)) >= 2 and int(m.group(3)) == 0
        assert "qvm0tap1" in status.stdout  # the last repairs are listed


def test_held_tap_deleted_is_recreated_for_a_new_qemu(lab: Lab) -> None:
    tap_guest(lab, "qvm0tap1", WK1_MAC, WK1_IP)
    nsrun(lab.ns, "ping", "-c1", "-W2", WK1_IP)
    inject(lab, "held TAP deleted (new QEMU)", LINK_FAULTS["TAP deleted"](lab))
    old = lab.guests.pop()
    old.kill()  # its fd is dead; a restarted QEMU opens the recreated TAP
    old.wait()
    t0 = time.monotonic()
    tap_guest(lab, "qvm0tap1", WK1_MAC, WK1_IP)
    nsrun(lab.ns, "ping", "-c1", "-W2", WK1_IP)
    record("held TAP deleted", "+ new QEMU attached, pinged", time.monotonic() - t0)


def test_held_tap_deleted_is_recreated_and_reported(lab: Lab) -> None:
    tap_guest(lab, "qvm0tap1", WK1_MAC, WK1_IP)
    nsrun(lab.ns, "ping", "-c1", "-W2", WK1_IP)
    before = len(lab.q.output())
    inject(lab, "held TAP deleted", LINK_FAULTS["TAP deleted"](lab))
    said = lab.q.output()[before:]
    print(said)
    assert re.search(r"(?i)qemu|in use|was held|restart", said), said


# -- crash consistency ---------------------------------------------------------


class Storm:
    """CreateTap/DeleteTap/AddForward/RemoveForward/IssueCertificate as fast
    as qvmd answers, from one bus connection in a thread (as root: admin)."""

    def __init__(self, address: str, seed: int) -> None:
        self.address = address
        self.rnd = random.Random(seed)
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()

    def _next(self) -> tuple[str, str, list[Any]]:
        from dbus_fast import Variant

        r = self.rnd
        n = r.randrange(3, 9)
        ops: list[tuple[str, str, list[Any]]] = [
            ("CreateTap", "sa{sv}", [f"qvm0tap{n}", {}]),
            ("CreateTap", "sa{sv}", [f"qvm0tap{n}", {}]),
            ("DeleteTap", "s", [f"qvm0tap{n}"]),
            ("AddForward", "sqsq", ["tcp", 20000 + n, "cp", 80]),
            ("RemoveForward", "sq", ["tcp", 20000 + n]),
            (
                "IssueCertificate",
                "sa{sv}",
                [r.choice(["cp", "wk-1"]), {"force": Variant("b", True)}],
            ),
        ]
        return r.choice(ops)

    async def _main(self) -> None:
        from dbus_fast import BusType, Message, MessageType
        from dbus_fast.aio import MessageBus

        bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()
        try:
            while not self._stop.is_set():
                member, sig, body = self._next()
                msg = Message(
                    destination="org.qvm.Net",
                    path="/org/qvm/Net",
                    interface="org.qvm.Net",
                    member=member,
                    signature=sig,
                    body=body,
                )
                try:
                    reply = await asyncio.wait_for(bus.call(msg), 3)
                except Exception:
                    reply = None
                if reply is not None and reply.message_type is not MessageType.ERROR:
                    self.ok += 1
                else:
                    self.failed += 1
                    await asyncio.sleep(0.005)
        finally:
            bus.disconnect()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _procs_with(marker: str) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and b"qvmd.daemon" not in cmdline:
            found.setdefault(_comm(int(entry)), []).append(int(entry))
    return found


def check_converged(q: Qvmd) -> list[str]:
    """Everything a restart must leave: [] when all is well."""
    bad: list[str] = []
    state = json.loads((q.state_dir / "state.json").read_text())
    recorded = set(state.get("taps", {}))
    forwards = q.state_dir / "forwards.json"
    if forwards.exists():
        json.loads(forwards.read_text())
    have = json.loads(nsrun(q.netns, "ip", "-j", "link", "show").stdout)
    names = {link["ifname"] for link in have}
    want_taps = set(TAPS) | recorded
    taps = {n for n in names if n.startswith("qvm0tap")}
    if taps - want_taps:
        bad.append(f"leaked TAPs {sorted(taps - want_taps)}")
    if want_taps - taps:
        bad.append(f"missing TAPs {sorted(want_taps - taps)}")
    others = names - taps - {"lo", BRIDGE, SVC_PORT}
    if others:
        bad.append(f"unexpected links {sorted(others)}")
    svc = {
        link["ifname"]
        for link in json.loads(nsrun(q.services_netns, "ip", "-j", "link", "show").stdout)
    }
    if svc != {"lo", SVC_IF}:
        bad.append(f"services namespace links {sorted(svc)}")
    procs = _procs_with(str(q.state_dir))
    for comm, pids in procs.items():
        if len(pids) > 1:
            bad.append(f"{len(pids)} {comm} processes")
    ours = sorted(n for n in os.listdir("/run/netns") if n.startswith(q.netns))
    if ours != sorted([q.netns, q.services_netns]):
        bad.append(f"namespaces {ours}")
    return bad


# The daemon leaves an unrecorded TAP behind when killed between making a
# TAP and saving its claim (CreateTap) or between dropping the claim and
# deleting the TAP (DeleteTap). The random test counts and reports those; the
# deterministic test_unrecorded_idle_lab_tap_is_cleaned_at_start asserts the
# fix. Set this to False once that test passes.
TOLERATE_TAP_LEAK = False


def test_kill_9_at_random_points_converges(
    tmp_path: Path, system_bus: str, polkitd_running: busenv.Polkitd
) -> None:
    seed = int(os.environ.get("QVT_SEED", str(random.randrange(1 << 30))))
    points = int(os.environ.get("QVT_KILL_POINTS", str(KILL_POINTS)))
    print(f"\n[selfheal] crash points: seed {seed} (QVT_SEED={seed} to replay)")
    rnd = random.Random(seed)
    env = busenv.clean_env(system_bus)
    leaks: dict[int, list[str]] = {}
    with qvmd_sandbox(tmp_path, bus=system_bus) as q:
        q.start(env=env)
        q.wait_ready()
        calls = 0
        ready_times = []
        try:
            for point in range(points):
                storm = Storm(system_bus, rnd.randrange(1 << 30))
                time.sleep(rnd.uniform(0.02, 0.6))
                q.stop(signal.SIGKILL)
                storm.stop()
                calls += storm.ok
                t0 = time.monotonic()
                q.start(env=env)
                try:
                    q.wait_ready(timeout=30)
                except AssertionError as exc:
                    raise AssertionError(f"kill point {point}: {exc}") from None
                ready_times.append(time.monotonic() - t0)
                bad = check_converged(q)
                if TOLERATE_TAP_LEAK:
                    leaked = [b for b in bad if b.startswith("leaked TAPs")]
                    bad = [b for b in bad if not b.startswith("leaked TAPs")]
                    if leaked:
                        leaks[point] = leaked
                assert not bad, f"kill point {point} (seed {seed}): {bad}\n{log_excerpt(q)}"
        finally:
            stale = sorted(p.name for p in q.state_dir.rglob(".*.tmp-*"))
            print(
                f"[selfheal] {len(ready_times)}/{points} kill -9 points, {calls} successful "
                f"calls; restart to READY max {max(ready_times, default=0):.2f} s; "
                f"stale temp files: {stale}; leaked TAPs (point: what): {leaks}"
            )
            stop_and_sweep(q)
        assert calls > points, "the storm hardly ran"


def test_unrecorded_idle_lab_tap_is_cleaned_at_start(tmp_path: Path) -> None:
    with qvmd_sandbox(tmp_path) as q:
        q.start()
        q.wait_ready()
        q.stop(signal.SIGKILL)
        # What CreateTap leaves when killed right after making the TAP.
        ip(q.netns, "tuntap", "add", "dev", "qvm0tap7", "mode", "tap", "user", "0")
        q.start()
        q.wait_ready()
        try:
            recorded = set(json.loads((q.state_dir / "state.json").read_text()).get("taps", {}))
            have = {
                link["ifname"] for link in json.loads(nsrun(q.netns, "ip", "-j", "link").stdout)
            }
            assert "qvm0tap7" not in have or "qvm0tap7" in recorded, (
                f"qvm0tap7 leaked: in the kernel, not in state.json {sorted(recorded)}"
            )
        finally:
            stop_and_sweep(q)


def test_start_sweeps_temp_files_of_a_killed_qvmd(tmp_path: Path) -> None:
    with qvmd_sandbox(tmp_path) as q:
        q.state_dir.mkdir(parents=True)
        stale = q.state_dir / ".state.json.tmp-999999"
        stale.write_text("{")
        q.start()
        q.wait_ready()
        try:
            assert not stale.exists()
        finally:
            stop_and_sweep(q)
