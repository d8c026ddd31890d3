"""The whole lab end to end: the real qvmd, three real QEMU guests started by
an unprivileged user, exactly as that user would.

- qvmd runs in a sandbox namespace on a private system bus with the real
  polkitd (tests/qvmd_proc.py, tests/busenv.py); its default lab: cp, wk-1,
  wk-2, DHCP/DNS, the NoCloud seed with the guests' certificates, the NFS
  share /lab, nftables masquerade.
- A fake internet: namespace at 203.0.113.1 serving HTTP, linked to the
  sandbox (203.0.113.2, default route) by a veth.
- The member of group qvm runs `qvmctl tap create qvm0tapN` and
  `qvmctl --json qemu-args <guest>` and starts QEMU (TCG, as that user, no
  capability) with those arguments and the tiny image (guests/tiny).

The three guests boot once, in parallel, for the whole module; each test
checks one promise of the lab. Timings are printed (run with -s); the last
test reboots cp for the steady-state figures. docs/e2e.md says what is
checked and what was measured.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import busenv
from tests.e2e.tinyguest import (
    INTERNET_ADDR,
    UPLINK_ADDR,
    Internet,
    LabGuest,
    Step,
    TinyImage,
    boot_lab_guest,
    build_tiny,
    curl_as,
    fake_internet,
    lab_append,
    lab_dns_lookup,
    lab_guests,
    log_tail,
    qvmctl_json,
    tun_open_to_users,
    watch_steps,
)
from tests.netns import nsrun, unique_name
from tests.qvmd_proc import Qvmd, qvmd_sandbox

# The first test also pays for the module's lab: image build (a cold one
# downloads ~28 MB) and the boot of three guests.
pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

# 3 guests under TCG on 2 cores, booting at once: a healthy boot is ready in
# 19-25 s (docs/e2e.md); the limits are for a loaded CI runner.
BOOT_TIMEOUT = 240.0
EXPECTED = {"cp": "10.42.0.10", "wk-1": "10.42.0.11", "wk-2": "10.42.0.12"}
FIRST_BOOT_STEPS = ("dhcp", "seed", "hostname", "certs", "https", "nfs")


@dataclass
class Lab:
    qvmd: Qvmd
    bus: str
    user: busenv.User
    image: TinyImage
    internet: Internet
    guests: list[LabGuest]
    tmp: Path
    all_ready: bool

    @property
    def sandbox(self) -> str:
        return self.qvmd.netns

    @property
    def ca(self) -> Path:
        """$QVM_DIR/ca-cert/qvm-ca.pem: the public CA qvmd exports."""
        return self.qvmd.state_dir / "ca-cert" / "qvm-ca.pem"

    def guest(self, name: str) -> LabGuest:
        return next(g for g in self.guests if g.name == name)

    def logs(self, g: LabGuest | None = None) -> str:
        parts = [
            f"--- {x.name} serial\n{log_tail(x.log_path, 30)}" for x in ([g] if g else self.guests)
        ]
        parts.append(f"--- qvmd\n{self.qvmd.output()[-4000:]}")
        return "\n".join(parts)

    def step(self, g: LabGuest, name: str, accept: tuple[str, ...] = ("ok",)) -> Step:
        s = g.steps().get(name)
        if s is None or s.status not in accept:
            pytest.fail(f"{g.name}: step {name} is {s}\n{self.logs(g)}")
        return s


def print_timings(title: str, guests: list[LabGuest]) -> None:
    names: list[str] = []
    for g in guests:
        names += [n for n in g.seen if n not in names]
    print(f"\n{title} (host seconds after QEMU start; guest uptime in brackets)")
    print(f"{'step':26}" + "".join(f"{g.name:>16}" for g in guests))
    for n in names:
        cells = []
        for g in guests:
            s = g.steps().get(n)
            t = g.seen.get(n)
            cells.append(f"{t:6.1f} [{s.guest_uptime:5.1f}]" if s and t is not None else "-")
        label = n if not n.startswith("peer-") else "peer " + n[5:].split(".")[0]
        print(f"{label:26}" + "".join(f"{c:>16}" for c in cells))


@pytest.fixture(scope="module")
def lab(
    system_bus: str, polkitd_running: busenv.Polkitd, bus_users: busenv.TestUsers
) -> Iterator[Lab]:
    t0 = time.monotonic()
    image = build_tiny()
    print(f"\nguests/tiny/build.sh: {time.monotonic() - t0:.1f}s")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qvm-e2e-")))
        q = stack.enter_context(qvmd_sandbox(tmp, bus=system_bus))
        internet = stack.enter_context(fake_internet(q.netns, unique_name("i"), tmp))
        t = time.monotonic()
        q.start(env=busenv.clean_env(system_bus))
        stack.callback(q.stop)
        q.wait_ready(60)
        print(f"qvmd READY=1 after {time.monotonic() - t:.1f}s")
        stack.enter_context(tun_open_to_users())
        user = bus_users.member
        guests = lab_guests(user, system_bus, tmp)
        assert {g.name: g.ip for g in guests} == EXPECTED
        for g in guests:
            stack.callback(g.stop)
        for g in guests:  # all three at once: each QEMU boots on its own
            boot_lab_guest(g, q.netns, user, system_bus, image, lab_append(g, guests))
        ready = watch_steps(guests, "ready", BOOT_TIMEOUT)
        print_timings("first boot, 3 guests in parallel (cold lab: first leases)", guests)
        yield Lab(q, system_bus, user, image, internet, guests, tmp, ready)


def test_every_guest_boots_to_ready(lab: Lab) -> None:
    for g in lab.guests:
        lab.step(g, "ready")
    assert lab.all_ready


def test_each_guest_gets_its_lab_ip_and_hostname(lab: Lab) -> None:
    for g in lab.guests:
        dhcp = lab.step(g, "dhcp")
        assert dhcp.field("ip") == f"{g.ip}/24", dhcp
        assert dhcp.field("host") == g.name, dhcp
        assert dhcp.field("router") == "10.42.0.1", dhcp
        assert dhcp.field("dns") == "10.42.0.2", dhcp
        assert dhcp.field("domain") == "qvm0.lan", dhcp
        seed = lab.step(g, "seed")
        assert seed.field("from") == "smbios", seed
        assert seed.field("url") == "http://10.42.0.2/nocloud/", seed
        # The real qvmd's user-data: prefer_fqdn_over_hostname is true.
        assert lab.step(g, "hostname").field("name") == g.fqdn
        assert lab.step(g, "ready").field("host") == g.fqdn


def test_qvmctl_lease_list_shows_the_three_guests(lab: Lab) -> None:
    leases = qvmctl_json(lab.user, lab.bus, "lease", "list")
    by_guest = {le["guest"]: le for le in leases if le["guest"]}
    assert {n: le["ip"] for n, le in by_guest.items()} == EXPECTED, leases
    for g in lab.guests:
        assert by_guest[g.name]["mac"] == g.mac
        assert by_guest[g.name]["hostname"] == g.name
    rows = {r["name"]: r for r in qvmctl_json(lab.user, lab.bus, "guest", "list")}
    for g in lab.guests:
        assert rows[g.name]["lease_ip"] == g.ip, rows[g.name]
        assert rows[g.name]["tap_state"] == "in use", rows[g.name]
        assert rows[g.name]["tap_owner"] == lab.user.uid, rows[g.name]
        assert rows[g.name]["cert_days_left"] > 0, rows[g.name]


def test_guests_get_their_certificates_and_serve_https(lab: Lab) -> None:
    for g in lab.guests:
        certs = lab.step(g, "certs")
        assert certs.field("files") == (
            "cert.pem:644,key.pem:600,fullchain.pem:644,qvm-ca.pem:644"
        ), certs
        # Checked inside the guest against the CA it was given, by name.
        assert lab.step(g, "https").field("verified") == g.fqdn


def test_guests_resolve_each_other_by_name_and_ping(lab: Lab) -> None:
    for g in lab.guests:
        for peer in lab.guests:
            if peer is g:
                continue
            s = lab.step(g, f"peer-{peer.fqdn}")
            assert s.field("ip") == peer.ip, s  # the lab DNS's answer


def test_the_users_curl_commands_work_with_the_lab_ca_only(lab: Lab) -> None:
    assert lab.ca.is_file(), lab.ca
    assert (lab.ca.parent / f"{_subject_hash(lab.ca)}.0").exists(), sorted(lab.ca.parent.iterdir())
    for g in lab.guests:
        addr = lab_dns_lookup(lab.sandbox, g.fqdn)
        assert addr == g.ip, f"lab DNS answered {addr} for {g.fqdn}"
        # 1. curl --cacert "$QVM_DIR/ca-cert/qvm-ca.pem" https://cp.qvm0.lan
        ok = curl_as(lab.user, lab.bus, lab.sandbox, g.fqdn, addr, cacert=lab.ca)
        assert ok.returncode == 0, f"{g.name}: {ok.stderr}\n{lab.logs(g)}"
        assert "s_server" in ok.stdout, ok.stdout[:300]
        # 2. SSL_CERT_DIR=$QVM_DIR/ca-cert curl https://cp.qvm0.lan
        ok = curl_as(
            lab.user, lab.bus, lab.sandbox, g.fqdn, addr, env={"SSL_CERT_DIR": str(lab.ca.parent)}
        )
        assert ok.returncode == 0, f"{g.name} (SSL_CERT_DIR): {ok.stderr}"
        assert "s_server" in ok.stdout, ok.stdout[:300]
        # Without the lab CA: the system's CAs do not vouch for the guest.
        bad = curl_as(lab.user, lab.bus, lab.sandbox, g.fqdn, addr)
        assert bad.returncode == 60, f"{g.name} without the CA: rc={bad.returncode} {bad.stderr}"


def _subject_hash(pem: Path) -> str:
    return subprocess.run(
        ["openssl", "x509", "-noout", "-subject_hash", "-in", str(pem)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip


def test_guests_reach_the_internet_through_masquerade(lab: Lab) -> None:
    for g in lab.guests:
        s = lab.step(g, "internet")
        assert s.field("http") == "200", s
    probes = [r for r in lab.internet.requests() if r.path == "/probe"]
    assert len(probes) >= len(lab.guests), lab.internet.requests()
    # The internet sees the sandbox's uplink address, never a lab address.
    assert {r.client for r in probes} == {UPLINK_ADDR}, probes
    # And the sandbox routes there through the uplink, not the bridge.
    route = nsrun(lab.sandbox, "ip", "route", "get", INTERNET_ADDR).stdout
    assert "dev qvmup0" in route, route


def test_guests_share_the_nfs_export(lab: Lab) -> None:
    for g in lab.guests:
        nfs = lab.step(g, "nfs")
        assert nfs.detail.startswith("10.42.0.2:/lab on /mnt vers=4."), nfs
        assert nfs.field("wrote") == f"/mnt/qvm-{g.fqdn}", nfs
        # Each guest read what the others wrote.
        peers = lab.step(g, "nfs-peers")
        others = sorted(p.fqdn for p in lab.guests if p is not g)
        assert sorted((peers.field("names") or "").split(",")) == others, peers
        read = (peers.field("read") or "").removeprefix("/mnt/qvm-")
        assert read in others and peers.field("says") == read, peers
    # On qvmd's side of the share: one file per guest, written by that guest.
    for g in lab.guests:
        found = list(lab.qvmd.state_dir.rglob(f"qvm-{g.fqdn}"))
        assert len(found) == 1, f"qvm-{g.fqdn} in {lab.qvmd.state_dir}: {found}"
        assert found[0].read_text().startswith(f"{g.fqdn} "), found[0].read_text()


def test_steady_state_reboot_and_request_timings(lab: Lab) -> None:
    """Last: reboot cp with the lab warm (lease, certificate, share exist)
    and time it; then time HTTPS requests and pings in the running lab."""
    cp = lab.guest("cp")
    cp.stop()
    cp.log_path = lab.tmp / "cp-reboot.log"
    boot_lab_guest(cp, lab.sandbox, lab.user, lab.bus, lab.image, lab_append(cp, lab.guests))
    assert watch_steps([cp], "ready", BOOT_TIMEOUT), lab.logs(cp)
    print_timings("steady state: cp rebooted, the other two running", [cp])
    for name in (*FIRST_BOOT_STEPS, "internet", "nfs-peers", "ready"):
        lab.step(cp, name)
    assert lab.step(cp, "dhcp").field("ip") == "10.42.0.10/24"

    addr = lab_dns_lookup(lab.sandbox, cp.fqdn)
    assert addr == cp.ip
    times = []
    for _ in range(5):
        t = time.monotonic()
        res = curl_as(lab.user, lab.bus, lab.sandbox, cp.fqdn, addr, cacert=lab.ca)
        times.append(time.monotonic() - t)
        assert res.returncode == 0, res.stderr
    ping = nsrun(lab.sandbox, "ping", "-c", "5", "-i", "0.2", "-q", cp.ip, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    rtt = ping.stdout.strip().splitlines()[-1]
    print(
        f"steady state: HTTPS request from the host (curl as the user, with TLS) "
        f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms; "
        f"ping host->cp {rtt}"
    )
