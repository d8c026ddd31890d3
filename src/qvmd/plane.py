"""The network plane: desired state from the lab model, applied by reconcile.

`reconcile()` compares what the kernel has with what the lab wants and
repairs the difference — the same code path at start-up (adoption), after a
netlink event (self-healing) and after a config reload. It is serialised by
one lock, so events arriving during a reconcile just schedule another pass.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from qvmd import links, nsutil, sysctl
from qvmd.errors import Failed, QvmError
from qvmd.links import TapSpec
from qvmd.linkstate import LinkState
from qvmd.model import Lab
from qvmd.nlworker import NetlinkWorker
from qvmd.state import PlaneState, StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TapStatus:
    name: str
    uid: int | None
    gid: int | None
    multi_queue: bool
    carrier: bool  # true while a process (QEMU) holds the TAP
    up: bool
    enslaved: bool
    guest: str | None


class NetworkPlane:
    def __init__(self, lab: Lab, store: StateStore) -> None:
        self.lab = lab
        self.store = store
        self.state: PlaneState = store.load()
        self.main = NetlinkWorker(None, "nl-main")
        self.svc: NetlinkWorker | None = None
        self.lock = asyncio.Lock()

    # -- desired state -------------------------------------------------

    def desired_taps(self) -> dict[str, TapSpec]:
        """Guest TAPs from the lab (owner possibly claimed over D-Bus), plus
        the TAPs callers created; a recorded claim wins over the config."""
        names = dict.fromkeys([*(g.tap for g in self.lab.guests), *self.state.taps])
        return {name: spec for name in names if (spec := self.desired_tap(name)) is not None}

    def desired_tap(self, name: str) -> TapSpec | None:
        """One entry of desired_taps(), without building all of them."""
        claim = self.state.taps.get(name)
        guest = self.lab.guest_by_tap(name)
        if guest is None:
            return claim
        if claim is None:
            return TapSpec(guest.tap, guest.owner.uid, guest.owner.gid, guest.multi_queue)
        # The flags of a guest TAP always come from the config.
        return replace(claim, multi_queue=guest.multi_queue)

    # -- reconcile -----------------------------------------------------

    async def reconcile(self) -> list[str]:
        async with self.lock:
            return await self._reconcile()

    async def _reconcile(self) -> list[str]:
        lab = self.lab
        changes: list[str] = []
        svc = await self._services_worker(changes)
        peer_present = await svc.run(
            lambda ipr: links.lookup(ipr, lab.services.interface) is not None
        )
        changes += await self.main.run(self._reconcile_main, peer_present, self.desired_taps())
        changes += await svc.run(links.ensure_services_side, lab)
        changes += self._ensure_forwarding()
        for change in changes:
            log.info("reconcile: %s", change)
        return changes

    async def reconcile_taps(self, names: frozenset[str]) -> list[str]:
        """Reconcile only these TAPs (their own events woke us): one lookup
        each instead of reading every link of the namespace."""
        async with self.lock:
            changes = await self.main.run(self._reconcile_taps, names, self.desired_taps())
        for change in changes:
            log.info("reconcile: %s", change)
        return changes

    def _reconcile_taps(
        self, ipr: Any, names: frozenset[str], taps: dict[str, TapSpec]
    ) -> list[str]:
        bridge = links.lookup(ipr, self.lab.bridge)
        if bridge is None:
            # The bridge itself is gone: its own event asks for a full pass.
            return []
        changes: list[str] = []
        for name in sorted(names):
            cur = links.lookup(ipr, name)
            spec = taps.get(name)
            if spec is not None:
                try:
                    changes += links.ensure_tap(ipr, self.lab.bridge, bridge.index, spec, cur)
                except QvmError as exc:
                    log.error("reconcile: %s", exc)
            elif cur is not None and self._is_stray(name, cur) and links.delete_link(ipr, name):
                changes.append(f"removed stray TAP {name} (no claim for it)")
        return changes

    def _is_stray(self, name: str, cur: LinkState) -> bool:
        """A lab-named TAP nobody asked for: left by a qvmd killed between
        making it and recording the claim (or between forgetting the claim and
        deleting it). Ours by name; idle, so nobody loses it."""
        return (
            cur.tun is not None
            and cur.tun.is_tap
            and not cur.carrier
            and self.is_lab_tap_name(name)
        )

    async def _services_worker(self, changes: list[str]) -> NetlinkWorker:
        name = self.lab.services.netns
        if nsutil.create(name):
            changes.append(f"created namespace {name}")
            # A worker bound to a deleted namespace would keep the dead one alive.
            self._close_svc()
        if self.svc is None:
            self.svc = NetlinkWorker(name, "nl-svc")
        return self.svc

    def _reconcile_main(self, ipr: Any, peer_present: bool, taps: dict[str, TapSpec]) -> list[str]:
        lab = self.lab
        have = links.snapshot(ipr)
        changes = links.ensure_bridge(ipr, lab, have.get(lab.bridge))
        bridge = links.lookup(ipr, lab.bridge)
        if bridge is None:
            raise Failed(f"bridge {lab.bridge} vanished during reconcile")
        changes += links.ensure_veth_pair(
            ipr, lab, have.get(lab.services.bridge_port), peer_present
        )
        for spec in taps.values():
            try:
                changes += links.ensure_tap(
                    ipr, lab.bridge, bridge.index, spec, have.get(spec.name)
                )
            except QvmError as exc:
                # One bad TAP (a foreign device with our name: Failed; one in
                # use with the wrong flags or owner: Busy) must not stop the
                # rest of the lab.
                log.error("reconcile: %s", exc)
        for name, cur in sorted(have.items()):
            if name not in taps and self._is_stray(name, cur) and links.delete_link(ipr, name):
                changes.append(f"removed stray TAP {name} (no claim for it)")
        return changes

    def _ensure_forwarding(self) -> list[str]:
        if sysctl.forwarding_enabled():
            return []
        sysctl.set_forwarding(True)
        if not self.state.forwarding_restore:
            self.state.forwarding_restore = True
            self.store.save(self.state)
        return ["enabled IPv4 forwarding"]

    # -- observation ---------------------------------------------------

    async def taps(self) -> list[TapStatus]:
        have: dict[str, LinkState] = await self.main.run(links.snapshot)
        bridge = have.get(self.lab.bridge)
        out = []
        for name, cur in sorted(have.items()):
            if cur.tun is None or not self.is_lab_tap_name(name):
                continue
            guest = self.lab.guest_by_tap(name)
            out.append(
                TapStatus(
                    name=name,
                    uid=cur.tun.owner,
                    gid=cur.tun.group,
                    multi_queue=cur.tun.multi_queue,
                    carrier=cur.carrier,
                    up=cur.up,
                    enslaved=bridge is not None and cur.master == bridge.index,
                    guest=guest.name if guest else None,
                )
            )
        return out

    def is_lab_tap_name(self, name: str) -> bool:
        rest = name[len(self.lab.tap_prefix) :] if name.startswith(self.lab.tap_prefix) else ""
        return rest.isdigit() and rest.isascii()

    async def snapshot(self) -> dict[str, Any]:
        """Observed state of everything the lab owns, for status and the demo."""
        lab = self.lab
        have = await self.main.run(links.snapshot)
        bridge = have.get(lab.bridge)
        svc_side: LinkState | None = None
        gateway = None
        if nsutil.exists(lab.services.netns) and self.svc is not None:
            svc_side = await self.svc.run(links.lookup, lab.services.interface)
            gateway = await self.svc.run(links.default_gateway)
        return {
            "bridge": {
                "name": lab.bridge,
                "present": bridge is not None,
                "up": bool(bridge and bridge.up),
                "mac": bridge.mac if bridge else "",
                "addresses": [str(a) for a in bridge.addresses] if bridge else [],
            },
            "taps": await self.taps(),
            "services": {
                "netns": lab.services.netns,
                "present": nsutil.exists(lab.services.netns),
                "interface": lab.services.interface,
                "addresses": [str(a) for a in svc_side.addresses] if svc_side else [],
                "up": bool(svc_side and svc_side.up),
                "gateway": str(gateway) if gateway else "",
            },
            "forwarding": sysctl.forwarding_enabled(),
            "drift": link_drift(
                lab, self.desired_taps(), have, svc_side, gateway, sysctl.forwarding_enabled()
            ),
        }

    # -- teardown ------------------------------------------------------

    async def teardown(self) -> list[str]:
        """Remove exactly what qvmd owns: lab TAPs, the veth, the bridge, the
        services namespace; restore forwarding only if we turned it on."""
        async with self.lock:
            return await self._teardown()

    async def _teardown(self) -> list[str]:
        changes: list[str] = await self.main.run(self._teardown_main)
        self._close_svc()
        if nsutil.remove(self.lab.services.netns):
            changes.append(f"removed namespace {self.lab.services.netns}")
        if self.state.forwarding_restore:
            sysctl.set_forwarding(False)
            changes.append("restored IPv4 forwarding to off")
        # Certificates outlive the lab's links, and so do their owners.
        self.state = PlaneState(cert_owners=self.state.cert_owners)
        self.store.save(self.state)
        for change in changes:
            log.info("teardown: %s", change)
        return changes

    async def replace_lab(self, new: Lab, reconcile: bool) -> list[str]:
        """Switch to a new (validated) lab model.

        A different bridge, subnet, services end or TAP prefix rebuilds the
        lab from scratch (the old objects would otherwise linger under old
        names). A change of guests only removes the TAPs of guests that are
        gone — unless a process holds one or a caller claimed it.
        """
        async with self.lock:
            old = self.lab
            changes: list[str] = []
            if (old.bridge, old.gateway, old.services, old.tap_prefix) != (
                new.bridge,
                new.gateway,
                new.services,
                new.tap_prefix,
            ):
                changes += await self._teardown()
            else:
                kept = {g.tap for g in new.guests} | set(self.state.taps)
                for gone in sorted({g.tap for g in old.guests} - kept):
                    if await self.main.run(self._delete_idle_tap, gone):
                        changes.append(f"removed TAP {gone} of a guest no longer configured")
            self.lab = new
            if reconcile:
                changes += await self._reconcile()
            return changes

    @staticmethod
    def _delete_idle_tap(ipr: Any, name: str) -> bool:
        cur = links.lookup(ipr, name)
        if cur is None or cur.tun is None or cur.carrier:
            return False
        return links.delete_link(ipr, name)

    def _teardown_main(self, ipr: Any) -> list[str]:
        lab = self.lab
        changes = []
        have = links.snapshot(ipr)
        for name, cur in sorted(have.items()):
            if cur.tun is not None and cur.tun.is_tap and self.is_lab_tap_name(name):
                links.delete_link(ipr, name)
                changes.append(f"removed TAP {name}")
        for name, kind in ((lab.services.bridge_port, "veth"), (lab.bridge, "bridge")):
            link = have.get(name)
            if link is not None and link.kind == kind and links.delete_link(ipr, name):
                changes.append(f"removed {kind} {name}")
        return changes

    # -- lifecycle -----------------------------------------------------

    def _close_svc(self) -> None:
        if self.svc is not None:
            self.svc.close()
            self.svc = None

    def close(self) -> None:
        self._close_svc()
        self.main.close()


def link_drift(
    lab: Lab,
    taps: dict[str, TapSpec],
    have: dict[str, LinkState],
    svc_side: LinkState | None,
    gateway: IPv4Address | None,
    forwarding: bool,
) -> list[str]:
    """What differs from the desired state right now, one line each (pure).

    Normally empty: the healer repairs within milliseconds. What stays is
    what cannot be repaired (a TAP in use with other flags, a foreign
    device with our name) or what a repair is waiting for (backoff).
    """
    out = []
    bridge = have.get(lab.bridge)
    if bridge is None or bridge.kind != "bridge":
        out.append(
            f"bridge {lab.bridge} is missing"
            if bridge is None
            else f"{lab.bridge} is a {bridge.kind}, not a bridge"
        )
    else:
        if not bridge.up:
            out.append(f"bridge {lab.bridge} is down")
        if lab.gateway not in bridge.addresses:
            out.append(f"bridge {lab.bridge} lacks {lab.gateway}")
    for name, spec in sorted(taps.items()):
        cur = have.get(name)
        if cur is None or cur.tun is None:
            out.append(f"TAP {name} is missing" if cur is None else f"{name} is not a TAP")
            continue
        if cur.tun.owner != spec.uid:
            out.append(f"TAP {name} is owned by uid {cur.tun.owner}, not {spec.uid}")
        if cur.tun.multi_queue != spec.multi_queue:
            out.append(f"TAP {name} has multi_queue={cur.tun.multi_queue}")
        if bridge is None or cur.master != bridge.index:
            out.append(f"TAP {name} is not on {lab.bridge}")
        if not cur.up:
            out.append(f"TAP {name} is down")
    svc = lab.services
    if svc_side is None:
        out.append(f"{svc.netns}/{svc.interface} is missing")
    else:
        if IPv4Interface(f"{svc.address}/{lab.subnet.prefixlen}") not in svc_side.addresses:
            out.append(f"{svc.netns}/{svc.interface} lacks {svc.address}")
        if gateway != lab.gateway.ip:
            out.append(f"{svc.netns} has no default route via {lab.gateway.ip}")
    port = have.get(svc.bridge_port)
    if port is None or bridge is None or port.master != bridge.index:
        out.append(f"{svc.bridge_port} is not on {lab.bridge}")
    if not forwarding:
        out.append("IPv4 forwarding is off")
    return out
