"""6. Data path sanity: guest ↔ guest through qvm0, and guest → "internet"
through the masquerade, vs a direct veth pair.

Two "guests" are network namespaces plugged into the lab bridge by veth
pairs (bridge ports qvmbA/qvmbB; a TAP would need a QEMU holding it). The
"internet" is one more namespace joined to the sandbox (qvmd's host) by a
veth pair that carries the sandbox's default route; it has no route back
to the lab, so traffic only flows if qvmd's table masquerades it. The
baseline is two namespaces joined by one veth pair. iperf3 TCP,
interleaved. qvmd's own CPU time across the bridged runs shows that no
frame passes through a qvmd process: the path is the kernel's.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import ExitStack

from bench.env import Budget, LabEnv, netns_scope, nsrun, run
from bench.report import Results, Row

S6 = "6 data path"
SECONDS = 2
UPLINK = "qvmup0"
INTERNET_IP = "198.51.100.2"


def _cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


def _iperf(client_ns: str, server_ns: str, server_ip: str) -> float:
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_ip],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        out = ""
        for _ in range(50):  # until the server listens
            proc = nsrun(
                client_ns,
                "iperf3",
                "-c",
                server_ip,
                "-t",
                str(SECONDS),
                "-J",
                check=False,
                timeout=SECONDS + 30,
            )
            out = proc.stdout
            try:
                bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
            except (ValueError, KeyError):  # not listening yet: no result
                time.sleep(0.05)
                continue
            return float(bps) / 1e9
        raise RuntimeError(f"iperf3 to {server_ip} failed: {out[-500:]}")
    finally:
        try:
            server.wait(timeout=5)  # -1: it exits after one test
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def bench_datapath(lab: LabEnv, budget: Budget, results: Results) -> None:
    n = budget.n(3, 1)
    with ExitStack() as stack:
        a = stack.enter_context(netns_scope("ga"))
        b = stack.enter_context(netns_scope("gb"))
        da = stack.enter_context(netns_scope("da"))
        db = stack.enter_context(netns_scope("db"))
        # Bridged: guest ns eth0 <-> port on qvm0 in the sandbox.
        for ns, port, ip in ((a, "qvmbA", "10.42.0.50"), (b, "qvmbB", "10.42.0.51")):
            run(
                [
                    "ip",
                    "-n",
                    lab.netns,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                ]
            )
            stack.callback(run, ["ip", "-n", lab.netns, "link", "del", port], False)
            run(["ip", "-n", lab.netns, "link", "set", port, "master", "qvm0", "up"])
            nsrun(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            nsrun(ns, "ip", "link", "set", "eth0", "up")
        # Direct: one veth pair between two other namespaces.
        run(
            [
                "ip",
                "-n",
                da,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                db,
            ]
        )
        for ns, ip in ((da, "10.99.0.1"), (db, "10.99.0.2")):
            nsrun(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            nsrun(ns, "ip", "link", "set", "eth0", "up")
        # The internet: an uplink from the sandbox, its default route.
        inet = stack.enter_context(netns_scope("in"))
        run(["ip", "-n", lab.netns, "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0"])
        stack.callback(run, ["ip", "-n", lab.netns, "link", "del", UPLINK], False)
        run(["ip", "-n", lab.netns, "link", "set", "eth0", "netns", inet])
        run(["ip", "-n", lab.netns, "addr", "add", "198.51.100.1/24", "dev", UPLINK])
        run(["ip", "-n", lab.netns, "link", "set", UPLINK, "up"])
        run(["ip", "-n", lab.netns, "route", "add", "default", "via", INTERNET_IP])
        nsrun(inet, "ip", "addr", "add", f"{INTERNET_IP}/24", "dev", "eth0")
        nsrun(inet, "ip", "link", "set", "eth0", "up")
        nsrun(a, "ip", "route", "add", "default", "via", "10.42.0.1")
        bridged: list[float] = []
        direct: list[float] = []
        masq: list[float] = []
        cpu = 0.0
        pid = lab.daemon_pid()
        for _ in range(n):
            direct.append(_iperf(da, db, "10.99.0.2"))
            c0 = _cpu_ms(pid)
            bridged.append(_iperf(a, b, "10.42.0.51"))
            masq.append(_iperf(a, inet, INTERNET_IP))
            cpu += _cpu_ms(pid) - c0
    base = "iperf3 TCP over a direct veth pair"
    results.add(Row(S6, base, "Gbit/s", direct, note="baseline", short="direct veth"))
    results.add(Row(S6, "iperf3 TCP guest ↔ guest through qvm0", "Gbit/s", bridged, base))
    results.add(
        Row(
            S6,
            "iperf3 TCP guest → internet namespace (bridge, forward, masquerade)",
            "Gbit/s",
            masq,
            base,
            note="the internet has no route to the lab: only masqueraded traffic returns",
        )
    )
    results.add(
        Row(
            S6,
            f"qvmd CPU time during {2 * n * SECONDS} s of bridged and masqueraded traffic",
            "ms",
            [cpu],
            target="no userspace hop",
            check=lambda r, _b: r.median <= 100,
            note="process-wide: includes its own timers, not per-frame work",
        )
    )
