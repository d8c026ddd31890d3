"""Reload: a valid new config is applied without restarting dnsmasq; an
invalid one is refused with the key named and changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import busenv
from tests.netns import nsrun
from tests.qvmd_proc import Qvmd, qvmd_sandbox

pytestmark = pytest.mark.root

GUESTS = """
[[guests]]
name = "cp"
ip = "10.42.0.10"
tap = "qvm0tap0"
[[guests]]
name = "wk-1"
ip = "10.42.0.11"
tap = "qvm0tap1"
[[guests]]
name = "wk-2"
ip = "10.42.0.12"
tap = "qvm0tap2"
"""
NEW_GUEST = """
[[guests]]
name = "wk-3"
ip = "10.42.0.13"
tap = "qvm0tap3"
"""


@pytest.fixture
def lab(system_bus: str, tmp_path: Path) -> Iterator[Qvmd]:
    with qvmd_sandbox(tmp_path, GUESTS, bus=system_bus) as q:
        q.start(env=busenv.clean_env(system_bus))
        q.wait_ready()
        yield q


def qvmctl(bus: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qvmd.cli", *args],
        env=busenv.clean_env(bus),
        capture_output=True,
        text=True,
        timeout=60,
    )


def dnsmasq_pid(q: Qvmd, bus: str) -> int:
    status = json.loads(qvmctl(bus, "--json", "status").stdout)
    (dnsmasq,) = [s for s in status["host_services"] if s["name"] == "dnsmasq"]
    return int(dnsmasq["pid"])


def has_link(q: Qvmd, name: str) -> bool:
    out = nsrun(q.netns, "ip", "-j", "link").stdout
    return any(link["ifname"] == name for link in json.loads(out))


def test_reload_adds_a_guest_without_restarting_dnsmasq(lab: Qvmd, system_bus: str) -> None:
    pid = dnsmasq_pid(lab, system_bus)
    assert lab.config is not None
    lab.config.write_text(GUESTS + NEW_GUEST)
    out = qvmctl(system_bus, "reload")
    assert out.returncode == 0, out.stderr
    assert "created TAP qvm0tap3" in out.stdout
    assert has_link(lab, "qvm0tap3")
    assert dnsmasq_pid(lab, system_bus) == pid  # SIGHUP, not a restart
    ans = nsrun(lab.netns, "dig", "+short", "@10.42.0.2", "wk-3.qvm0.lan")
    assert ans.stdout.strip() == "10.42.0.13"
    certs = json.loads(qvmctl(system_bus, "--json", "cert", "list").stdout)
    assert "wk-3" in {c["guest"] for c in certs}
    # And back: the guest's TAP goes away (nobody holds it).
    lab.config.write_text(GUESTS)
    assert qvmctl(system_bus, "reload").returncode == 0
    assert not has_link(lab, "qvm0tap3")


def test_invalid_reload_is_refused_and_changes_nothing(lab: Qvmd, system_bus: str) -> None:
    assert lab.config is not None
    lab.config.write_text(GUESTS + NEW_GUEST.replace("10.42.0.13", "10.42.0.12"))
    out = qvmctl(system_bus, "reload")
    assert out.returncode == 2
    assert "guests[3].ip: 10.42.0.12 is already used by guests[2]" in out.stderr
    assert not has_link(lab, "qvm0tap3")
    assert dnsmasq_pid(lab, system_bus) > 0
    # SIGHUP with a bad file: logged, refused, the daemon keeps serving.
    assert lab.proc is not None
    lab.proc.send_signal(1)
    status = qvmctl(system_bus, "status")
    assert status.returncode == 0
    import time

    deadline = time.monotonic() + 5
    while "reload refused" not in lab.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reload refused, keeping the running config: guests[3].ip" in lab.output()
