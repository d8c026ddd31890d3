"""TAP requests from callers: who may get, keep and remove which TAP.

The rules (docs/api.md has them for users):
- a TAP name must be `<prefix><N>` and a valid kernel name; nothing else is
  ever created or touched, whatever the caller's rights;
- the caller's TAP is owned by the caller's uid (from the bus daemon, never
  from an argument — only an admin may name another owner);
- asking again for a TAP you own is success; one someone else owns is Busy;
- the lab's guest TAPs exist from the start, owned by `taps.owner` (root by
  default). A caller may *claim* one that root owns while no process holds
  it: it becomes theirs (recorded, so it survives restarts) until they
  delete it, which hands it back (the guest TAP itself stays);
- a TAP a process holds (carrier on) is never deleted on request: that would
  cut a running guest off.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from qvmd import links
from qvmd.config import check_tap_name
from qvmd.errors import Busy, InvalidArgument, NotFound, PermissionDenied
from qvmd.links import TapSpec
from qvmd.names import validate_ifname
from qvmd.plane import NetworkPlane

log = logging.getLogger(__name__)

MAX_TAPS_PER_UID = 64  # beyond the guest TAPs; stops one user from exhausting the host


@dataclass(frozen=True)
class Caller:
    """Who asks. Whether they are an administrator is looked up only when a
    rule needs it (another owner, someone else's TAP, the per-user limit):
    each answer is a polkit round trip (~2 ms), and the common request —
    a user's own TAP — needs none."""

    uid: int
    is_admin: Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class TapResult:
    spec: TapSpec
    created: bool  # False: it existed already and is the caller's (idempotent)
    guest: str | None


class TapManager:
    def __init__(self, plane: NetworkPlane) -> None:
        self.plane = plane

    def validate_name(self, name: object) -> str:
        checked = validate_ifname(name, "TAP name")
        check_tap_name(checked, self.plane.lab.tap_prefix)
        return checked

    async def create(
        self,
        caller: Caller,
        name: str,
        multi_queue: bool | None = None,
        owner_uid: int | None = None,
        owner_gid: int | None = None,
    ) -> TapResult:
        name = self.validate_name(name)
        if (owner_uid is not None or owner_gid is not None) and not await caller.is_admin():
            raise PermissionDenied("only an administrator may create a TAP for another owner")
        uid = caller.uid if owner_uid is None else owner_uid
        plane = self.plane
        guest = plane.lab.guest_by_tap(name)
        async with plane.lock:
            current = plane.desired_tap(name)
            if guest is not None:
                mq = guest.multi_queue
                if multi_queue is not None and multi_queue != mq:
                    raise InvalidArgument(
                        f"{name} is guest {guest.name}'s TAP; its multi_queue is set by the config"
                    )
            else:
                mq = bool(multi_queue)
            if (
                current is not None
                and current.uid == uid
                and current.multi_queue == mq
                and (owner_gid is None or current.gid == owner_gid)
            ):
                # Already the caller's: make sure it is really there, idempotently.
                await self._apply(current)
                return TapResult(current, False, guest.name if guest else None)
            if current is not None:
                claimable = guest is not None and current.uid == guest.owner.uid == 0
                if not claimable and not await caller.is_admin():
                    raise Busy(f"{name} belongs to another user")
            else:
                owned = [t for t in plane.state.taps.values() if t.uid == uid]
                mine = [t for t in owned if not plane.lab.guest_by_tap(t.name)]
                if len(mine) >= MAX_TAPS_PER_UID and not await caller.is_admin():
                    raise Busy(f"you already have {len(mine)} TAPs (limit {MAX_TAPS_PER_UID})")
            gid = owner_gid if owner_gid is not None else (guest.owner.gid if guest else None)
            spec = TapSpec(name, uid, gid, mq)
            await self._apply(spec, refuse_held=True)
            plane.state.taps[name] = spec
            plane.store.save(plane.state)
        log.info("TAP %s now owned by uid %d", name, uid, extra={"QVM_TAP": name, "QVM_UID": uid})
        return TapResult(spec, current is None, guest.name if guest else None)

    async def _apply(self, spec: TapSpec, refuse_held: bool = False) -> None:
        """Make the TAP as `spec` says, in one trip to the netlink thread.

        refuse_held: a TAP that a process holds under another owner is Busy
        (changing its owner would not take it from that process anyway)."""
        plane = self.plane

        def apply(ipr: object) -> list[str]:
            bridge = links.lookup(ipr, plane.lab.bridge)
            if bridge is None:
                raise Busy(f"the lab is down (no bridge {plane.lab.bridge}); run 'qvmctl up'")
            cur = links.lookup(ipr, spec.name)
            tun = cur.tun if cur is not None and cur.carrier else None
            if refuse_held and tun is not None and tun.owner != spec.uid:
                raise Busy(f"{spec.name} is in use by a running process")
            return links.ensure_tap(ipr, plane.lab.bridge, bridge.index, spec, cur)

        await plane.main.run(apply)

    async def delete(self, caller: Caller, name: str) -> bool:
        """Delete (or, for a guest TAP, hand back) a TAP; True if it existed."""
        name = self.validate_name(name)
        plane = self.plane
        guest = plane.lab.guest_by_tap(name)
        async with plane.lock:
            spec = plane.desired_tap(name)
            cur = await plane.main.run(links.lookup, name)
            if spec is None and cur is None:
                raise NotFound(f"no TAP {name}")
            owner = spec.uid if spec else (cur.tun.owner if cur and cur.tun else None)
            if owner != caller.uid and not await caller.is_admin():
                raise PermissionDenied(f"{name} is not yours")
            if cur is not None and cur.carrier:
                raise Busy(f"{name} is in use by a running process; stop it first")
            plane.state.taps.pop(name, None)
            plane.store.save(plane.state)
            if guest is not None:
                # A guest TAP is part of the lab: give it back to its configured owner.
                back = TapSpec(name, guest.owner.uid, guest.owner.gid, guest.multi_queue)
                await self._apply(back)
            elif cur is not None and cur.tun is not None:
                await plane.main.run(links.delete_link, name)
        log.info(
            "TAP %s released by uid %d",
            name,
            caller.uid,
            extra={"QVM_TAP": name, "QVM_UID": caller.uid},
        )
        return True
