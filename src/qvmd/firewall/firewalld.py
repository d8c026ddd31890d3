"""Living beside firewalld: keep the lab bridge in a zone that lets the lab work.

firewalld's own nft table drops forwarded traffic between zones, and a
packet dropped there is dropped whatever our table accepts. So while
firewalld runs, the bridge is bound (runtime only, never the permanent
configuration) to the `trusted` zone, whose ACCEPT target lets traffic
from the lab through firewalld's input and forward chains. Our own table
still decides what the lab may do; firewalld only stops vetoing it. This is
what libvirt does with its `libvirt` zone, minus the zone file: qvmd
installs nothing into firewalld's configuration.

A runtime binding is lost when firewalld reloads or restarts, so
`start()` subscribes to firewalld's `Reloaded` signal and to the bus's
`NameOwnerChanged` for firewalld's name and binds again each time.

If the user has put the bridge in another zone themselves, that choice
wins: we leave it and say so in the log. `unbind()` removes only a binding
we made or adopted (the bridge already in our zone, e.g. from before a
qvmd restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from qvmd.errors import Failed
from qvmd.names import validate_ifname

log = logging.getLogger(__name__)

FIREWALLD = "org.fedoraproject.FirewallD1"
FIREWALLD_PATH = "/org/fedoraproject/FirewallD1"
ZONE_IFACE = f"{FIREWALLD}.zone"
DEFAULT_ZONE = "trusted"

_DBUS = "org.freedesktop.DBus"
_MATCH_RELOADED = f"type='signal',sender='{FIREWALLD}',interface='{FIREWALLD}',member='Reloaded'"
_MATCH_OWNER = (
    f"type='signal',sender='{_DBUS}',interface='{_DBUS}',member='NameOwnerChanged',"
    f"arg0='{FIREWALLD}'"
)


class FirewalldBinding:
    """The bridge's membership of a firewalld zone, kept while firewalld runs."""

    def __init__(self, bus: MessageBus, bridge: str, zone: str = DEFAULT_ZONE) -> None:
        self._bus = bus
        self.bridge = validate_ifname(bridge, "bridge name")
        self.zone = zone
        # True while the binding in firewalld's runtime is one we made.
        self.bound_by_us = False
        self._watching = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def _call(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        destination: str = FIREWALLD,
        path: str = FIREWALLD_PATH,
        interface: str = ZONE_IFACE,
    ) -> list[Any]:
        reply = await self._bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
            )
        )
        assert reply is not None  # a method call always gets a reply
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise Failed(f"firewalld {member}: {reply.error_name}: {detail}")
        return list(reply.body)

    async def running(self) -> bool:
        (has,) = await self._call(
            "NameHasOwner",
            "s",
            [FIREWALLD],
            destination=_DBUS,
            path="/org/freedesktop/DBus",
            interface=_DBUS,
        )
        return bool(has)

    async def zone_of_bridge(self) -> str:
        """The bridge's zone in firewalld's runtime; "" if none."""
        (zone,) = await self._call("getZoneOfInterface", "s", [self.bridge])
        return str(zone)

    async def bind(self) -> bool:
        """Put the bridge in our zone if firewalld runs; True if we changed anything."""
        if not await self.running():
            self.bound_by_us = False
            return False
        current = await self.zone_of_bridge()
        if current == self.zone:
            # Adopt it: most likely ours from before a qvmd restart (the
            # binding outlives us unless teardown removed it).
            self.bound_by_us = True
            return False
        if current:
            log.warning(
                "firewalld has %s in zone %r (not set by qvmd); leaving it. If lab traffic "
                "is dropped, move it to a zone that accepts forwarding, e.g. %r",
                self.bridge,
                current,
                self.zone,
            )
            return False
        await self._call("addInterface", "ss", [self.zone, self.bridge])
        self.bound_by_us = True
        log.info("firewalld: bound %s to zone %r (runtime)", self.bridge, self.zone)
        return True

    async def unbind(self) -> bool:
        """Undo our binding (only ours); True if something was removed."""
        if not self.bound_by_us:
            return False
        self.bound_by_us = False
        if not await self.running() or await self.zone_of_bridge() != self.zone:
            return False
        await self._call("removeInterface", "ss", [self.zone, self.bridge])
        log.info("firewalld: removed %s from zone %r", self.bridge, self.zone)
        return True

    async def start(self) -> None:
        """Bind now and again whenever firewalld reloads or (re)starts."""
        if not self._watching:
            self._bus.add_message_handler(self._on_message)
            for rule in (_MATCH_RELOADED, _MATCH_OWNER):
                await self._call(
                    "AddMatch",
                    "s",
                    [rule],
                    destination=_DBUS,
                    path="/org/freedesktop/DBus",
                    interface=_DBUS,
                )
            self._watching = True
        await self.bind()

    async def stop(self, unbind: bool = True) -> None:
        """Stop watching; by default also undo our binding (teardown)."""
        if self._watching:
            self._bus.remove_message_handler(self._on_message)
            for rule in (_MATCH_RELOADED, _MATCH_OWNER):
                # A failure is harmless: match rules die with the connection.
                with contextlib.suppress(Failed):
                    await self._call(
                        "RemoveMatch",
                        "s",
                        [rule],
                        destination=_DBUS,
                        path="/org/freedesktop/DBus",
                        interface=_DBUS,
                    )
            self._watching = False
        for task in list(self._tasks):
            task.cancel()
        if unbind:
            await self.unbind()

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.interface == FIREWALLD and msg.member == "Reloaded":
            reason = "reloaded"
        elif (
            msg.interface == _DBUS
            and msg.member == "NameOwnerChanged"
            and msg.body
            and msg.body[0] == FIREWALLD
        ):
            if not msg.body[2]:
                self.bound_by_us = False  # firewalld stopped; its runtime state is gone
                return
            reason = "started"
        else:
            return
        # A reload or restart drops runtime bindings; bind() re-adds ours
        # (and keeps bound_by_us if firewalld kept it).
        task = asyncio.get_running_loop().create_task(self._rebind(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rebind(self, reason: str) -> None:
        try:
            await self.bind()
        except Failed as e:
            log.error(
                "firewalld %s; binding %s to %r failed: %s", reason, self.bridge, self.zone, e
            )
