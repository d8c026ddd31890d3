"""Make the host resolve guest names: register the lab's DNS server and
routing domain on the bridge with systemd-resolved (SetLinkDNS /
SetLinkDomains), and again whenever the bridge is re-created (resolved
forgets a link's settings when the link goes away).
"""

from __future__ import annotations

import logging
import socket

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from qvmd.bus.busdaemon import DBUS_INTERFACE, DBUS_NAME, DBUS_PATH, call
from qvmd.errors import Failed
from qvmd.model import Lab

log = logging.getLogger(__name__)

RESOLVE_NAME = "org.freedesktop.resolve1"
RESOLVE_PATH = "/org/freedesktop/resolve1"
RESOLVE_MANAGER = "org.freedesktop.resolve1.Manager"
TIMEOUT = 5.0


class ResolvedRegistration:
    """One per daemon; `state` is what status and doctor report."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.state = "not tried"

    async def present(self) -> bool:
        body = await call(
            self.bus,
            Message(
                destination=DBUS_NAME,
                path=DBUS_PATH,
                interface=DBUS_INTERFACE,
                member="NameHasOwner",
                signature="s",
                body=[RESOLVE_NAME],
            ),
            TIMEOUT,
            "bus daemon did not answer",
            "b",
        )
        return bool(body[0])

    async def register(self, lab: Lab, ifindex: int) -> None:
        """Route ~domain to the services address on the bridge; never raises."""
        try:
            if not await self.present():
                self.state = "systemd-resolved is not running"
                return
            dns = [[socket.AF_INET, lab.services.address.packed]]
            await self._manager("SetLinkDNS", "ia(iay)", [ifindex, dns])
            # True: a routing-only domain ("~qvm0.lan"): only lab names go there.
            await self._manager("SetLinkDomains", "ia(sb)", [ifindex, [[lab.domain, True]]])
            self.state = f"registered {lab.services.address} for ~{lab.domain} on {lab.bridge}"
            log.info("systemd-resolved: %s", self.state)
        except Failed as exc:
            self.state = f"failed: {exc}"
            log.warning("systemd-resolved registration %s", self.state)

    async def _manager(self, member: str, signature: str, body: list[object]) -> None:
        msg = Message(
            destination=RESOLVE_NAME,
            path=RESOLVE_PATH,
            interface=RESOLVE_MANAGER,
            member=member,
            signature=signature,
            body=body,
        )
        await call(self.bus, msg, TIMEOUT, "systemd-resolved did not answer", "")
