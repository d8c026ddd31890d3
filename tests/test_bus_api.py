"""org.qvm.Net on a private system bus with real polkitd and real users.

qvmd runs in a sandbox namespace; users are real accounts (one in group
qvm, one not) calling through busctl and qvmctl, exactly as in a toolbox.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qvmd.bus.api import build_interface
from qvmd.bus.service import introspection_xml
from qvmd.taps import MAX_TAPS_PER_UID
from tests import busenv
from tests.netns import nsrun
from tests.qvmd_proc import Qvmd, qvmd_sandbox

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
QVMCTL = [sys.executable, "-m", "qvmd.cli"]
TAP_CLIENT = str(Path(__file__).parent / "helpers" / "tap_client.py")
SHIPPED_XML = ROOT / "data" / "dbus" / "org.qvm.Net.xml"


@pytest.fixture(scope="module")
def lab(
    system_bus: str,
    polkitd_running: busenv.Polkitd,
    bus_users: busenv.TestUsers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Qvmd]:
    tmp = tmp_path_factory.mktemp("buslab")
    with qvmd_sandbox(tmp, bus=system_bus) as q:
        q.start(env=busenv.clean_env(system_bus, {"WATCHDOG_USEC": "400000"}))
        q.wait_ready()
        yield q
        print(q.output())  # shown by pytest when a test of this module failed


def qvmctl(user: busenv.User | None, bus: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*QVMCTL, *args]
    if user is None:
        return subprocess.run(
            cmd, env=busenv.clean_env(bus), capture_output=True, text=True, timeout=60
        )
    return busenv.run_as(user, cmd, bus)


def busctl(user: busenv.User | None, bus: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["busctl", f"--address={bus}", *args]
    if user is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return busenv.run_as(user, cmd, bus)


def tap_info(q: Qvmd, name: str) -> dict[str, Any] | None:
    out = nsrun(q.netns, "ip", "-d", "-j", "link", "show", check=False).stdout
    for link in json.loads(out or "[]"):
        if link["ifname"] == name:
            return dict(link)
    return None


def test_shipped_introspection_matches_the_daemon(lab: Qvmd, system_bus: str) -> None:
    out = busctl(
        None,
        system_bus,
        "call",
        "org.qvm.Net",
        "/org/qvm/Net",
        "org.freedesktop.DBus.Introspectable",
        "Introspect",
        "--json=short",
    )
    served = json.loads(out.stdout)["data"][0]
    assert served == SHIPPED_XML.read_text()


def test_shipped_introspection_is_the_generated_one() -> None:
    from qvmd.core import Core  # noqa: F401 — build_interface only needs the type

    iface = build_interface(None)  # type: ignore[arg-type]  # handlers are not called
    assert introspection_xml(iface) == SHIPPED_XML.read_text(), (
        "regenerate: python -m qvmd.bus.xml > data/dbus/org.qvm.Net.xml"
    )


def test_busctl_introspect_lists_methods(
    lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers
) -> None:
    out = busctl(
        bus_users.outsider, system_bus, "introspect", "org.qvm.Net", "/org/qvm/Net", "org.qvm.Net"
    )
    assert out.returncode == 0, out.stderr
    for name in (
        "CreateTap",
        "DeleteTap",
        "ListTaps",
        "Status",
        "Up",
        "Down",
        "Reload",
        "TapAdded",
    ):
        assert name in out.stdout


# method -> (args for busctl, allowed for member, allowed for outsider)
MATRIX: list[tuple[str, list[str], bool, bool]] = [
    ("Status", [], True, True),
    ("ListTaps", [], True, True),
    ("CreateTap", ["sa{sv}", "qvm0tap20", "0"], True, False),
    ("DeleteTap", ["s", "qvm0tap20"], True, False),
    ("Reload", [], False, False),
    ("Up", [], False, False),
    ("Down", [], False, False),
]


@pytest.mark.parametrize("who", ["root", "member", "outsider"])
def test_policy_matrix(lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers, who: str) -> None:
    user = {"root": None, "member": bus_users.member, "outsider": bus_users.outsider}[who]
    for method, args, member_ok, outsider_ok in MATRIX:
        if who == "root" and method == "Down":
            continue  # exercised in test_down_and_up
        allowed = who == "root" or (member_ok if who == "member" else outsider_ok)
        out = busctl(
            user, system_bus, "call", "org.qvm.Net", "/org/qvm/Net", "org.qvm.Net", method, *args
        )
        if allowed:
            assert out.returncode == 0, f"{who} {method}: {out.stderr}"
        else:
            assert out.returncode != 0, f"{who} {method} should be refused"
            assert "not authorized for org.qvm.Net." in out.stderr, f"{who} {method}: {out.stderr}"


def test_member_gets_a_tap_their_qemu_can_open(
    lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers
) -> None:
    member, outsider = bus_users.member, bus_users.outsider
    out = qvmctl(member, system_bus, "tap", "create", "qvm0tap1")
    assert out.returncode == 0, out.stderr
    assert "qvm0tap1" in out.stdout and "ifname=qvm0tap1,script=no,downscript=no" in out.stdout
    info = tap_info(lab, "qvm0tap1")
    assert info is not None and info["linkinfo"]["info_data"]["user"] in (
        member.name,
        str(member.uid),
    )
    assert info["master"] == "qvm0"
    # idempotent
    again = qvmctl(member, system_bus, "--json", "tap", "create", "qvm0tap1")
    assert again.returncode == 0 and json.loads(again.stdout)["created"] is False
    # the member's QEMU-style open works, the outsider's does not
    for user, expected in ((member, "attached"), (outsider, "error EPERM")):
        proc = subprocess.run(
            [sys.executable, TAP_CLIENT, lab.netns, "qvm0tap1", str(user.uid), str(user.gid)],
            input="",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.stdout.strip() == expected, (user.name, proc.stdout, proc.stderr)
    # the outsider can neither take nor delete it
    take = qvmctl(outsider, system_bus, "tap", "create", "qvm0tap1")
    assert take.returncode == 3, take.stderr
    drop = qvmctl(outsider, system_bus, "tap", "delete", "qvm0tap1")
    assert drop.returncode == 3, drop.stderr
    # releasing hands the guest TAP back to root; it stays in the lab
    rel = qvmctl(member, system_bus, "tap", "delete", "qvm0tap1")
    assert rel.returncode == 0, rel.stderr
    info = tap_info(lab, "qvm0tap1")
    assert info is not None and info["linkinfo"]["info_data"]["user"] in ("root", "0")


def test_someone_elses_tap_is_busy(lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers) -> None:
    made = qvmctl(
        None, system_bus, "tap", "create", "qvm0tap30", "--owner", str(bus_users.outsider.uid)
    )
    assert made.returncode == 0, made.stderr
    try:
        out = qvmctl(bus_users.member, system_bus, "tap", "create", "qvm0tap30")
        assert out.returncode == 1 and "belongs to another user" in out.stderr, out.stderr
        out = qvmctl(bus_users.member, system_bus, "tap", "create", "qvm0tap31", "--owner", "0")
        assert out.returncode == 3 and "only an administrator" in out.stderr
    finally:
        assert qvmctl(None, system_bus, "tap", "delete", "qvm0tap30").returncode == 0
    assert tap_info(lab, "qvm0tap30") is None


def call_net(
    user: busenv.User | None, bus: str, method: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return busctl(user, bus, "call", "org.qvm.Net", "/org/qvm/Net", "org.qvm.Net", method, *args)


def test_per_user_tap_limit_binds_members_not_admins(
    lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers
) -> None:
    member = bus_users.member
    names = [f"qvm0tap{200 + i}" for i in range(MAX_TAPS_PER_UID + 1)]
    try:
        for name in names[:-1]:
            out = call_net(member, system_bus, "CreateTap", "sa{sv}", name, "0")
            assert out.returncode == 0, (name, out.stderr)
        over = call_net(member, system_bus, "CreateTap", "sa{sv}", names[-1], "0")
        assert over.returncode != 0 and f"(limit {MAX_TAPS_PER_UID})" in over.stderr, over.stderr
        assert tap_info(lab, names[-1]) is None
        # root is not bound by it, also when making one for that member
        out = call_net(
            None, system_bus, "CreateTap", "sa{sv}", names[-1], "1", "owner", "u", str(member.uid)
        )
        assert out.returncode == 0, out.stderr
    finally:
        for name in names:
            call_net(None, system_bus, "DeleteTap", "s", name)
    assert not any(tap_info(lab, n) for n in names)


def test_user_deletes_own_dynamic_tap(
    lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers
) -> None:
    out = qvmctl(bus_users.member, system_bus, "tap", "create", "qvm0tap40", "--multi-queue")
    assert out.returncode == 0, out.stderr
    info = tap_info(lab, "qvm0tap40")
    assert info is not None and info["linkinfo"]["info_data"]["multi_queue"]
    listed = json.loads(qvmctl(bus_users.outsider, system_bus, "--json", "tap", "list").stdout)
    assert {"qvm0tap0", "qvm0tap1", "qvm0tap2", "qvm0tap40"} <= {t["name"] for t in listed}
    assert qvmctl(bus_users.member, system_bus, "tap", "delete", "qvm0tap40").returncode == 0
    assert tap_info(lab, "qvm0tap40") is None
    gone = qvmctl(bus_users.member, system_bus, "tap", "delete", "qvm0tap40")
    assert gone.returncode == 4, gone.stderr


def test_status_and_properties(lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers) -> None:
    out = qvmctl(bus_users.outsider, system_bus, "status")
    assert out.returncode == 0, out.stderr
    assert "qvm0    up" in out.stdout and "10.42.0.1/24" in out.stdout
    st = json.loads(qvmctl(bus_users.outsider, system_bus, "--json", "status").stdout)
    assert st["services"]["addresses"] == ["10.42.0.2/24"] and st["forwarding"] is True
    assert st["drift"] == []
    prop = busctl(
        bus_users.outsider,
        system_bus,
        "get-property",
        "org.qvm.Net",
        "/org/qvm/Net",
        "org.qvm.Net",
        "Gateway",
    )
    assert prop.stdout.strip() == 's "10.42.0.1/24"'


def test_sd_notify_ready_status_watchdog(lab: Qvmd) -> None:
    ready = lab.wait_for("READY", "1", timeout=1)
    assert ready["STATUS"] == "lab qvm0 up"
    assert lab.wait_for("STATUS", "bringing the lab up", timeout=1)
    lab.wait_for("WATCHDOG", "1", timeout=5)


def test_bad_tap_names_are_refused_and_nothing_changes(lab: Qvmd, system_bus: str) -> None:
    before = {link["ifname"] for link in json.loads(nsrun(lab.netns, "ip", "-j", "link").stdout)}
    bad = [
        "eth0",
        "lo",
        "../x",
        "qvm0tap",
        "qvm0tap01",
        "qvm0tap999999999",
        "qvm0",
        "qvm0-svc",
        "",
        "qvm0tap1\u00e9",
        "qvm0tap 1",
        "veth0",
        "x" * 300,
    ]
    for name in bad:
        out = busctl(
            None,
            system_bus,
            "call",
            "org.qvm.Net",
            "/org/qvm/Net",
            "org.qvm.Net",
            "CreateTap",
            "sa{sv}",
            name,
            "0",
        )
        assert (out.returncode != 0 and "InvalidArgument" in out.stderr + out.stdout) or (
            "not of the form" in out.stderr or "TAP name" in out.stderr
        ), (name, out.stderr)
    wrong_opts = [
        ["sa{sv}", "qvm0tap50", "1", "multi_queue", "s", "yes"],
        ["sa{sv}", "qvm0tap50", "1", "bogus", "b", "true"],
        ["sa{sv}", "qvm0tap50", "1", "owner", "i", "-1"],
    ]
    for args in wrong_opts:
        out = busctl(
            None,
            system_bus,
            "call",
            "org.qvm.Net",
            "/org/qvm/Net",
            "org.qvm.Net",
            "CreateTap",
            *args,
        )
        assert out.returncode != 0 and "option" in out.stderr, (args, out.stderr)
    wrong_sig = busctl(
        None,
        system_bus,
        "call",
        "org.qvm.Net",
        "/org/qvm/Net",
        "org.qvm.Net",
        "CreateTap",
        "s",
        "qvm0tap50",
    )
    assert wrong_sig.returncode != 0 and "takes arguments of type 'sa{sv}'" in wrong_sig.stderr
    after = {link["ifname"] for link in json.loads(nsrun(lab.netns, "ip", "-j", "link").stdout)}
    assert after == before


def test_down_and_up(lab: Qvmd, system_bus: str) -> None:
    down = qvmctl(None, system_bus, "down")
    assert down.returncode == 0, down.stderr
    assert tap_info(lab, "qvm0") is None
    up = qvmctl(None, system_bus, "up")
    assert up.returncode == 0, up.stderr
    assert "created bridge qvm0" in up.stdout
    deadline = time.monotonic() + 5
    while tap_info(lab, "qvm0tap2") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tap_info(lab, "qvm0tap2") is not None


def openssl_verify(
    ca: Path | str, cert: Path | str, capath: bool = False
) -> subprocess.CompletedProcess[str]:
    flag = "-CApath" if capath else "-CAfile"
    return subprocess.run(
        ["openssl", "verify", flag, str(ca), str(cert)], capture_output=True, text=True
    )


@pytest.fixture
def member_home(bus_users: busenv.TestUsers) -> Iterator[Path]:
    """A directory the member owns (pytest's tmp_path is 0700 root)."""
    base = Path(tempfile.mkdtemp(prefix="qvt-home-"))
    try:
        base.chmod(0o711)
        home = base / "member"
        home.mkdir()
        os.chown(home, bus_users.member.uid, bus_users.member.gid)
        yield home
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_ca_and_certificates(
    lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers, member_home: Path
) -> None:
    member, outsider = bus_users.member, bus_users.outsider
    pem = busctl(
        outsider,
        system_bus,
        "call",
        "org.qvm.Net",
        "/org/qvm/Net",
        "org.qvm.Net",
        "GetCaCertificate",
        "--json=short",
    )
    assert json.loads(pem.stdout)["data"][0].startswith("-----BEGIN CERTIFICATE-----")
    show = qvmctl(outsider, system_bus, "ca", "show")
    assert (
        "DNS:qvm0.lan" in show.stdout
        and "IP:10.42.0.0/24" in show.stdout
        and "(critical)" in show.stdout
    )
    ca_file = lab.state_dir / "ca-cert" / "qvm-ca.pem"
    listed = json.loads(qvmctl(outsider, system_bus, "--json", "cert", "list").stdout)
    assert {c["guest"] for c in listed} >= {"cp", "wk-1", "wk-2"}
    assert all(c["days_left"] >= 396 for c in listed)
    # A member's own lab name: certificate and key, in a directory of theirs.
    home = member_home
    out = qvmctl(
        member, system_bus, "cert", "issue", "registry.qvm0.lan", "--out", str(home / "reg")
    )
    assert out.returncode == 0, out.stderr
    assert (home / "reg" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert openssl_verify(ca_file, home / "reg" / "cert.pem").returncode == 0
    # ... which nobody else may take over.
    other = qvmctl(None, system_bus, "--json", "cert", "issue", "registry.qvm0.lan")
    assert other.returncode == 0  # root is an admin
    # A guest's certificate: a member gets the certificate, not the key.
    cp = qvmctl(member, system_bus, "cert", "issue", "cp", "--out", str(home / "cp"))
    assert cp.returncode == 0, cp.stderr
    assert "key: kept by qvmd" in cp.stdout and not (home / "cp" / "key.pem").exists()
    assert openssl_verify(ca_file, home / "cp" / "cert.pem").returncode == 0
    # The outsider may read but not issue.
    denied = qvmctl(outsider, system_bus, "cert", "issue", "x.qvm0.lan")
    assert denied.returncode == 3, denied.stderr
    # Bad names are refused with a reason.
    for bad, reason in (
        ("evil.example.com", "outside"),
        ("*.qvm0.lan", "wildcard"),
        ("10.43.0.1", "outside"),
    ):
        r = qvmctl(member, system_bus, "cert", "issue", bad)
        assert r.returncode == 2 and reason in r.stderr, (bad, r.stderr)
    # ca export into the member's own directory, with a working hash link.
    exp = qvmctl(member, system_bus, "ca", "export", str(home / "ca-cert"))
    assert exp.returncode == 0, exp.stderr
    verified = openssl_verify(home / "ca-cert", home / "reg" / "cert.pem", capath=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_dhcp_dns_through_the_daemon(
    lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers, tmp_path: Path
) -> None:
    from tests.netns import netns

    with netns("g") as guest:
        nsrun(
            lab.netns,
            "ip",
            "link",
            "add",
            "gtest0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            guest,
        )
        try:
            nsrun(lab.netns, "ip", "link", "set", "gtest0", "master", "qvm0", "up")
            nsrun(guest, "ip", "link", "set", "eth0", "address", "52:54:0a:2a:00:0a", "up")
            script = tmp_path / "udhcpc.sh"
            script.write_text(
                '#!/bin/sh\n[ "$1" = bound ] && echo "BOUND $ip $router $dns $domain"\nexit 0\n'
            )
            script.chmod(0o755)
            got = nsrun(
                guest,
                "busybox",
                "udhcpc",
                "-i",
                "eth0",
                "-n",
                "-q",
                "-t",
                "10",
                "-T",
                "1",
                "-s",
                str(script),
                timeout=60,
            )
            assert "BOUND 10.42.0.10 10.42.0.1 10.42.0.2 qvm0.lan" in got.stdout, got.stdout
            nsrun(guest, "ip", "addr", "add", "10.42.0.10/24", "dev", "eth0")
            for port in ("53", "5300"):
                ans = nsrun(guest, "dig", "+short", "-p", port, "@10.42.0.2", "cp.qvm0.lan")
                assert ans.stdout.strip() == "10.42.0.10", (port, ans.stdout)
            rev = nsrun(guest, "dig", "+short", "@10.42.0.2", "-x", "10.42.0.11")
            assert rev.stdout.strip() == "wk-1.qvm0.lan."
            deadline = time.monotonic() + 5
            leases: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                leases = json.loads(
                    qvmctl(bus_users.outsider, system_bus, "--json", "lease", "list").stdout
                )
                if any(le["guest"] == "cp" for le in leases):
                    break
                time.sleep(0.2)
            assert any(le["guest"] == "cp" and le["ip"] == "10.42.0.10" for le in leases), leases
        finally:
            nsrun(lab.netns, "ip", "link", "del", "gtest0", check=False)


def test_guest_table_qemu_args_and_setup(
    lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers
) -> None:
    user = bus_users.outsider
    args = qvmctl(user, system_bus, "qemu-args", "cp")
    assert args.returncode == 0, args.stderr
    assert "-netdev tap,id=net0,ifname=qvm0tap0,script=no,downscript=no" in args.stdout
    assert "mac=52:54:0a:2a:00:0a" in args.stdout
    assert "ds=nocloud;s=http://10.42.0.2/nocloud/;dsmode=net" in args.stdout
    missing = qvmctl(user, system_bus, "qemu-args", "nope")
    assert missing.returncode == 4 and "no guest named 'nope'" in missing.stderr
    guests = json.loads(qvmctl(user, system_bus, "--json", "guest", "list").stdout)
    assert [(g["name"], g["ip"], g["tap"]) for g in guests] == [
        ("cp", "10.42.0.10", "qvm0tap0"),
        ("wk-1", "10.42.0.11", "qvm0tap1"),
        ("wk-2", "10.42.0.12", "qvm0tap2"),
    ]
    assert all(g["cert_days_left"] >= 396 for g in guests)
    setup = qvmctl(user, system_bus, "guest-setup", "wk-1")
    assert "ipv4.addresses 10.42.0.11/24" in setup.stdout and "ipv4.dns 10.42.0.2" in setup.stdout
    status = qvmctl(user, system_bus, "status")
    for service in ("dnsmasq", "cloud-init metadata", "nfs-ganesha"):
        line = next((ln for ln in status.stdout.splitlines() if ln.startswith(service)), "")
        assert "running" in line, status.stdout
