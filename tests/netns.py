"""Test helpers for network namespaces: every one made here is removed.

Names are unique per test run (pid + counter) so parallel runs and helper
agents never collide, and all start with `qvt` so a leftover is easy to spot.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

_counter = itertools.count()


def unique_name(tag: str = "") -> str:
    # netns names are file names; interface names inside them are separate.
    return f"qvt{os.getpid() % 100000}{tag}{next(_counter)}"


def run(
    cmd: Sequence[str], check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, timeout=timeout, text=True, capture_output=True)


def nsrun(
    ns: str, *cmd: str, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace `ns` (test-side tooling may use `ip`)."""
    return run(["ip", "netns", "exec", ns, *cmd], check=check, timeout=timeout)


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def delete_netns(name: str) -> None:
    """Remove a namespace; kill what still runs in it so nothing leaks."""
    if not netns_exists(name):
        return
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    run(["ip", "netns", "delete", name], check=False)


@contextmanager
def netns(tag: str = "") -> Iterator[str]:
    name = unique_name(tag)
    run(["ip", "netns", "add", name])
    try:
        nsrun(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        delete_netns(name)
