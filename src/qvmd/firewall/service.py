"""The firewall as the core uses it: desired ruleset from the lab and the
forwards, applied when the kernel differs, forwards persisted first.

The nft calls block (about 7 ms for the user's lab, ~95 ms at 1,000
guests), so they run in a worker thread; an asyncio lock serialises them.
Threads inherit the namespace the daemon entered, so nft talks to the
sandbox when there is one.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from qvmd import sysctl
from qvmd.firewall.apply import Firewall, enable_localhost_forwards
from qvmd.firewall.doctor import Finding, diagnose
from qvmd.firewall.forwards import (
    PortForward,
    add_forward,
    load_forwards,
    prune_forwards,
    remove_forward,
    save_forwards,
)
from qvmd.firewall.ruleset import build_ruleset
from qvmd.model import Lab

log = logging.getLogger(__name__)

BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


class FirewallService:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.fw: Firewall | None = None
        self.forwards: tuple[PortForward, ...] = ()
        self.lock = asyncio.Lock()

    @staticmethod
    def _new_firewall() -> Firewall:
        # No owner flag: an owned table dies with the process that made it,
        # so every restart of qvmd would leave the guests without NAT,
        # forwards and anti-spoofing until the new process re-applied — the
        # opposite of "restarts keep guests online". The kernel's fix, the
        # persist flag (6.9+), cannot be expressed with Debian 12's nft
        # 1.0.6. Without the flag the table survives restarts and is replaced
        # atomically; an accidental `nft flush ruleset` is an nftables event,
        # and the healer re-applies within milliseconds.
        return Firewall(use_owner_flag=False)

    def load(self, lab: Lab) -> None:
        kept, dropped = prune_forwards(lab, load_forwards(self.state_dir))
        for f in dropped:
            log.warning(
                "dropping forward %s/%d to %s: no such guest any more",
                f.proto,
                f.host_port,
                f.guest,
            )
        if dropped:
            save_forwards(self.state_dir, kept)
        self.forwards = kept

    async def ensure(self, lab: Lab, bridge_created: bool) -> list[str]:
        """Apply our tables if they are missing or differ; [] when all is equal."""
        async with self.lock:
            return await asyncio.to_thread(self._ensure, lab, bridge_created)

    def _ensure(self, lab: Lab, bridge_created: bool) -> list[str]:
        if self.fw is None:
            self.fw = self._new_firewall()
        changes = []
        if bridge_created:
            # route_localnet lives on the interface: a new bridge needs it again.
            enable_localhost_forwards(lab.bridge)
        ruleset = build_ruleset(lab, self.forwards)
        seen = self.fw.observe(ruleset)
        if not seen.matches:
            self.fw.apply(ruleset)
            what = "re-created" if seen.missing else "applied"
            changes.append(f"{what} nft tables ({len(self.forwards)} forward(s))")
        return changes

    async def add(
        self,
        lab: Lab,
        proto: str,
        host_port: int,
        guest: str,
        guest_port: int,
        uid: int,
        admin: bool,
    ) -> PortForward:
        async with self.lock:
            new, fwd = add_forward(
                lab,
                self.forwards,
                proto,
                host_port,
                guest,
                guest_port,
                caller_uid=uid,
                is_admin=admin,
            )
            await self._commit(lab, new)
            return fwd

    async def remove(
        self, lab: Lab, proto: str, host_port: int, uid: int, admin: bool
    ) -> PortForward:
        async with self.lock:
            new, gone = remove_forward(
                self.forwards, proto, host_port, caller_uid=uid, is_admin=admin
            )
            await self._commit(lab, new)
            return gone

    async def _commit(self, lab: Lab, new: tuple[PortForward, ...]) -> None:
        old = self.forwards
        # Persist first: after a crash the file, not the kernel, is the truth.
        await asyncio.to_thread(save_forwards, self.state_dir, new)
        self.forwards = new
        try:
            await asyncio.to_thread(self._apply, lab)
        except Exception:
            self.forwards = old
            await asyncio.to_thread(save_forwards, self.state_dir, old)
            raise

    def _apply(self, lab: Lab) -> None:
        if self.fw is None:
            self.fw = self._new_firewall()
        self.fw.apply(build_ruleset(lab, self.forwards))

    async def teardown(self) -> list[str]:
        async with self.lock:
            if self.fw is None:
                self.fw = self._new_firewall()
            fw = self.fw
            removed = await asyncio.to_thread(fw.remove)
            return [f"removed nft table {family} {name}" for family, name in removed]

    async def doctor(self, lab: Lab, uplink: str | None) -> list[Finding]:
        async with self.lock:
            if self.fw is None:
                self.fw = self._new_firewall()
            listing = await asyncio.to_thread(self.fw.list_ruleset)
        try:
            bridged = BRIDGE_NF.read_text().strip() == "1"
        except OSError:
            bridged = False
        return diagnose(
            lab,
            listing,
            ip_forward=sysctl.forwarding_enabled(),
            default_route_dev=uplink,
            bridge_nf_call_iptables=bridged,
        )

    async def drift(self, lab: Lab) -> list[str]:
        async with self.lock:
            if self.fw is None:
                return []
            seen = await asyncio.to_thread(self.fw.observe, build_ruleset(lab, self.forwards))
        if seen.missing:
            return [f"nft table {f} {n} is missing" for f, n in seen.missing]
        return [] if seen.matches else ["nft tables differ from what qvmd applied"]

    def counters(self) -> dict[str, Any]:
        return self.fw.counters() if self.fw is not None else {}


def forward_dict(f: PortForward) -> dict[str, Any]:
    return {
        "proto": f.proto,
        "host_port": f.host_port,
        "guest": f.guest,
        "guest_port": f.guest_port,
        "owner_uid": f.owner_uid,
    }


def default_route_dev(routes: list[tuple[Any, str]]) -> str | None:
    for dst, dev in routes:
        if dst.prefixlen == 0:
            return dev or None
    return None
