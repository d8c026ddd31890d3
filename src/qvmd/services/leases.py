"""dnsmasq's lease file: parse it, and watch it for changes.

Each IPv4 lease is one line: `EXPIRY MAC IP HOSTNAME CLIENT-ID`, with `*`
for an unknown host name or client id and an expiry of 0 for an infinite
lease. DHCPv6 leases follow a `duid` line; the lab is IPv4-only, so they are
ignored.

The watcher polls the file's (inode, size, mtime) from the event loop and
re-reads only when that changes: the file is tiny, dnsmasq rewrites it in
place on every lease event, and polling needs no extra fd or thread and
survives the file being created later or replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from qvmd.errors import InvalidArgument
from qvmd.model import Lab
from qvmd.names import validate_mac

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Lease:
    mac: str
    ip: IPv4Address
    hostname: str | None
    expiry: int | None  # seconds since the epoch; None for an infinite lease
    client_id: str | None


@dataclass(frozen=True)
class LeaseChange:
    kind: str  # "added", "removed" or "changed"
    lease: Lease  # the new lease; the old one for "removed"
    old: Lease | None  # the previous lease for "changed"


def parse_leases(text: str) -> tuple[Lease, ...]:
    """Every well-formed IPv4 lease, sorted by IP. Malformed lines are
    skipped (and logged): a half-understood file must not stop the daemon."""
    leases: list[Lease] = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if words[0] == "duid":
            break  # what follows are DHCPv6 leases
        try:
            leases.append(_parse_line(words))
        except (ValueError, InvalidArgument) as e:
            log.warning("lease file line %d ignored (%s): %r", n, e, line)
    return tuple(sorted(leases, key=lambda lease: lease.ip))


def _parse_line(words: list[str]) -> Lease:
    if len(words) != 5:
        raise ValueError(f"{len(words)} fields instead of 5")
    expiry = int(words[0])
    return Lease(
        mac=validate_mac(words[1]),
        ip=IPv4Address(words[2]),
        hostname=None if words[3] == "*" else words[3],
        expiry=None if expiry == 0 else expiry,
        client_id=None if words[4] == "*" else words[4],
    )


def guest_of(lease: Lease, lab: Lab) -> str | None:
    """The guest this lease belongs to: its MAC *and* IP must match."""
    for g in lab.guests:
        if g.mac == lease.mac and g.ip == lease.ip:
            return g.name
    return None


def diff_leases(old: tuple[Lease, ...], new: tuple[Lease, ...]) -> tuple[LeaseChange, ...]:
    """Changes from `old` to `new`, a lease being identified by its MAC."""
    before = {lease.mac: lease for lease in old}
    after = {lease.mac: lease for lease in new}
    changes: list[LeaseChange] = []
    for mac, lease in after.items():
        prev = before.get(mac)
        if prev is None:
            changes.append(LeaseChange("added", lease, None))
        elif prev != lease:
            changes.append(LeaseChange("changed", lease, prev))
    for mac, lease in before.items():
        if mac not in after:
            changes.append(LeaseChange("removed", lease, None))
    return tuple(sorted(changes, key=lambda c: (c.lease.ip, c.kind)))


def read_leases(path: Path) -> tuple[Lease, ...]:
    """The leases in `path`; none if dnsmasq has not created it yet."""
    try:
        return parse_leases(path.read_text())
    except FileNotFoundError:
        return ()


class LeaseWatcher:
    """Calls `on_change(changes, leases)` when the lease file's content changes."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[tuple[LeaseChange, ...], tuple[Lease, ...]], None],
        interval: float = 0.5,
    ) -> None:
        self.path = path
        self.interval = interval
        self._on_change = on_change
        self._stamp: tuple[int, int, int] | None = None
        self._leases: tuple[Lease, ...] = ()
        self._task: asyncio.Task[None] | None = None

    @property
    def leases(self) -> tuple[Lease, ...]:
        return self._leases

    def start(self) -> None:
        """Read the current leases (no event for them) and start polling."""
        self._stamp = self._stat()
        self._leases = read_leases(self.path)
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="lease-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def check(self) -> tuple[LeaseChange, ...]:
        """Look once; report and return the changes since the last look."""
        stamp = self._stat()
        if stamp == self._stamp:
            return ()
        self._stamp = stamp
        leases = read_leases(self.path)
        changes = diff_leases(self._leases, leases)
        self._leases = leases
        if changes:
            try:
                self._on_change(changes, leases)
            except Exception:
                log.exception("lease change callback failed")
        return changes

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except OSError as e:
                log.warning("cannot read lease file %s: %s", self.path, e)
