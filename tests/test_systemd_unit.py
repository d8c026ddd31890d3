"""The shipped systemd, D-Bus, polkit, sysusers and tmpfiles files are valid.

Validity is judged by the real tools (systemd-analyze, dbus-daemon,
systemd-sysusers, systemd-tmpfiles), each shown once to reject a broken copy
so these checks cannot pass vacuously.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from dbus_fast import RequestNameReply
from dbus_fast.aio import MessageBus

from tests import busenv

DATA = busenv.DATA
UNIT = DATA / "systemd" / "qvmd.service"
ACTIVATION = DATA / "dbus" / "org.qvm.Net.service"
SYSUSERS = DATA / "sysusers" / "qvmd.conf"
TMPFILES = DATA / "tmpfiles" / "qvmd.conf"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _unit_settings(text: str) -> dict[str, list[str]]:
    """[Service]/[Unit]/[Install] keys -> values in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def _verify(unit_text: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    # systemd-analyze verify also checks that ExecStart= is an executable
    # file; /usr/bin/qvmd exists only once installed, so the copy points at a
    # binary that exists.  Every other line is verified as shipped.
    path = tmp / "qvmd.service"
    true = shutil.which("true")
    path.write_text(
        re.sub(r"(?m)^(ExecStart(?:Pre)?=\+?)/usr/bin/qvmd\b", rf"\g<1>{true}", unit_text)
    )
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )


@pytest.fixture(scope="module")
def unit_text() -> str:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: apt-get install systemd")
    return UNIT.read_text()


def test_unit_verifies_clean(unit_text: str, tmp_path: Path) -> None:
    r = _verify(unit_text, tmp_path)
    # verify exits 0 even for unknown keys or bad values (it only warns), so
    # any output at all is a failure.
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", (
        r.stdout + r.stderr
    )


@pytest.mark.parametrize(
    ("broken", "expect"),
    [
        ("ProtectSystem=strictest", "protect system"),
        ("Type=notifyy", "service type"),
        ("WatchdogSecs=30s", "Unknown key"),
    ],
)
def test_verify_catches_broken_units(
    unit_text: str, tmp_path: Path, broken: str, expect: str
) -> None:
    """The clean verdict above means something: a broken line is reported."""
    key = broken.split("=")[0]
    text = re.sub(rf"(?m)^{key}=.*$", broken, unit_text)
    if text == unit_text:
        text = unit_text.replace("[Service]\n", f"[Service]\n{broken}\n", 1)
    r = _verify(text, tmp_path)
    assert expect.lower() in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def test_unit_declares_what_the_daemon_relies_on(unit_text: str) -> None:
    s = _unit_settings(unit_text)
    expected = {
        "Service.Type": "notify",
        "Service.NotifyAccess": "main",
        "Service.BusName": "org.qvm.Net",
        "Service.ExecStart": "/usr/bin/qvmd",
        "Service.ExecStartPre": "+/usr/bin/qvmd --prepare-netns",
        "Service.ExecReload": "kill -HUP $MAINPID",
        "Service.Restart": "on-failure",
        "Service.StateDirectory": "qvmd",
        "Service.ConfigurationDirectory": "qvmd",
        "Service.ProtectSystem": "strict",
        "Service.ProtectHome": "yes",
        "Service.NoNewPrivileges": "yes",
        "Service.PrivateTmp": "yes",
        "Service.ProtectKernelTunables": "no",
        "Service.LockPersonality": "yes",
        "Install.WantedBy": "multi-user.target",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key
    assert s["Service.WatchdogSec"][0].endswith("s")
    assert set(s["Service.ReadWritePaths"][0].split()) == {"/var/lib/qvmd", "/run/netns"}
    assert set(s["Service.RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX",
        "AF_NETLINK",
        "AF_INET",
        "AF_INET6",
        "AF_PACKET",
    }


def test_every_capability_is_explained(unit_text: str) -> None:
    """Each capability kept in the bounding set has a comment saying why."""
    caps = _unit_settings(unit_text)["Service.CapabilityBoundingSet"][0].split()
    assert "CAP_NET_ADMIN" in caps
    assert "CAP_SYS_MODULE" not in caps and "CAP_DAC_OVERRIDE" not in caps
    comments = "\n".join(line for line in unit_text.splitlines() if line.lstrip().startswith("#"))
    for cap in caps:
        assert re.search(rf"#.*\b{cap}\b", comments), f"{cap} has no comment"


def test_activation_file_matches_unit(unit_text: str) -> None:
    lines = [
        line for line in ACTIVATION.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert lines[0] == "[D-BUS Service]"
    entries = dict(line.split("=", 1) for line in lines[1:])
    assert entries == {
        "Name": _unit_settings(unit_text)["Service.BusName"][0],
        "Exec": "/bin/false",
        "User": "root",
        "SystemdService": UNIT.name,
    }


def test_polkit_policy_actions_and_defaults() -> None:
    tree = ET.parse(busenv.OUR_POLKIT_POLICY)
    actions = {}
    for action in tree.getroot().iter("action"):
        d = action.find("defaults")
        assert d is not None
        actions[action.get("id")] = tuple(
            d.findtext(k) for k in ("allow_any", "allow_inactive", "allow_active")
        )
        assert action.findtext("description") and action.findtext("message")
    admin = ("auth_admin", "auth_admin", "auth_admin_keep")
    assert actions == {
        "org.qvm.Net.manage-taps": admin,
        "org.qvm.Net.manage-lab": admin,
        "org.qvm.Net.manage-forwards": admin,
        "org.qvm.Net.issue-certificates": admin,
    }
    rules = busenv.OUR_POLKIT_RULES.read_text()
    granted = set(re.findall(r'action\.id == "([^"]+)"', rules))
    assert granted == {
        "org.qvm.Net.manage-taps",
        "org.qvm.Net.manage-forwards",
        "org.qvm.Net.issue-certificates",
    }
    assert 'isInGroup("qvm")' in rules


@root_only
def test_sysusers_creates_group_qvm(tmp_path: Path) -> None:
    """systemd-sysusers applied to an empty alternate root (never the host's)."""
    (tmp_path / "etc").mkdir()
    r = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    groups = [line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()]
    assert "qvm" in groups


@root_only
def test_tmpfiles_creates_state_dirs(tmp_path: Path) -> None:
    """systemd-tmpfiles applied to an alternate root (never the host's)."""
    r = subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    state = tmp_path / "var/lib/qvmd"
    assert state.is_dir() and state.stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "run/netns").is_dir()


@root_only
def test_dbus_policy_accepted_by_dbus_daemon() -> None:
    """A real dbus-daemon starts with data/dbus/org.qvm.Net.conf included and
    enforces it: root may own org.qvm.Net."""
    with busenv.private_system_bus([busenv.OUR_BUS_POLICY]) as address:

        async def main() -> None:
            bus = await MessageBus(bus_address=address).connect()
            try:
                reply = await bus.request_name("org.qvm.Net")
                assert reply is RequestNameReply.PRIMARY_OWNER
            finally:
                bus.disconnect()

        asyncio.run(main())


@root_only
def test_dbus_daemon_rejects_a_broken_policy(tmp_path: Path) -> None:
    """The acceptance above is meaningful: a malformed policy stops the bus."""
    broken = tmp_path / "broken.conf"
    broken.write_text(busenv.OUR_BUS_POLICY.read_text().replace("</busconfig>", ""))
    with (
        pytest.raises(busenv.HarnessError),
        busenv.private_system_bus([broken]),
    ):
        pass
