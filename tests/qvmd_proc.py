"""Run the real qvmd as a subprocess inside a test's own namespace.

READY=1 is observed on a NOTIFY_SOCKET the test owns, exactly as systemd
would see it. Cleanup kills the daemon and removes the sandbox and its
services namespace even when the test failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.netns import delete_netns, run, unique_name

QVMD = [sys.executable, "-m", "qvmd.daemon"]


class Qvmd:
    def __init__(
        self, netns: str, state_dir: Path, config: Path | None = None, bus: str | None = None
    ) -> None:
        self.netns = netns
        self.bus = bus  # None: run without the D-Bus API
        self.services_netns = f"{netns}-svc"
        self.state_dir = state_dir
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = Path(tempfile.mkdtemp(prefix="qvt-notify-")) / "notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.messages: list[dict[str, str]] = []
        self.log_path = self.notify_path.parent / "qvmd.log"
        self.log_offset = 0

    def args(self, *extra: str) -> list[str]:
        args = [*QVMD, "--netns", self.netns, "--state-dir", str(self.state_dir)]
        args += ["--config", str(self.config)] if self.config else ["--config", "/dev/null"]
        args += ["--bus", self.bus] if self.bus else ["--no-bus"]
        return args + list(extra)

    def start(self, *extra: str, env: dict[str, str] | None = None) -> None:
        full_env = dict(env if env is not None else os.environ)
        full_env["NOTIFY_SOCKET"] = str(self.notify_path)
        # A file, not a pipe: nobody drains a pipe while the daemon runs, and
        # a full pipe would block its logging (and so the daemon).
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args(*extra), env=full_env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.messages:
                if key in msg and (value is None or msg[key] == value):
                    return msg
            assert self.proc is not None
            if self.proc.poll() is not None:
                out = self.output()
                raise AssertionError(f"qvmd exited {self.proc.returncode} before {key}:\n{out}")
            self.notify.settimeout(0.1)
            try:
                data = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(
                dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            )
        raise AssertionError(f"no {key} from qvmd within {timeout}s")

    def wait_ready(self, timeout: float = 15) -> None:
        self.wait_for("READY", "1", timeout)

    def output(self) -> str:
        """What the current (or last) run of the daemon logged."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> str:
        """Stop the daemon; return its output."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.last_returncode = self.proc.returncode
        self.proc = None
        self.messages.clear()
        return self.output()

    def teardown(self) -> subprocess.CompletedProcess[str]:
        return run([*self.args("--teardown")], check=False, timeout=30)

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        self.notify.close()
        self.notify_path.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)
        self.notify_path.parent.rmdir()


def state_dir() -> Path:
    """A fresh state dir whose parents others may traverse: dnsmasq reads
    its files after dropping root (pytest's tmp_path is 0700)."""
    parent = Path(tempfile.mkdtemp(prefix="qvt-state-"))
    parent.chmod(0o711)
    return parent / "state"


@contextmanager
def qvmd_sandbox(
    tmp_path: Path, config_text: str | None = None, bus: str | None = None
) -> Iterator[Qvmd]:
    """A namespace made by the test (so qvmd keeps it across its restarts)."""
    ns = unique_name("d")
    run(["ip", "netns", "add", ns])
    config = None
    if config_text is not None:
        config = tmp_path / "qvmd.toml"
        config.write_text(config_text)
    q = Qvmd(ns, state_dir(), config, bus)
    try:
        yield q
    finally:
        # The daemon and then whatever still runs in its namespaces (a
        # ganesha started just before a kill -9 writes its pid file into the
        # state dir) go first; the state dir last.
        q.close()
        delete_netns(q.services_netns)
        delete_netns(ns)
        shutil.rmtree(q.state_dir.parent, ignore_errors=True)
