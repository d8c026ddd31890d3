"""The host resolves guest names through a real systemd-resolved (issue 6).

qvmd registers the services address as DNS server and ~<domain> as routing
domain on the bridge; resolved's stub then answers guest names from the
lab's dnsmasq. Registration must survive the bridge being re-created and
resolved restarting, and must never happen with a resolved that cannot see
the lab's links (another network namespace). tests/resolvedenv.py says how
resolved runs here without touching this machine's resolver.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import busenv, resolvedenv
from tests.mountpoint import mountpoint
from tests.netns import netns, nsrun
from tests.qvmd_proc import Qvmd, qvmd_sandbox

pytestmark = pytest.mark.root

QVMCTL = [sys.executable, "-m", "qvmd.cli"]


@pytest.fixture(scope="module")
def resolved_root() -> Path:
    got = resolvedenv.binaries()
    if isinstance(got, str):
        pytest.skip(got)
    return got


@pytest.fixture(scope="module", autouse=True)
def _mountpoints() -> Iterator[None]:
    # resolved's private mount namespace mounts over both.
    with mountpoint(Path("/run/systemd")), mountpoint(Path("/etc/systemd")):
        yield


@pytest.fixture(scope="module")
def bus() -> Iterator[str]:
    with (
        resolvedenv.bus_policy() as policy,
        busenv.private_system_bus(
            (busenv.OUR_BUS_POLICY, busenv.POLKIT_BUS_POLICY, policy)
        ) as address,
    ):
        yield address


@pytest.fixture
def lab(tmp_path: Path, bus: str) -> Iterator[Qvmd]:
    with qvmd_sandbox(tmp_path, bus=bus) as q:
        yield q


def test_guest_names_resolve_through_resolved_and_registration_survives(
    lab: Qvmd, bus: str, resolved_root: Path
) -> None:
    resolved = resolvedenv.Resolved(resolved_root, lab.netns, bus)
    try:
        resolved.start()
        lab.start(env=busenv.clean_env(bus))
        lab.wait_ready()
        resolved.wait_ctl("10.42.0.2", "dns", "qvm0")
        assert "~qvm0.lan" in resolved.wait_ctl("qvm0.lan", "domain", "qvm0")
        # Through resolved's stub (what `curl https://cp.qvm0.lan` on the
        # host uses), answered by the lab's dnsmasq.
        dig = nsrun(lab.netns, "dig", "+short", "+time=2", "+tries=3", "@127.0.0.53", "cp.qvm0.lan")
        assert dig.stdout.split() == ["10.42.0.10"], dig.stdout
        assert "registered 10.42.0.2 for ~qvm0.lan on qvm0" in lab.output()

        # The bridge re-created (a new ifindex): registered again.
        old = resolved.ctl("dns", "qvm0")
        nsrun(lab.netns, "ip", "link", "del", "qvm0")
        out = resolved.wait_ctl("10.42.0.2", "dns", "qvm0")
        assert out.split(":")[0] != old.split(":")[0], (old, out)  # "Link N (qvm0)"

        # resolved restarted (it forgets every link setting): registered again.
        resolved.stop()
        resolved.start()
        resolved.wait_ctl("10.42.0.2", "dns", "qvm0")
        resolved.wait_ctl("qvm0.lan", "domain", "qvm0")
        dig = nsrun(
            lab.netns, "dig", "+short", "+time=2", "+tries=3", "@127.0.0.53", "wk-1.qvm0.lan"
        )
        assert dig.stdout.split() == ["10.42.0.11"], dig.stdout
    finally:
        lab.stop()
        resolved.close()


def test_resolved_in_another_namespace_is_left_alone(
    lab: Qvmd, bus: str, resolved_root: Path
) -> None:
    with netns("rsv") as elsewhere:
        resolved = resolvedenv.Resolved(resolved_root, elsewhere, bus)
        try:
            resolved.start()
            lab.start(env=busenv.clean_env(bus))
            lab.wait_ready()
            doctor = json.loads(
                subprocess.run(
                    [*QVMCTL, "--json", "doctor"],
                    env=busenv.clean_env(bus),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                ).stdout
            )
            summaries = " ".join(f["summary"] for f in doctor)
            assert "another network namespace" in summaries, doctor
            # Nothing was set on any link resolved knows.
            assert "10.42.0.2" not in resolved.ctl("dns")
        finally:
            lab.stop()
            resolved.close()
