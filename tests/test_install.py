"""`make install DESTDIR=...` puts every file where systemd, D-Bus and
polkit read it, with the unit pointing at the installed binary, and
`make uninstall` takes all of it away again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = [
    "usr/local/bin/qvmd",
    "usr/local/bin/qvmctl",
    "usr/local/lib/systemd/system/qvmd.service",
    "usr/local/lib/sysusers.d/qvmd.conf",
    "usr/local/lib/tmpfiles.d/qvmd.conf",
    "usr/share/dbus-1/system.d/org.qvm.Net.conf",
    "usr/share/dbus-1/system-services/org.qvm.Net.service",
    "usr/share/dbus-1/interfaces/org.qvm.Net.xml",
    "usr/share/polkit-1/actions/org.qvm.Net.policy",
    "usr/share/polkit-1/rules.d/50-org.qvm.Net.rules",
    "usr/share/bash-completion/completions/qvmctl",
]


@pytest.mark.root
def test_install_and_uninstall_into_destdir(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    make = ["make", "-s", "-C", str(ROOT), f"DESTDIR={dest}"]
    done = subprocess.run([*make, "install"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for rel in EXPECTED:
        assert (dest / rel).is_symlink() or (dest / rel).is_file(), rel
    unit = (dest / "usr/local/lib/systemd/system/qvmd.service").read_text()
    assert "ExecStart=/usr/local/bin/qvmd\n" in unit
    assert "ExecStartPre=+/usr/local/bin/qvmd --prepare-netns\n" in unit
    assert (dest / "usr/local/bin/qvmctl").readlink() == Path("/usr/local/lib/qvmd/bin/qvmctl")
    shebang = (dest / "usr/local/lib/qvmd/bin/qvmctl").read_text().splitlines()[0]
    assert shebang == "#!/usr/local/lib/qvmd/bin/python3"
    assert str(dest) not in (dest / "usr/local/lib/qvmd/pyvenv.cfg").read_text()
    gone = subprocess.run([*make, "uninstall"], capture_output=True, text=True, timeout=120)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    left = [p for p in dest.rglob("*") if not p.is_dir()]
    assert left == [], left
