"""`make demo` stays true: the demo boots the three tiny guests against the
real qvmd, everything in its status table works, and it cleans up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import busenv
from tests.netns import netns_exists

pytestmark = pytest.mark.root

DEMO = Path(__file__).parent.parent / "tools" / "demo.py"
NAMESPACES = ("qvm-demo", "qvm-demo-svc", "qvm-demo-inet")


@pytest.mark.timeout(600)
def test_demo_once_shows_the_whole_lab_working_and_cleans_up() -> None:
    if any(netns_exists(n) for n in NAMESPACES):
        pytest.skip("a demo is running on this machine")
    tun_mode = Path("/dev/net/tun").stat().st_mode
    tun_shared = bool(busenv.shared_holders("dev-net-tun-mode"))
    out = subprocess.run(
        [sys.executable, str(DEMO), "--once"], capture_output=True, text=True, timeout=560
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for guest, ip in (("cp", "10.42.0.10"), ("wk-1", "10.42.0.11"), ("wk-2", "10.42.0.12")):
        # GUEST IP LEASE CERT-DAYS HTTPS NFS PEERS INTERNET BOOT
        row = re.compile(
            rf"^{re.escape(guest)}\s+{ip}\s+{ip} \(\d+m left\)\s+\d+\s+ok\s+"
            r"ok \(wrote, read 2 peers\)\s+2/2\s+ok\s+ready in [\d.]+s$",
            re.M,
        )
        assert row.search(text), text
    for expected in (
        "qvmd ready in",
        "qvmctl tap create qvm0tap0",
        "$(qvmctl qemu-args cp)",
        "summary: 3/3 guests ready, HTTPS ok 3/3, NFS ok 3/3, peers by name ok 3/3, "
        "internet ok 3/3",
        "stopped 3 QEMU",
        "qvmd stopped (status 0)",
        "namespaces removed: True",
    ):
        assert expected in text, text
    assert not any(netns_exists(n) for n in NAMESPACES)
    if not tun_shared and not busenv.shared_holders("dev-net-tun-mode"):
        # Only when no other test run held it open meanwhile (see tinyguest.py).
        assert Path("/dev/net/tun").stat().st_mode == tun_mode
    assert not _demo_user_left(out), "the demo user was not removed"


def _demo_user_left(out: subprocess.CompletedProcess[str]) -> str:
    """The demo user this run created, if it is still in /etc/passwd."""
    m = re.search(r"demo user (qvmt-member-\d+-\d+)", out.stdout)
    assert m, out.stdout
    passwd = Path("/etc/passwd").read_text()
    return m.group(1) if re.search(rf"^{re.escape(m.group(1))}:", passwd, re.M) else ""
