"""`make bench` stays runnable: its pure, certificate and dnsmasq-reload
parts run quickly and print their table (the full suite needs minutes and
is not in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_pure_parts_run() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "builders,pki,dnsreload"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "nft rule count, 1000 guests" in out.stdout and "met" in out.stdout
    assert "LabPki.issue: host cert EC P-256" in out.stdout
    # a real dnsmasq in a namespace of its own (root)
    assert "dnsmasq reload (new guest answering), 1000 guests" in out.stdout
