"""Turns events into reconcile passes: coalesced, serialised, backed off.

Events only set a flag; one task runs reconcile passes. A burst of events
becomes one pass (after a short settle delay). If passes keep finding
something to repair — an outside actor undoing our work in a loop — the
delay between passes doubles up to a cap, so qvmd never spins; it drops
back as soon as a pass finds nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pyroute2.netlink.exceptions import NetlinkError

from qvmd.errors import QvmError

log = logging.getLogger(__name__)


@dataclass
class HealStats:
    passes: int = 0
    repairs: int = 0
    errors: int = 0
    last: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=20))


class Healer:
    def __init__(
        self,
        reconcile: Callable[[frozenset[str] | None], Awaitable[list[str]]],
        settle: float = 0.005,
        max_backoff: float = 5.0,
    ) -> None:
        self._reconcile = reconcile
        self.settle = settle
        self.max_backoff = max_backoff
        self.stats = HealStats()
        self._wanted = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._reasons: list[str] = []
        # Events about single TAPs only need those TAPs checked: a full pass
        # reads every link (~0.3 ms each: 0.3 s at 1,000 TAPs).
        self._full = False
        self._taps: set[str] = set()
        self.on_repair: Callable[[str], None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="healer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self, reason: str, tap: str | None = None) -> None:
        """Schedule a pass; `tap` limits it to that TAP (if nothing else woke it)."""
        self._reasons.append(reason)
        if tap is None:
            self._full = True
        else:
            self._taps.add(tap)
        self._wanted.set()
        self._idle.clear()

    async def settled(self) -> None:
        """Wait until no pass is pending or running (for tests and Status)."""
        await self._idle.wait()

    def _back_off(self, backoff: float) -> float:
        backoff = min(self.max_backoff, max(0.05, backoff * 2))
        if backoff >= 0.4:
            log.warning("something keeps undoing qvmd's changes; next repair in %.1fs", backoff)
        return backoff

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            await self._wanted.wait()
            await asyncio.sleep(self.settle + backoff)
            self._wanted.clear()
            reasons, self._reasons = self._reasons, []
            scope = None if self._full else frozenset(self._taps)
            self._full, self._taps = False, set()
            self.stats.passes += 1
            try:
                changes = await self._reconcile(scope)
            except Exception as exc:
                # Typically a race with whoever is breaking things (a link
                # vanished mid-pass): not a repair; try again after a backoff.
                self.stats.errors += 1
                woken = "; ".join(reasons[:3])
                if isinstance(exc, QvmError | OSError | NetlinkError):
                    log.warning("self-heal pass failed (woken by %s): %s", woken, exc)
                else:
                    log.exception("self-heal pass failed (woken by %s)", woken)
                backoff = self._back_off(backoff)
                self._full = True
                self._wanted.set()
                continue
            if changes:
                self.stats.repairs += len(changes)
                now = time.time()
                for change in changes:
                    self.stats.last.append((now, change))
                    if self.on_repair is not None:
                        self.on_repair(change)
                log.warning(
                    "self-heal repaired %d thing(s) after: %s",
                    len(changes),
                    reasons[0] if reasons else "?",
                )
                backoff = self._back_off(backoff)
                # Our own repairs produce events; one more pass of the same
                # scope confirms the result.
                if scope is None:
                    self._full = True
                else:
                    self._taps |= scope
                self._wanted.set()
            else:
                backoff = 0.0
                if not self._wanted.is_set():
                    self._idle.set()
