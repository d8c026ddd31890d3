"""The firewall against the real kernel: namespaces, a bridge, veth "TAPs", nftables.

Topology, all in namespaces made by the test and removed even on failure:

    cp   eth0 52:54:0a:2a:00:0a 10.42.0.10 --- qvm0tap0 -+
    wk-1 eth0 52:54:0a:2a:00:0b 10.42.0.11 --- qvm0tap1 -+- qvm0 10.42.0.1/24  [host]
    [host] up0 203.0.113.2/24 --- up1 203.0.113.1/24 [internet]

The "internet" has no route to 10.42.0.0/24 unless a test adds one, so a
guest's connection only comes back if the host masqueraded it. HTTP servers
(python http.server) answer with the peer address they saw, and curl is the
client. qvmd's apply code runs in a long-lived child process inside the host
namespace (the owner flag ties the tables to that process), driven over a
pipe with one JSON request per line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qvmd.model import default_lab
from tests.netns import netns, nsrun

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
LAB = default_lab()
CP, WK1 = LAB.guests[0], LAB.guests[1]

DRIVER = r"""
import json, sys, time
from pathlib import Path
from qvmd.firewall import doctor
from qvmd.firewall.apply import Firewall, enable_localhost_forwards
from qvmd.firewall.forwards import PortForward
from qvmd.firewall.ruleset import build_ruleset, count_rules
from qvmd.model import default_lab
from tests.test_firewall_netns import big_lab

fw = Firewall(use_owner_flag=sys.argv[1] == "owner")
def lab_of(req):
    return big_lab(req["guests"]) if req.get("guests") else default_lab()
def ruleset_of(req):
    fwd = [PortForward(*f) for f in req.get("forwards", [])]
    return build_ruleset(lab_of(req), fwd, req.get("bound"))
for line in sys.stdin:
    req = json.loads(line)
    try:
        op = req["op"]
        if op == "apply":
            rs = ruleset_of(req)
            t0 = time.perf_counter()
            fw.apply(rs)
            reply = {"seconds": time.perf_counter() - t0, "rules": count_rules(rs),
                     "owner": fw.owner_flag}
        elif op == "localnet":
            enable_localhost_forwards(lab_of(req).bridge)
            reply = {}
        elif op == "observe":
            o = fw.observe(ruleset_of(req))
            reply = {"missing": o.missing, "matches": o.matches, "owned": o.owned}
        elif op == "counters":
            reply = fw.counters()
        elif op == "remove":
            reply = {"removed": fw.remove()}
        elif op == "doctor":
            ipf = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
            found = doctor.diagnose(default_lab(), fw.list_ruleset(), ip_forward=ipf,
                                    default_route_dev=req.get("uplink"))
            reply = {"findings": [[f.severity, f.summary, f.fix] for f in found]}
        else:
            reply = {"error": "unknown op " + op}
    except Exception as e:
        reply = {"error": type(e).__name__ + ": " + str(e)}
    print(json.dumps(reply), flush=True)
"""


def big_lab(n: int) -> Any:
    """The default lab with n guests in a /16 (used by the driver and the benchmark)."""
    from dataclasses import replace
    from ipaddress import IPv4Address, IPv4Interface

    from qvmd.model import Guest, derive_mac

    base = default_lab()
    gw = IPv4Interface("10.42.0.1/16")
    guests = []
    for i in range(n):
        ip = IPv4Address(int(IPv4Address("10.42.1.0")) + i)
        guests.append(
            Guest(f"g{i}", f"g{i}.{base.domain}", ip, derive_mac(ip), f"qvm0tap{i}", base.tap_owner)
        )
    return replace(base, gateway=gw, guests=tuple(guests))


class Driver:
    """The product's apply layer, alive in the host namespace."""

    def __init__(self, ns: str, owner: bool = True) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-c", DRIVER, "owner" if owner else "no-owner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    def call(self, op: str, **kw: Any) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"driver died during {op!r} (exit {self.proc.poll()})"
        reply = json.loads(line)
        if isinstance(reply, dict) and "error" in reply:
            raise AssertionError(f"{op}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


SERVER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.client_address[0] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


@dataclass
class Topo:
    host: str
    inet: str
    guests: dict[str, str]  # guest name -> namespace
    stack: ExitStack

    def serve(self, ns: str, addr: str, port: int) -> None:
        """An HTTP server in `ns` that answers with the peer address it sees."""
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, addr, str(port)]
        )
        self.stack.callback(_stop, p)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = nsrun(ns, "ss", "-Htln", f"sport = :{port}").stdout
            if out.strip():
                return
            assert p.poll() is None, f"server on {addr}:{port} exited"
            time.sleep(0.02)
        raise AssertionError(f"server on {addr}:{port} did not start")

    def get(self, ns: str, url: str, timeout: float = 2) -> str | None:
        """Body of GET url from `ns` (the peer address the server saw), None on failure."""
        r = nsrun(ns, "curl", "-sS", "--max-time", str(timeout), url, check=False)
        return r.stdout.strip() if r.returncode == 0 else None

    def ping(self, ns: str, dest: str, *extra: str) -> bool:
        r = nsrun(ns, "ping", "-c", "1", "-W", "1", *extra, dest, check=False)
        return r.returncode == 0


def _stop(p: subprocess.Popen[Any]) -> None:
    p.terminate()
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@pytest.fixture
def topo() -> Iterator[Topo]:
    with ExitStack() as stack:
        host = stack.enter_context(netns("fwh"))
        inet = stack.enter_context(netns("fwi"))
        guests = {g.name: stack.enter_context(netns("fwg")) for g in (CP, WK1)}

        def h(*cmd: str) -> None:
            nsrun(host, *cmd)

        h("sysctl", "-qw", "net.ipv4.ip_forward=1")
        h("ip", "link", "add", LAB.bridge, "type", "bridge")
        h("ip", "addr", "add", str(LAB.gateway), "dev", LAB.bridge)
        h("ip", "link", "set", LAB.bridge, "up")
        for g in (CP, WK1):
            gns = guests[g.name]
            h("ip", "link", "add", g.tap, "type", "veth", "peer", "name", "eth0", "netns", gns)
            h("ip", "link", "set", g.tap, "master", LAB.bridge, "up")
            nsrun(gns, "ip", "link", "set", "eth0", "address", g.mac, "up")
            nsrun(gns, "ip", "addr", "add", f"{g.ip}/24", "dev", "eth0")
            nsrun(gns, "ip", "route", "add", "default", "via", str(LAB.gateway.ip))
        h("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", inet)
        h("ip", "addr", "add", "203.0.113.2/24", "dev", "up0")
        h("ip", "link", "set", "up0", "up")
        h("ip", "route", "add", "default", "via", "203.0.113.1")
        nsrun(inet, "ip", "addr", "add", "203.0.113.1/24", "dev", "up1")
        nsrun(inet, "ip", "link", "set", "up1", "up")
        t = Topo(host, inet, guests, stack)
        t.serve(inet, "203.0.113.1", 8080)
        yield t


@pytest.fixture
def driver(topo: Topo) -> Iterator[Driver]:
    d = Driver(topo.host)
    try:
        yield d
    finally:
        d.close()


CP_FWD = ["tcp", 8443, "cp", 6443, 1000]


def test_guest_reaches_internet_masqueraded_even_after_uplink_change(
    topo: Topo, driver: Driver
) -> None:
    cp = topo.guests["cp"]
    # Without our table the internet cannot answer (it has no route to the lab).
    assert topo.get(cp, "http://203.0.113.1:8080/", timeout=1) is None
    driver.call("apply")
    assert topo.get(cp, "http://203.0.113.1:8080/") == "203.0.113.2"
    assert topo.ping(cp, "203.0.113.1")
    # A new uplink address (DHCP renew, another network): nothing reconfigured.
    nsrun(topo.host, "ip", "addr", "flush", "dev", "up0")
    nsrun(topo.host, "ip", "addr", "add", "203.0.113.3/24", "dev", "up0")
    nsrun(topo.host, "ip", "route", "replace", "default", "via", "203.0.113.1")
    assert topo.get(cp, "http://203.0.113.1:8080/") == "203.0.113.3"


def test_inbound_refused_unless_forwarded(topo: Topo, driver: Driver) -> None:
    cp, wk1 = topo.guests["cp"], topo.guests["wk-1"]
    topo.serve(cp, "0.0.0.0", 6443)
    # Someone on the uplink's network routes the lab's subnet at us.
    nsrun(topo.inet, "ip", "route", "add", str(LAB.subnet), "via", "203.0.113.2")
    assert topo.get(topo.inet, f"http://{CP.ip}:6443/") == "203.0.113.1"  # open without us
    driver.call("apply")
    assert topo.get(topo.inet, f"http://{CP.ip}:6443/", timeout=1) is None
    assert topo.get(topo.inet, "http://203.0.113.2:8443/", timeout=1) is None
    assert driver.call("counters")["inet/inbound_rejected"] >= 1

    driver.call("apply", forwards=[CP_FWD])
    driver.call("localnet")
    # From the internet: the guest sees the real client.
    assert topo.get(topo.inet, "http://203.0.113.2:8443/") == "203.0.113.1"
    # Still no direct way in.
    assert topo.get(topo.inet, f"http://{CP.ip}:6443/", timeout=1) is None
    # From the host itself, on every local address, loopback included.
    assert topo.get(topo.host, "http://203.0.113.2:8443/") == "203.0.113.2"
    assert topo.get(topo.host, "http://10.42.0.1:8443/") == "10.42.0.1"
    assert topo.get(topo.host, "http://127.0.0.1:8443/") == "10.42.0.1"
    # From another guest (hairpin through the host).
    assert topo.get(wk1, "http://203.0.113.2:8443/") == "10.42.0.1"
    # From the target guest itself: works without br_netfilter only (with
    # bridge-nf-call-iptables=1 the kernel bridges a DNAT back into the same
    # bridge and skips our masquerade; see docs/firewall.md).
    nsrun(topo.host, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", check=False)
    assert topo.get(cp, "http://10.42.0.1:8443/") == "10.42.0.1"
    # Removing the forward closes it again.
    driver.call("apply")
    assert topo.get(topo.inet, "http://203.0.113.2:8443/", timeout=1) is None


def test_guests_cannot_reach_host_services_or_localhost(topo: Topo, driver: Driver) -> None:
    cp = topo.guests["cp"]
    topo.serve(topo.host, "0.0.0.0", 9000)
    assert topo.get(cp, "http://10.42.0.1:9000/") == str(CP.ip)  # open without us
    driver.call("apply")
    driver.call("localnet")
    assert topo.ping(cp, "10.42.0.1")
    assert topo.get(cp, "http://10.42.0.1:9000/", timeout=1) is None
    # route_localnet is on for the bridge: a guest aiming at the host's
    # loopback (CVE-2020-8558 style) must still be dropped.
    topo.serve(topo.host, "127.0.0.1", 9001)
    nsrun(cp, "ip", "route", "add", "127.0.0.2/32", "via", "10.42.0.1", check=False)
    nsrun(
        cp,
        "ip",
        "neigh",
        "replace",
        "10.42.0.1",
        "lladdr",
        _mac(topo.host, LAB.bridge),
        "dev",
        "eth0",
    )
    before = driver.call("counters")["inet/localnet_dropped"]
    assert topo.get(cp, "http://127.0.0.2:9001/", timeout=1) is None
    assert driver.call("counters")["inet/localnet_dropped"] > before


def _mac(ns: str, dev: str) -> str:
    return json.loads(nsrun(ns, "ip", "-j", "link", "show", dev).stdout)[0]["address"]  # type: ignore[no-any-return]


def garp(ns: str, ip: object) -> None:
    """Two unsolicited ARP announcements of `ip` from `ns`'s eth0 (taking the address)."""
    nsrun(ns, "ip", "addr", "replace", f"{ip}/32", "dev", "eth0")
    nsrun(
        ns,
        "busybox",
        "arping",
        "-U",
        "-c",
        "2",
        "-w",
        "1",
        "-I",
        "eth0",
        "-s",
        str(ip),
        str(ip),
        check=False,
    )


def _neigh_mac(ns: str, ip: object) -> str | None:
    for n in json.loads(nsrun(ns, "ip", "-j", "neigh", "show", str(ip)).stdout):
        return n.get("lladdr")  # type: ignore[no-any-return]
    return None


def test_gratuitous_arp_poisons_without_binding(topo: Topo, driver: Driver) -> None:
    """The control for the test below: the same ARP does poison an unbound port's peer."""
    driver.call("apply", bound=[])
    assert topo.ping(topo.host, str(WK1.ip))
    garp(topo.guests["cp"], WK1.ip)
    assert _neigh_mac(topo.host, WK1.ip) == CP.mac


def test_antispoofing(topo: Topo, driver: Driver) -> None:
    cp = topo.guests["cp"]
    # cp borrows wk-1's IP as a second address: with the TAP unbound nothing stops it.
    nsrun(cp, "ip", "addr", "add", f"{WK1.ip}/32", "dev", "eth0")
    driver.call("apply", bound=[])
    assert topo.ping(cp, "10.42.0.1", "-I", str(WK1.ip))

    driver.call("apply")  # every guest's TAP bound
    nsrun(topo.host, "ip", "neigh", "flush", "dev", LAB.bridge)  # forget what cp taught it
    c0 = driver.call("counters")
    assert topo.ping(cp, "10.42.0.1")  # its own traffic flows
    assert not topo.ping(cp, "10.42.0.1", "-I", str(WK1.ip))
    c1 = driver.call("counters")
    assert c1["bridge/spoofed_ip"] > c0["bridge/spoofed_ip"]

    # Gratuitous ARP claiming wk-1's address: dropped, so the host's entry
    # for wk-1 (learnt by pinging it) keeps wk-1's MAC.
    assert topo.ping(topo.host, str(WK1.ip))
    garp(cp, WK1.ip)
    c2 = driver.call("counters")
    assert c2["bridge/spoofed_arp"] >= c1["bridge/spoofed_arp"] + 2
    assert _neigh_mac(topo.host, WK1.ip) == WK1.mac

    # Another guest's MAC: nothing gets through, counted.
    nsrun(cp, "ip", "link", "set", "eth0", "address", WK1.mac)
    assert not topo.ping(cp, "10.42.0.1")
    assert driver.call("counters")["bridge/spoofed_mac"] > c2["bridge/spoofed_mac"]
    nsrun(cp, "ip", "link", "set", "eth0", "address", CP.mac)
    nsrun(cp, "ip", "neigh", "flush", "dev", "eth0")
    assert topo.ping(cp, "10.42.0.1")


def test_docker_style_drop_table_breaks_forwarding_and_doctor_names_it(
    topo: Topo, driver: Driver
) -> None:
    cp = topo.guests["cp"]
    driver.call("apply")
    assert topo.get(cp, "http://203.0.113.1:8080/") == "203.0.113.2"
    assert driver.call("doctor", uplink="up0")["findings"] == []
    nsrun(
        topo.host,
        "nft",
        "add table ip filter; add chain ip filter FORWARD "
        "{ type filter hook forward priority 0; policy drop; }; add chain ip filter DOCKER-USER",
    )
    nsrun(topo.host, "nft", "add rule ip filter FORWARD jump DOCKER-USER")
    assert topo.get(cp, "http://203.0.113.1:8080/", timeout=1) is None
    findings = driver.call("doctor", uplink="up0")["findings"]
    assert findings, "doctor found nothing"
    sev, summary, fix = findings[0]
    assert sev == "error" and "'ip filter'" in summary and "'FORWARD'" in summary, summary
    assert "Docker" in summary and "DOCKER-USER" in fix
    # The fix doctor gives, done with nft here (no iptables binary needed): works.
    nsrun(topo.host, "nft", f"add rule ip filter DOCKER-USER iifname {LAB.bridge} accept")
    nsrun(topo.host, "nft", f"add rule ip filter DOCKER-USER oifname {LAB.bridge} accept")
    assert topo.get(cp, "http://203.0.113.1:8080/") == "203.0.113.2"
    assert driver.call("doctor", uplink="up0")["findings"] == []


def test_owner_flag_atomic_replace_observe_remove(topo: Topo, driver: Driver) -> None:
    reply = driver.call("apply")
    assert reply["owner"] is True
    obs = driver.call("observe")
    assert obs == {"missing": [], "matches": True, "owned": True}
    # Same desired state twice: still matches; a different one does not.
    driver.call("apply")
    assert driver.call("observe")["matches"] is True
    assert driver.call("observe", forwards=[CP_FWD])["matches"] is False
    # Others can list but not delete or flush our tables.
    listing = nsrun(topo.host, "nft", "list", "ruleset").stdout
    assert "table inet qvm" in listing and "flags owner" in listing
    r = nsrun(topo.host, "nft", "delete", "table", "inet", "qvm", check=False)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    nsrun(topo.host, "nft", "flush", "ruleset")
    assert driver.call("observe")["matches"] is True
    # remove() deletes only ours, and tolerates absence.
    nsrun(topo.host, "nft", "add table ip other")
    assert sorted(map(tuple, driver.call("remove")["removed"])) == [
        ("bridge", "qvm"),
        ("inet", "qvm"),
    ]
    assert driver.call("remove")["removed"] == []
    assert nsrun(topo.host, "nft", "list", "tables").stdout.strip() == "table ip other"
    assert driver.call("observe")["missing"] == [["inet", "qvm"], ["bridge", "qvm"]]
    # The tables live as long as the owning process.
    driver.call("apply")
    driver.close()
    assert "qvm" not in nsrun(topo.host, "nft", "list", "tables").stdout


def test_apply_time_3_and_1000_guests() -> None:
    with netns("fwb") as ns:
        d = Driver(ns)
        try:
            small = d.call("apply")
            again = d.call("apply")
            big = d.call("apply", guests=1000)
            big_again = d.call("apply", guests=1000)
        finally:
            d.close()
    assert small["rules"] == big["rules"]
    print(
        f"\nfirewall apply: 3 guests {small['seconds'] * 1000:.1f} ms "
        f"(replace {again['seconds'] * 1000:.1f} ms), 1000 guests {big['seconds'] * 1000:.1f} ms "
        f"(replace {big_again['seconds'] * 1000:.1f} ms), {small['rules']} rules each"
    )
    assert big_again["seconds"] < 5


def test_existing_unowned_table_is_taken_over_and_a_second_owner_is_refused(topo: Topo) -> None:
    # Left by a qvmd without the owner flag, or made by hand.
    nsrun(
        topo.host,
        "nft",
        "add table inet qvm; add chain inet qvm stray; add set inet qvm s { type ipv4_addr; }",
    )
    first = Driver(topo.host)
    try:
        first.call("apply")
        assert first.call("observe") == {"missing": [], "matches": True, "owned": True}
        listing = nsrun(topo.host, "nft", "list", "table", "inet", "qvm").stdout
        assert "stray" not in listing and "set s " not in listing
        second = Driver(topo.host)
        try:
            with pytest.raises(AssertionError, match=r"Busy: .*owned by another process"):
                second.call("apply")
        finally:
            second.close()
        assert first.call("observe")["matches"] is True
    finally:
        first.close()


def test_without_owner_flag(topo: Topo) -> None:
    """What happens on kernels before 5.12: same ruleset, anyone can flush it."""
    cp = topo.guests["cp"]
    d = Driver(topo.host, owner=False)
    try:
        assert d.call("apply")["owner"] is False
        assert d.call("observe") == {"missing": [], "matches": True, "owned": False}
        assert "flags owner" not in nsrun(topo.host, "nft", "list", "ruleset").stdout
        d.call("apply", forwards=[CP_FWD])  # replace in place
        assert d.call("observe", forwards=[CP_FWD])["matches"] is True
        assert topo.get(cp, "http://203.0.113.1:8080/") == "203.0.113.2"
        nsrun(topo.host, "nft", "flush", "ruleset")
        assert d.call("observe", forwards=[CP_FWD])["missing"] == [
            ["inet", "qvm"],
            ["bridge", "qvm"],
        ]
        d.call("apply", forwards=[CP_FWD])
        assert topo.get(cp, "http://203.0.113.1:8080/") == "203.0.113.2"
    finally:
        d.close()
    # Not owned: the tables outlive the process; remove() is what cleans up.
    assert "inet qvm" in nsrun(topo.host, "nft", "list", "tables").stdout


FIREWALLD_POLICY = Path("/usr/share/dbus-1/system.d/FirewallD.conf")


class Firewalld:
    """A real firewalld in the host namespace, on a private system bus.

    Its configuration is a copy of /etc/firewalld (default zone `public`),
    so the test neither depends on nor changes the machine's.
    """

    def __init__(self, ns: str, bus: str, conf: Path) -> None:
        self.ns, self.bus, self.conf = ns, bus, conf
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        from tests import busenv

        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                "firewalld",
                "--nofork",
                "--nopid",
                "--log-target",
                "console",
                "--system-config",
                str(self.conf),
            ],
            env=busenv.clean_env(self.bus),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        busenv.wait_for_name(
            self.bus,
            "org.fedoraproject.FirewallD1",
            timeout=30,
            alive=lambda: self.proc is not None and self.proc.poll() is None,
        )

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def cmd(self, *args: str) -> str:
        from tests import busenv

        r = subprocess.run(
            ["firewall-cmd", *args],
            env=busenv.clean_env(self.bus),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return r.stdout


@pytest.fixture
def firewalld(topo: Topo, tmp_path: Path) -> Iterator[Firewalld]:
    if not (FIREWALLD_POLICY.exists() and Path("/usr/sbin/firewalld").exists()):
        pytest.skip("firewalld is not installed (apt-get install firewalld)")
    from tests import busenv

    conf = tmp_path / "firewalld"
    shutil.copytree("/etc/firewalld", conf)
    with busenv.private_system_bus(policy_files=[FIREWALLD_POLICY]) as bus:
        fw = Firewalld(topo.host, bus, conf)
        try:
            yield fw
        finally:
            fw.stop()


def test_firewalld_zone_binding_follows_reloads_and_restarts(
    topo: Topo, driver: Driver, firewalld: Firewalld
) -> None:
    import asyncio

    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus

    from qvmd.firewall.firewalld import FirewalldBinding

    cp = topo.guests["cp"]
    url = "http://203.0.113.1:8080/"
    driver.call("apply")  # our owned tables exist before firewalld starts
    assert topo.get(cp, url) == "203.0.113.2"
    firewalld.start()
    assert "public" in firewalld.cmd("--get-default-zone")
    assert topo.get(cp, url, timeout=1) is None, "firewalld should drop lab forwarding"
    zones_before = firewalld.cmd("--list-all-zones")

    async def works() -> bool:
        return await asyncio.to_thread(topo.get, cp, url, 1) == "203.0.113.2"

    async def until(pred: Any, what: str) -> None:
        deadline = time.monotonic() + 15
        while not await pred():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        bus = await MessageBus(bus_address=firewalld.bus, bus_type=BusType.SYSTEM).connect()
        try:
            b = FirewalldBinding(bus, LAB.bridge)
            await b.start()
            assert b.bound_by_us and await b.zone_of_bridge() == "trusted"
            assert await works()
            # A reload drops runtime bindings; the Reloaded signal brings ours back.
            await asyncio.to_thread(firewalld.cmd, "--reload")
            await until(works, "lab traffic not restored after firewalld --reload")
            # So does a restart (NameOwnerChanged).
            await asyncio.to_thread(firewalld.stop)
            await asyncio.to_thread(firewalld.start)

            async def rebound() -> bool:
                return b.bound_by_us and await b.zone_of_bridge() == "trusted"

            await until(rebound, "bridge not bound again after firewalld restart")
            assert await works()
            # A qvmd restart without teardown: the next one adopts the binding.
            await b.stop(unbind=False)
            assert await b.zone_of_bridge() == "trusted"
            b = FirewalldBinding(bus, LAB.bridge)
            await b.start()
            assert b.bound_by_us
            # Teardown: our binding goes, nothing else changes.
            await b.stop()
            assert await b.zone_of_bridge() == ""
            # A bridge the user put in a zone themselves is left alone.
            await asyncio.to_thread(
                firewalld.cmd, "--zone=internal", f"--add-interface={LAB.bridge}"
            )
            assert await b.bind() is False and await b.zone_of_bridge() == "internal"
            assert await b.unbind() is False
            await asyncio.to_thread(
                firewalld.cmd, "--zone=internal", f"--remove-interface={LAB.bridge}"
            )
        finally:
            bus.disconnect()

    asyncio.run(scenario())
    assert firewalld.cmd("--list-all-zones") == zones_before
    assert topo.get(cp, url, timeout=1) is None
    # Our tables survived firewalld's start, reload and restart.
    assert driver.call("observe")["matches"] is True
