"""`make demo` stays true: the demo script brings the lab up and cleans up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import netns_exists

pytestmark = pytest.mark.root

DEMO = Path(__file__).parent.parent / "tools" / "demo.py"


def test_demo_once_shows_the_lab_and_removes_the_sandbox() -> None:
    if netns_exists("qvm-demo"):
        pytest.skip("a demo is running on this machine")
    out = subprocess.run(
        [sys.executable, str(DEMO), "--once"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for expected in (
        "qvm0    up     10.42.0.1/24",
        "cp     cp.qvm0.lan    10.42.0.10",
        "qvm-demo-svc    veth0      10.42.0.2/24  up     10.42.0.1",
        "sandbox removed: True",
    ):
        assert expected in out.stdout, out.stdout
    assert not netns_exists("qvm-demo") and not netns_exists("qvm-demo-svc")
