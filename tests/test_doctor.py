"""`qvmctl doctor` against the real daemon: a Docker-style forward drop is
named with its fix; forwarding turned off is repaired at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import busenv
from tests.netns import nsrun
from tests.qvmd_proc import qvmd_sandbox

pytestmark = pytest.mark.root

DOCKER_LIKE = """
table ip filter {
    chain FORWARD { type filter hook forward priority 0; policy drop; }
    chain DOCKER-USER { }
}
"""


def doctor(bus: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qvmd.cli", "doctor"],
        env=busenv.clean_env(bus),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_doctor_names_a_docker_forward_drop(system_bus: str, tmp_path: Path) -> None:
    with qvmd_sandbox(tmp_path, bus=system_bus) as q:
        q.start(env=busenv.clean_env(system_bus))
        q.wait_ready()
        clean = doctor(system_bus)
        assert clean.returncode == 0
        assert "filter" not in clean.stdout
        rules = tmp_path / "docker.nft"
        rules.write_text(DOCKER_LIKE)
        nsrun(q.netns, "nft", "-f", str(rules))
        out = doctor(system_bus).stdout
        assert "table 'ip filter', chain 'FORWARD'" in out, out
        assert "Docker's FORWARD chain" in out and "DOCKER-USER" in out, out
        # ip_forward off: announced on the netconf group, repaired at once
        # (doctor's own finding for it is covered by the pure doctor tests).
        nsrun(q.netns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if nsrun(q.netns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1":
                break
            time.sleep(0.02)
        assert nsrun(q.netns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
