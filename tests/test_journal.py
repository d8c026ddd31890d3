"""qvmd's log in a real systemd-journald, with its structured fields.

Under systemd (JOURNAL_STREAM set) qvmd logs through python-systemd's
JournalHandler: a TAP request must land in the journal with QVM_TAP and
QVM_UID fields, so `journalctl QVM_TAP=qvm0tap1` finds it, and dnsmasq's own
lines with the child's name (QVM_CHILD: this test found that lower-case
field names were silently dropped by journald). There is no journald on this machine, so the
test runs Debian's systemd-journald binary itself, without touching the
host: journald and qvmd each get a private mount namespace in which a temp
dir stands in for /run/systemd (the journal's sockets); journald also gets
a tmpfs /run whose /run/log is another temp dir (its files, read back with
`journalctl --directory`) and its own journald.conf (volatile storage, no
kernel log, no forwarding).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import busenv
from tests.mountpoint import mountpoint
from tests.qvmd_proc import Qvmd, qvmd_sandbox

pytestmark = pytest.mark.root

JOURNALD = Path("/lib/systemd/systemd-journald")
QVMCTL = [sys.executable, "-m", "qvmd.cli"]
JOURNALCTL = ("journalctl", "--no-pager", "-o", "json")
JOURNALD_CONF = """[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitBurst=0
"""
# Each in `unshare --mount --propagation private`: nothing reaches the host.
JOURNALD_SETUP = """set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/systemd /run/log
mount --bind {dir}/run /run/systemd
mount --bind {dir}/log /run/log
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd
cp {dir}/journald.conf /etc/systemd/journald.conf
exec {journald}
"""
CLIENT_SETUP = """set -e
mount --bind {dir}/run /run/systemd
exec "$@"
"""


class Journal:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qvt-journal-"))
        self.dir.chmod(0o755)
        (self.dir / "run" / "journal").mkdir(parents=True)
        (self.dir / "log").mkdir()
        (self.dir / "journald.conf").write_text(JOURNALD_CONF)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script = JOURNALD_SETUP.format(dir=self.dir, journald=JOURNALD)
        with open(self.dir / "journald.out", "wb") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 10
        while not (self.dir / "run" / "journal" / "socket").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"journald did not start:\n{self.output()}")
            time.sleep(0.05)

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run where /run/systemd/journal is this journal's."""
        script = CLIENT_SETUP.format(dir=self.dir)
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]

    def output(self) -> str:
        return (self.dir / "journald.out").read_text(errors="replace")

    def entries(self, *match: str) -> list[dict[str, Any]]:
        out = subprocess.run(
            [*JOURNALCTL, f"--directory={self.dir / 'log' / 'journal'}", *match],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def close(self) -> None:
        if self.proc is not None:
            busenv.stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def journal() -> Iterator[Journal]:
    if not JOURNALD.exists():
        pytest.fail(f"{JOURNALD} missing: the systemd package is a test dependency")
    # Both namespaces mount over these (journald: /etc/systemd; qvmd: /run/systemd).
    with mountpoint(Path("/run/systemd")), mountpoint(Path("/etc/systemd")):
        j = Journal()
        try:
            j.start()
            yield j
        finally:
            j.close()


@pytest.fixture
def lab(tmp_path: Path, system_bus: str, polkitd_running: busenv.Polkitd) -> Iterator[Qvmd]:
    with qvmd_sandbox(tmp_path, bus=system_bus) as q:
        yield q


def wait_entries(journal: Journal, *match: str, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = journal.entries(*match)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_structured_fields_reach_the_journal(
    journal: Journal, lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers
) -> None:
    env = busenv.clean_env(system_bus, {"JOURNAL_STREAM": "8:12345"})
    env["NOTIFY_SOCKET"] = str(lab.notify_path)
    with open(lab.log_path, "ab") as log:
        lab.proc = subprocess.Popen(
            journal.wrap(lab.args()), env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        lab.wait_ready(timeout=30)
        member = bus_users.member
        made = busenv.run_as(member, [*QVMCTL, "tap", "create", "qvm0tap1"], system_bus)
        assert made.returncode == 0, made.stderr

        entries = wait_entries(journal, "QVM_TAP=qvm0tap1")
        owned = [e for e in entries if "now owned by uid" in e.get("MESSAGE", "")]
        assert owned, f"no TAP line with QVM_TAP in the journal:\n{journal.entries()[-20:]}"
        line = owned[-1]
        assert line["QVM_UID"] == str(member.uid)
        assert line["SYSLOG_IDENTIFIER"] == "qvmd" and line["PRIORITY"] == "6"
        assert line["MESSAGE"] == f"TAP qvm0tap1 now owned by uid {member.uid}"
        # The lab coming up, and dnsmasq's own lines under its child name.
        assert any("lab qvm0 up" in e.get("MESSAGE", "") for e in journal.entries())
        dns = wait_entries(journal, "QVM_CHILD=dnsmasq")
        assert dns, "dnsmasq's lines are not in the journal under QVM_CHILD"
        assert all("dnsmasq" in e["MESSAGE"] and e["QVM_CHILD_PID"].isdigit() for e in dns), dns
        # With the journal in use, nothing goes to stderr.
        assert "now owned by uid" not in lab.output()
    finally:
        lab.stop(signal.SIGTERM)
        busenv.run_as(bus_users.member, [*QVMCTL, "tap", "delete", "qvm0tap1"], system_bus)
