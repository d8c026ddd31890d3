"""dnsmasq for the lab, for real: namespaces, a bridge, DHCP and DNS clients.

Topology (all namespaces made here, removed at the end):

    guest ns (eth0, a guest's MAC) ─┐
                                    ├─ qvm0 (10.42.0.1/24)  in "host" ns ── inet0 192.0.2.1
    svc ns veth0 10.42.0.2/24 ──────┘                                          │
                                                    "internet" ns eth0 192.0.2.53 (dnsmasq
                                                    answering *.example.test and *.qvm0.lan)

Our dnsmasq runs in the services namespace under the supervisor, with the
host's upstream replaced by the internet namespace's resolver. That
resolver also answers *.qvm0.lan with 203.0.113.66, so any lab name that
leaked upstream would show up as that address.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from qvmd.model import Guest, Lab, default_lab, derive_mac
from qvmd.services.conffiles import Change
from qvmd.services.dnsmasq import (
    DnsmasqPaths,
    build_dnsmasq_files,
    dnsmasq_child,
    write_dnsmasq_files,
)
from qvmd.services.dnsredirect import apply_dns_redirect, remove_dns_redirect
from qvmd.services.leases import LeaseChange, LeaseWatcher, guest_of, read_leases
from qvmd.services.supervisor import Child, ChildState, terminate_stale
from tests.loopthread import LoopThread
from tests.netns import netns, nsrun, run

pytestmark = pytest.mark.root

UPSTREAM = IPv4Address("192.0.2.53")
OUTSIDE_ANSWER = "198.51.100.7"
LEAKED_ANSWER = "203.0.113.66"

UDHCPC_SCRIPT = """#!/bin/sh
# Print what the server handed out; configure nothing.
if [ "$1" = bound ]; then
  echo "ip=$ip"; echo "router=$router"; echo "dns=$dns"; echo "domain=$domain"
  echo "hostname=$hostname"
fi
exit 0
"""

DHCLIENT_SCRIPT = """#!/bin/sh
if [ "$reason" = BOUND ]; then
  echo "ip=$new_ip_address"; echo "router=$new_routers"
  echo "dns=$new_domain_name_servers"; echo "domain=$new_domain_name"
  echo "hostname=$new_host_name"
fi
exit 0
"""

DHCLIENT_CONF = """timeout 10;
retry 1;
request subnet-mask, routers, domain-name, domain-name-servers, host-name;
"""


@dataclass
class Env:
    host: str
    svc: str
    inet: str
    lab: Lab
    paths: DnsmasqPaths
    child: Child
    loop: LoopThread

    def dig(self, *args: str, port: int = 53) -> subprocess.CompletedProcess[str]:
        return nsrun(
            self.host,
            "dig",
            "+time=1",
            "+tries=1",
            "-p",
            str(port),
            f"@{self.lab.services.address}",
            *args,
            check=False,
        )

    def answer(self, *args: str, port: int = 53) -> list[str]:
        res = self.dig("+short", *args, port=port)
        assert res.returncode == 0, f"dig {args} on port {port} failed: {res.stdout}{res.stderr}"
        return res.stdout.split()

    def reload(self) -> bool:
        async def hup() -> bool:
            return self.child.reload()

        return self.loop.call(hup())


def start_child(loop: LoopThread, child: Child) -> None:
    async def go() -> None:
        child.start()
        await child.wait_running(10)

    loop.call(go())


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


@contextlib.contextmanager
def process(cmd: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(netns("h"))
        svc = stack.enter_context(netns("s"))
        inet = stack.enter_context(netns("i"))

        nsrun(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        nsrun(host, "ip", "link", "add", "qvm0", "type", "bridge")
        nsrun(host, "ip", "addr", "add", "10.42.0.1/24", "dev", "qvm0")
        nsrun(host, "ip", "link", "set", "qvm0", "up")
        nsrun(
            host,
            "ip",
            "link",
            "add",
            "qvm0-svc",
            "type",
            "veth",
            "peer",
            "name",
            "veth0",
            "netns",
            svc,
        )
        nsrun(host, "ip", "link", "set", "qvm0-svc", "master", "qvm0", "up")
        nsrun(svc, "ip", "addr", "add", "10.42.0.2/24", "dev", "veth0")
        nsrun(svc, "ip", "link", "set", "veth0", "up")
        nsrun(svc, "ip", "route", "add", "default", "via", "10.42.0.1")
        nsrun(
            host,
            "ip",
            "link",
            "add",
            "inet0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            inet,
        )
        nsrun(host, "ip", "addr", "add", "192.0.2.1/24", "dev", "inet0")
        nsrun(host, "ip", "link", "set", "inet0", "up")
        nsrun(inet, "ip", "addr", "add", f"{UPSTREAM}/24", "dev", "eth0")
        nsrun(inet, "ip", "link", "set", "eth0", "up")
        nsrun(inet, "ip", "route", "add", "default", "via", "192.0.2.1")

        upstream = stack.enter_context(
            process(
                [
                    "ip",
                    "netns",
                    "exec",
                    inet,
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-hosts",
                    "--no-resolv",
                    "--bind-interfaces",
                    "--interface=eth0",
                    "--except-interface=lo",
                    "--pid-file=",
                    "--log-facility=-",
                    f"--address=/example.test/{OUTSIDE_ANSWER}",
                    f"--address=/qvm0.lan/{LEAKED_ANSWER}",
                ]
            )
        )

        # dnsmasq re-reads its files after dropping root: every parent
        # directory must be traversable by its user (mkdtemp makes 0700).
        top = Path(tempfile.mkdtemp(prefix="qvt-dnsmasq-"))
        stack.callback(shutil.rmtree, top, True)
        top.chmod(0o755)
        paths = DnsmasqPaths(top / "dnsmasq")

        lab = default_lab(svc)
        assert (
            write_dnsmasq_files(paths, build_dnsmasq_files(lab, paths, [UPSTREAM]))
            is Change.RESTART
        )
        assert apply_dns_redirect(lab) is True
        assert apply_dns_redirect(lab) is False, "a second apply must change nothing"
        stack.callback(remove_dns_redirect, svc)

        # A dnsmasq left behind by a killed qvmd holds the ports: it is
        # recognised by its pid file and conf path, and ended first.
        stale = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{svc}",
                "--",
                "dnsmasq",
                "--keep-in-foreground",
                f"--conf-file={paths.conf}",
            ],
            stderr=subprocess.DEVNULL,
        )
        stack.callback(stale.wait)
        stack.callback(stale.kill)
        wait_for(
            lambda: paths.pid.exists() and paths.pid.read_text().strip() == str(stale.pid),
            5,
            "the stale dnsmasq's pid file",
        )
        assert terminate_stale(paths.pid, str(paths.conf)) == stale.pid
        assert stale.wait(5) == 0  # dnsmasq ends cleanly on SIGTERM

        loop = LoopThread()
        stack.callback(loop.close)
        child = Child(replace(dnsmasq_child(lab, paths), backoff_initial=0.1))
        start_child(loop, child)
        stack.callback(lambda: loop.call(child.stop()))

        e = Env(host, svc, inet, lab, paths, child, loop)
        # dnsmasq has no readiness signal; it serves once it answers.
        wait_for(
            lambda: e.dig("+short", "cp.qvm0.lan").stdout.strip() == "10.42.0.10",
            10,
            "our dnsmasq to answer",
        )
        wait_for(
            lambda: (
                nsrun(
                    host,
                    "dig",
                    "+short",
                    "+time=1",
                    "+tries=1",
                    f"@{UPSTREAM}",
                    "www.example.test",
                    check=False,
                ).stdout.strip()
                == OUTSIDE_ANSWER
            ),
            10,
            "the upstream dnsmasq to answer",
        )
        assert upstream.poll() is None
        yield e


@contextlib.contextmanager
def guest_ns(env: Env, mac: str) -> Iterator[str]:
    """A namespace whose eth0 carries `mac`, plugged into the bridge."""
    with netns("g") as ns:
        port = f"qvtg{os.getpid() % 10000}{next(_port_ids)}"
        nsrun(
            env.host,
            "ip",
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
            ns,
        )
        nsrun(env.host, "ip", "link", "set", port, "master", "qvm0", "up")
        nsrun(ns, "ip", "link", "set", "eth0", "up")
        try:
            yield ns
        finally:
            run(["ip", "-n", env.host, "link", "del", port], check=False)


_port_ids = iter(range(10**6))


def parse_kv(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def udhcpc(ns: str, workdir: Path, tries: int = 3) -> subprocess.CompletedProcess[str]:
    script = workdir / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    return nsrun(
        ns,
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-f",
        "-t",
        str(tries),
        "-T",
        "1",
        "-s",
        str(script),
        check=False,
        timeout=30,
    )


def dhclient(ns: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    script = workdir / "dhclient.sh"
    script.write_text(DHCLIENT_SCRIPT)
    script.chmod(0o755)
    conf = workdir / "dhclient.conf"
    conf.write_text(DHCLIENT_CONF)
    pidfile = workdir / "dhclient.pid"
    try:
        # -1: one attempt, then exit non-zero; -d: stay in the foreground is
        # not wanted (it would never exit), so it forks once bound.
        return nsrun(
            ns,
            "dhclient",
            "-1",
            "-4",
            "-sf",
            str(script),
            "-cf",
            str(conf),
            "-lf",
            str(workdir / "dhclient.leases"),
            "-pf",
            str(pidfile),
            "eth0",
            check=False,
            timeout=30,
        )
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)


def expected(env: Env, guest: Guest) -> dict[str, str]:
    return {
        "ip": str(guest.ip),
        "router": str(env.lab.gateway.ip),
        "dns": str(env.lab.services.address),
        "domain": env.lab.domain,
        "hostname": guest.name,
    }


@pytest.mark.parametrize(
    ("client", "guest_name"), [("udhcpc", "cp"), ("dhclient", "wk-1"), ("udhcpc", "wk-2")]
)
def test_guest_gets_exactly_its_lease(
    env: Env, client: str, guest_name: str, tmp_path: Path
) -> None:
    guest = env.lab.guest(guest_name)
    assert guest is not None
    seen: list[LeaseChange] = []
    watcher = LeaseWatcher(env.paths.leases, lambda changes, _: seen.extend(changes), 0.05)

    async def start_watcher() -> None:
        watcher.start()

    env.loop.call(start_watcher())
    try:
        with guest_ns(env, guest.mac) as ns:
            res = udhcpc(ns, tmp_path) if client == "udhcpc" else dhclient(ns, tmp_path)
        assert res.returncode == 0, f"{client}: no lease for {guest_name}: {res.stdout}{res.stderr}"
        got = parse_kv(res.stdout)
        assert {k: got.get(k) for k in expected(env, guest)} == expected(env, guest), res.stdout
        # The lease is in dnsmasq's file and the polling watcher reports it.
        wait_for(lambda: any(c.lease.mac == guest.mac for c in seen), 5, "a lease event")
    finally:
        env.loop.call(watcher.stop())
    mine = [c for c in seen if c.lease.mac == guest.mac]
    assert mine[-1].kind in ("added", "changed"), seen
    assert guest_of(mine[-1].lease, env.lab) == guest_name


def test_unknown_mac_gets_no_lease(
    env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qvmd.child.dnsmasq")
    mac = "52:54:00:99:99:99"
    with guest_ns(env, mac) as ns:
        res = udhcpc(ns, tmp_path, tries=2)
    assert res.returncode != 0, f"an unknown MAC was offered a lease: {res.stdout}"
    assert "ip=" not in res.stdout
    assert all(lease.mac != mac for lease in read_leases(env.paths.leases))
    # dnsmasq's own reason, streamed into our log by the supervisor.
    wait_for(
        lambda: any(f"{mac} no address available" in r.getMessage() for r in caplog.records),
        2,
        "dnsmasq's refusal in the log",
    )


def test_lab_names_answer_on_53_and_5300(env: Env) -> None:
    for port in (53, 5300):
        assert env.answer("cp.qvm0.lan", port=port) == ["10.42.0.10"], f"port {port}"
        assert env.answer("wk-1.qvm0.lan", port=port) == ["10.42.0.11"], f"port {port}"
        assert env.answer("services.qvm0.lan", port=port) == ["10.42.0.2"], f"port {port}"
        assert env.answer("+tcp", "wk-2.qvm0.lan", port=port) == ["10.42.0.12"], f"tcp {port}"


def test_reverse_lookups_answer(env: Env) -> None:
    assert env.answer("-x", "10.42.0.10") == ["cp.qvm0.lan."]
    assert env.answer("-x", "10.42.0.2") == ["services.qvm0.lan."]
    assert env.answer("-x", "10.42.0.12", port=5300) == ["wk-2.qvm0.lan."]


def test_lab_domain_is_authoritative_not_forwarded(env: Env) -> None:
    res = env.dig("nope.qvm0.lan")
    assert "status: NXDOMAIN" in res.stdout, res.stdout
    assert LEAKED_ANSWER not in res.stdout, "a lab name was forwarded upstream"
    res = env.dig("-x", "10.42.0.99")
    assert "status: NXDOMAIN" in res.stdout, res.stdout


def test_outside_names_are_forwarded_upstream(env: Env) -> None:
    assert env.answer("www.example.test") == [OUTSIDE_ANSWER]
    assert env.answer("www.example.test", port=5300) == [OUTSIDE_ANSWER]


def test_listens_only_on_the_services_interface(env: Env) -> None:
    # Inside the services namespace, loopback must not be answered on.
    res = nsrun(env.svc, "dig", "+time=1", "+tries=1", "@127.0.0.1", "cp.qvm0.lan", check=False)
    assert "10.42.0.10" not in res.stdout, "dnsmasq answers on loopback"
    ss = nsrun(env.svc, "ss", "-Hlnup").stdout + nsrun(env.svc, "ss", "-Hlntp").stdout
    # Columns: State Recv-Q Send-Q Local Peer Process. Besides 10.42.0.2,
    # dnsmasq binds veth0's IPv6 link-local address (scoped to veth0) and,
    # for DHCP, 0.0.0.0:67 bound to the device (shown as 0.0.0.0%veth0:67).
    listening = {line.split()[3] for line in ss.splitlines() if "dnsmasq" in line}
    assert "10.42.0.2:53" in listening, ss
    stray = {
        a for a in listening if not a.startswith(("10.42.0.2:", "[fe80::")) and "%veth0" not in a
    }
    assert not stray, f"dnsmasq listens beyond veth0: {stray}\n{ss}"


def test_kill_9_dnsmasq_answers_again_within_2s(env: Env) -> None:
    before = env.child.status()
    assert before.state is ChildState.RUNNING and before.pid is not None
    leases_before = read_leases(env.paths.leases)
    os.kill(before.pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: env.child.status().pid not in (None, before.pid), 2, "a new dnsmasq")
    wait_for(
        lambda: env.dig("+short", "cp.qvm0.lan").stdout.strip() == "10.42.0.10",
        2,
        "answers after kill -9",
    )
    elapsed = time.monotonic() - t0
    print(f"\ndnsmasq answered again {elapsed:.3f}s after kill -9")
    assert elapsed < 2.0
    after = env.child.status()
    assert after.restarts == before.restarts + 1
    assert after.last_exit == "killed by signal 9 (SIGKILL)"
    assert read_leases(env.paths.leases) == leases_before, "leases lost across a restart"


def test_guest_added_by_reload_keeps_the_others(env: Env, tmp_path: Path) -> None:
    cp = env.lab.guest("cp")
    assert cp is not None
    with guest_ns(env, cp.mac) as ns:
        assert udhcpc(ns, tmp_path).returncode == 0
    pid = env.child.status().pid
    ip = IPv4Address("10.42.0.13")
    new = Guest("wk-3", f"wk-3.{env.lab.domain}", ip, derive_mac(ip), "qvm0tap3", cp.owner)
    bigger = replace(env.lab, guests=(*env.lab.guests, new))
    change = write_dnsmasq_files(env.paths, build_dnsmasq_files(bigger, env.paths, [UPSTREAM]))
    assert change is Change.RELOAD, "adding a guest must not need a restart"
    assert env.reload()
    wait_for(
        lambda: env.dig("+short", "wk-3.qvm0.lan").stdout.strip() == "10.42.0.13",
        5,
        "the new guest's name",
    )
    with guest_ns(env, new.mac) as ns:
        res = udhcpc(ns, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert parse_kv(res.stdout)["ip"] == "10.42.0.13"
    assert env.child.status().pid == pid, "dnsmasq was restarted instead of reloaded"
    leases = {lease.mac: lease.ip for lease in read_leases(env.paths.leases)}
    assert leases.get(cp.mac) == cp.ip, f"cp lost its lease: {leases}"
    assert leases.get(new.mac) == ip
    # The old guests still renew to the same address.
    with guest_ns(env, cp.mac) as ns:
        assert parse_kv(udhcpc(ns, tmp_path).stdout).get("ip") == str(cp.ip)
    # Outside names still forwarded after SIGHUP re-read the servers file.
    assert env.answer("www.example.test") == [OUTSIDE_ANSWER]


def test_redirect_is_repaired_after_someone_deletes_it(env: Env) -> None:
    nsrun(env.svc, "nft", "flush", "chain", "inet", "qvm_dns", "prerouting")
    res = env.dig("+short", "cp.qvm0.lan", port=5300)
    assert "10.42.0.10" not in res.stdout, "5300 answered without the redirect?"
    assert apply_dns_redirect(env.lab) is True, "a flushed chain must be seen as different"
    assert env.answer("cp.qvm0.lan", port=5300) == ["10.42.0.10"]
    nsrun(env.svc, "nft", "delete", "table", "inet", "qvm_dns")
    assert apply_dns_redirect(env.lab) is True
    assert apply_dns_redirect(env.lab) is False
    assert env.answer("cp.qvm0.lan", port=5300) == ["10.42.0.10"]
