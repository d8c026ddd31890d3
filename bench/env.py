"""The real product, run the way the tests run it: private system bus, real
polkitd, real users, the real daemon in a namespace of our own.

Everything is borrowed from tests/ (busenv, qvmd_proc, netns) so the bench
exercises exactly what the tests prove works, and cleans up the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import busenv  # noqa: E402
from tests.netns import delete_netns, nsrun, run, unique_name  # noqa: E402
from tests.qvmd_proc import Qvmd, qvmd_sandbox  # noqa: E402

__all__ = [
    "ROOT",
    "Budget",
    "BusClient",
    "LabEnv",
    "busenv",
    "delete_netns",
    "lab_env",
    "nsrun",
    "run",
    "unique_name",
]

PYTHON = sys.executable
DBUS_CLIENT = str(Path(__file__).resolve().parent / "dbus_client.py")
NS_PROBE = str(Path(__file__).resolve().parent / "nsprobe.py")


@dataclass(frozen=True)
class Budget:
    quick: bool

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class LabEnv:
    bus: str
    users: busenv.TestUsers
    qvmd: Qvmd
    tmp: Path
    ready_at: float  # time.monotonic() of READY=1

    @property
    def netns(self) -> str:
        return self.qvmd.netns

    def daemon_pid(self) -> int:
        assert self.qvmd.proc is not None
        return self.qvmd.proc.pid


@contextmanager
def bus_and_users() -> Iterator[tuple[str, busenv.TestUsers]]:
    with (
        busenv.private_system_bus() as bus,
        busenv.polkitd_on(bus, debug=False),
        busenv.test_users() as users,
    ):
        yield bus, users


@contextmanager
def lab_env(bus: str, users: busenv.TestUsers) -> Iterator[LabEnv]:
    """The user's lab (the embedded default) served by a real qvmd on `bus`."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qvmb-")))
        q = stack.enter_context(qvmd_sandbox(tmp, bus=bus))
        q.start(env=busenv.clean_env(bus))
        q.wait_ready(timeout=60)
        yield LabEnv(bus, users, q, tmp, time.monotonic())


def links(netns: str) -> dict[str, dict[str, Any]]:
    out = nsrun(netns, "ip", "-d", "-j", "link", "show").stdout
    return {link["ifname"]: link for link in json.loads(out or "[]")}


class BusClient:
    """A long-lived dbus-fast client (bench/dbus_client.py) as `user` (None = root).

    One connection for its whole life: what is timed is the method call
    alone (bus daemon hop, qvmd's polkit check, the kernel work), no
    process start and no connection set-up.
    """

    def __init__(self, user: busenv.User | None, bus: str) -> None:
        self.proc = busenv.spawn_as(user, [PYTHON, DBUS_CLIENT], bus)
        line = busenv.first_line(self.proc, timeout=30)
        if line != "ready":
            raise RuntimeError(f"dbus client: {line}")

    def request(self, *words: object, timeout: float = 600) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write((" ".join(str(w) for w in words) + "\n").encode())
        self.proc.stdin.flush()
        line = busenv.first_line(self.proc, timeout=timeout)
        reply = json.loads(line)
        if isinstance(reply, dict) and "error" in reply:
            raise RuntimeError(f"{words[0]}: {reply['error']}")
        return reply

    def close(self) -> None:
        busenv.stop_process(self.proc)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def timed_run(argv: list[str], **kwargs: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall time (ms) of a whole process, start to exit."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)
    return (time.perf_counter() - t0) * 1000, proc


@contextmanager
def netns_scope(tag: str) -> Iterator[str]:
    """A fresh, empty namespace of ours (lo up), removed on exit."""
    name = unique_name(tag)
    run(["ip", "netns", "add", name])
    try:
        nsrun(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        delete_netns(name)


def wait_idle(pid: int, quiet: float = 0.06, limit: float = 10.0) -> None:
    """Until `pid` used no CPU for `quiet` seconds (qvmd's healer passes
    after the previous change are over); at most `limit` seconds."""
    deadline = time.monotonic() + limit
    last, since = cpu_ticks(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = cpu_ticks(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def cpu_ticks(pid: int) -> int:
    """utime + stime of `pid`, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
