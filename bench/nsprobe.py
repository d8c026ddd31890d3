"""Measurements that must run *inside* a network namespace, in one process.

Run as `ip netns exec NS python bench/nsprobe.py COMMAND ...`; prints one
JSON line. In-namespace netlink (pyroute2 IPRoute without netns=) and
libnftables cost well under a millisecond per poll, so a repair is seen
within a couple of milliseconds of happening; spawning `ip` per poll would
not resolve that.

  heal bridge|tap|nft N GAP     break it N times, time until repaired
  heal dnsmasq N GAP SVC_NS     kill -9 dnsmasq N times, time until it answers
  nftapply GUESTS REPS          apply qvmd's ruleset for a lab of GUESTS guests
  mktaps PREFIX FIRST COUNT UID make TAPs directly (not through qvmd), on qvm0
  dnsreload GUESTS REPS         a real dnsmasq with qvmd's files for GUESTS guests:
                                add one guest, SIGHUP, time until its name answers
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from functools import partial
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

BRIDGE = "qvm0"
GATEWAY = ("10.42.0.1", 24)
BRIDGE_PORTS = ("qvm0tap0", "qvm0tap1", "qvm0tap2", "qvm0-svc")
SERVICES_IP = "10.42.0.2"
QUERY_NAME = "cp.qvm0.lan"
EXPECT_IP = "10.42.0.10"
POLL = 0.001
TIMEOUT = 10.0


def wait_until(ok: Callable[[], bool], t0: float) -> float:
    while not ok():
        if time.perf_counter() - t0 > TIMEOUT:
            raise TimeoutError("not repaired within 10 s")
        time.sleep(POLL)
    return (time.perf_counter() - t0) * 1000


def lab_links_ok(ipr: Any) -> bool:
    links = {m.get("IFLA_IFNAME"): m for m in ipr.get_links()}
    bridge = links.get(BRIDGE)
    if bridge is None or not bridge["flags"] & 1:  # IFF_UP
        return False
    for port in BRIDGE_PORTS:
        link = links.get(port)
        if link is None or link.get("IFLA_MASTER") != bridge["index"] or not link["flags"] & 1:
            return False
    return any(
        a.get("IFA_ADDRESS") == GATEWAY[0] and a["prefixlen"] == GATEWAY[1]
        for a in ipr.get_addr(index=bridge["index"])
    )


def heal_links(kind: str, n: int, gap: float) -> list[float]:
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        for _ in range(n):
            if not lab_links_ok(ipr):
                raise RuntimeError("the lab is not intact before breaking it")
            victim = BRIDGE if kind == "bridge" else random.choice(BRIDGE_PORTS[:3])
            index = ipr.link_lookup(ifname=victim)[0]
            # t0 before the delete: the outage starts when the kernel starts
            # unregistering (a TAP takes it ~16 ms), so that is counted too.
            t0 = time.perf_counter()
            ipr.link("del", index=index)
            out.append(wait_until(lambda: lab_links_ok(ipr), t0))
            time.sleep(gap)
    return out


def heal_nft(n: int, gap: float) -> list[float]:
    import nftables

    nft = nftables.Nftables()
    out = []
    for _ in range(n):
        rc, _, err = nft.cmd("list table inet qvm")
        if rc != 0:
            raise RuntimeError(f"table inet qvm missing before the test: {err}")
        t0 = time.perf_counter()
        rc, _, err = nft.cmd("delete table inet qvm")
        if rc != 0:
            raise RuntimeError(f"nft delete table inet qvm: {err}")
        out.append(wait_until(lambda: nft.cmd("list table inet qvm")[0] == 0, t0))
        time.sleep(gap)
    return out


def _dns_query(qid: int, name: str) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return header + labels + b"\x00" + struct.pack("!HH", 1, 1)


def dns_answers(timeout: float = 0.05, name: str = QUERY_NAME, want: str = EXPECT_IP) -> bool:
    qid = random.randrange(65536)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((SERVICES_IP, 53))
            s.send(_dns_query(qid, name))
            data = s.recv(4096)
        except OSError:  # refused (nothing bound yet), timeout
            return False
    rid, flags, _, ancount = struct.unpack("!HHHH", data[:8])
    return rid == qid and flags & 0xF == 0 and ancount >= 1 and data[-4:] == socket.inet_aton(want)


def dnsmasq_pid(services_ns: str) -> int:
    want = os.stat(f"/run/netns/{services_ns}").st_ino
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "dnsmasq":
                    continue
            if os.stat(f"/proc/{entry}/ns/net").st_ino == want:
                return int(entry)
        except OSError:
            continue
    raise RuntimeError(f"no dnsmasq in {services_ns}")


def heal_dnsmasq(n: int, gap: float, services_ns: str) -> list[float]:
    out = []
    for _ in range(n):
        deadline = time.perf_counter() + TIMEOUT
        while not dns_answers():
            if time.perf_counter() > deadline:
                raise RuntimeError("dnsmasq does not answer before the test")
        pid = dnsmasq_pid(services_ns)
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        out.append(wait_until(dns_answers, t0))
        time.sleep(gap)
    return out


def big_lab(guests: int) -> Any:
    from qvmd.model import Guest, default_lab, derive_mac

    lab = default_lab()
    if guests <= len(lab.guests):
        return lab
    gateway = IPv4Interface("10.42.0.1/16")
    made = []
    for i in range(guests):
        ip = IPv4Address(int(IPv4Address("10.42.0.10")) + i)
        name = f"g{i}"
        made.append(
            Guest(name, f"{name}.{lab.domain}", ip, derive_mac(ip), f"qvm0tap{i}", lab.tap_owner)
        )
    return dataclasses.replace(lab, gateway=gateway, guests=tuple(made))


def dns_reload(guests: int, reps: int) -> list[float]:
    """qvmd's way of adding a guest to a running dnsmasq (rewrite the hosts
    files, SIGHUP), timed until the new name answers, with GUESTS guests."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from qvmd.model import Guest, derive_mac
    from qvmd.services.dnsmasq import (
        DnsmasqPaths,
        build_dnsmasq_files,
        dnsmasq_argv,
        write_dnsmasq_files,
    )

    lab = big_lab(guests)
    prefix = lab.gateway.network.prefixlen
    for cmd in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "peer0"],
        ["ip", "addr", "add", f"{SERVICES_IP}/{prefix}", "dev", "veth0"],
        ["ip", "link", "set", "veth0", "up"],
        ["ip", "link", "set", "peer0", "up"],
    ):
        subprocess.run(cmd, check=True)
    top = Path(tempfile.mkdtemp(prefix="qvmb-dns-"))
    top.chmod(0o711)  # dnsmasq reads its files after dropping root
    paths = DnsmasqPaths(top / "dnsmasq")
    write_dnsmasq_files(paths, build_dnsmasq_files(lab, paths, []))
    proc = subprocess.Popen(dnsmasq_argv(paths), stderr=subprocess.DEVNULL)
    try:
        first = lab.guests[0]
        wait_until(partial(dns_answers, name=first.fqdn, want=str(first.ip)), time.perf_counter())
        out = []
        base = int(IPv4Address(lab.guests[-1].ip))
        for rep in range(reps):
            ip = IPv4Address(base + 1 + rep)
            name = f"new{rep}"
            tap = f"qvm0tap{9000 + rep}"
            new = Guest(name, f"{name}.{lab.domain}", ip, derive_mac(ip), tap, lab.tap_owner)
            lab = dataclasses.replace(lab, guests=(*lab.guests, new))
            t0 = time.perf_counter()
            write_dnsmasq_files(paths, build_dnsmasq_files(lab, paths, []))
            os.kill(proc.pid, signal.SIGHUP)
            out.append(wait_until(partial(dns_answers, name=new.fqdn, want=str(ip)), t0))
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(top, ignore_errors=True)


def nft_apply(guests: int, reps: int) -> dict[str, Any]:
    from qvmd.firewall.apply import Firewall
    from qvmd.firewall.ruleset import build_ruleset, count_rules

    lab = big_lab(guests)
    ruleset = build_ruleset(lab)
    fw = Firewall(use_owner_flag=False)  # as qvmd's FirewallService makes it
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fw.apply(ruleset)
        times.append((time.perf_counter() - t0) * 1000)
    fw.remove()
    return {"apply": times, "rules": count_rules(ruleset)}


def make_taps(prefix: str, first: int, count: int, uid: int) -> list[str]:
    """Persistent TAPs owned by uid, enslaved to qvm0 and up, made with the
    same ioctls as qvmd's, at ~1 ms each: filler for the scale levels."""
    from pyroute2 import IPRoute

    from qvmd import tuntap

    names = []
    with IPRoute() as ipr:
        bridge = ipr.link_lookup(ifname=BRIDGE)[0]
        for i in range(first, first + count):
            name = f"{prefix}{i}"
            tuntap.create_tap(name, uid, None, False)
            index = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=index, master=bridge, state="up")
            names.append(name)
    return names


def main(argv: list[str]) -> int:
    cmd = argv[0]
    result: Any
    if cmd == "heal":
        kind, n, gap = argv[1], int(argv[2]), float(argv[3])
        if kind in ("bridge", "tap"):
            result = heal_links(kind, n, gap)
        elif kind == "nft":
            result = heal_nft(n, gap)
        elif kind == "dnsmasq":
            result = heal_dnsmasq(n, gap, argv[4])
        else:
            raise SystemExit(f"unknown heal kind {kind}")
    elif cmd == "mktaps":
        result = make_taps(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    elif cmd == "dnsreload":
        result = dns_reload(int(argv[1]), int(argv[2]))
    elif cmd == "nftapply":
        result = nft_apply(int(argv[1]), int(argv[2]))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
