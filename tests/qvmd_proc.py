"""Run the real qvmd as a subprocess inside a test's own namespace.

READY=1 is observed on a NOTIFY_SOCKET the test owns, exactly as systemd
would see it. Cleanup kills the daemon and removes the sandbox and its
services namespace even when the test failed.
"""

from __future__ import annotations

import os
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
    def __init__(self, netns: str, state_dir: Path, config: Path | None = None) -> None:
        self.netns = netns
        self.services_netns = f"{netns}-svc"
        self.state_dir = state_dir
        self.config = config
        self.proc: subprocess.Popen[str] | None = None
        self.notify_path = Path(tempfile.mkdtemp(prefix="qvt-notify-")) / "notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.messages: list[dict[str, str]] = []

    def args(self, *extra: str) -> list[str]:
        args = [*QVMD, "--netns", self.netns, "--state-dir", str(self.state_dir)]
        args += ["--config", str(self.config)] if self.config else ["--config", "/dev/null"]
        return args + list(extra)

    def start(self, *extra: str, env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), **(env or {}))
        self.proc = subprocess.Popen(
            self.args(*extra),
            env=full_env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.messages:
                if key in msg and (value is None or msg[key] == value):
                    return msg
            assert self.proc is not None
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> str:
        """Stop the daemon; return its output."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.last_returncode = self.proc.returncode
        self.proc = None
        self.messages.clear()
        return out or ""

    def teardown(self) -> subprocess.CompletedProcess[str]:
        return run([*self.args("--teardown")], check=False, timeout=30)

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        self.notify.close()
        self.notify_path.unlink(missing_ok=True)
        self.notify_path.parent.rmdir()


@contextmanager
def qvmd_sandbox(tmp_path: Path, config_text: str | None = None) -> Iterator[Qvmd]:
    """A namespace made by the test (so qvmd keeps it across its restarts)."""
    ns = unique_name("d")
    run(["ip", "netns", "add", ns])
    config = None
    if config_text is not None:
        config = tmp_path / "qvmd.toml"
        config.write_text(config_text)
    q = Qvmd(ns, tmp_path / "state", config)
    try:
        yield q
    finally:
        q.close()
        delete_netns(q.services_netns)
        delete_netns(ns)
