"""Make the host resolve guest names: register the lab's DNS server and
routing domain on the bridge with systemd-resolved (SetLinkDNS /
SetLinkDomains).

resolved forgets a link's settings when the link goes away and all of them
when it restarts, so registration is repeated whenever the bridge is
re-created (`register`, called by the core) and whenever resolve1 gets a new
owner on the bus (NameOwnerChanged).

An ifindex only means something inside one network namespace. resolved is
told about the bridge only when it runs in the namespace that holds the lab
(compared through /proc/<pid>/ns/net): a sandboxed qvmd on the host's bus
must not set DNS servers on whichever host link shares the bridge's index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from qvmd.bus.busdaemon import DBUS_INTERFACE, DBUS_NAME, DBUS_PATH, call
from qvmd.errors import Failed
from qvmd.model import Lab

log = logging.getLogger(__name__)

RESOLVE_NAME = "org.freedesktop.resolve1"
RESOLVE_PATH = "/org/freedesktop/resolve1"
RESOLVE_MANAGER = "org.freedesktop.resolve1.Manager"
TIMEOUT = 5.0
_MATCH_OWNER = (
    f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_INTERFACE}',"
    f"member='NameOwnerChanged',arg0='{RESOLVE_NAME}'"
)


class ResolvedRegistration:
    """One per daemon; `state` is what status and doctor report.

    `lab_netns`: the namespace file of the lab (/run/netns/<name> in a
    sandbox, /proc/self/ns/net otherwise); `sandboxed`: whether that is not
    qvmd's own namespace (then an unverifiable resolved is left alone).
    """

    def __init__(self, bus: MessageBus, lab_netns: str, sandboxed: bool) -> None:
        self.bus = bus
        self.lab_netns = lab_netns
        self.sandboxed = sandboxed
        self.state = "not tried"
        self._target: tuple[Lab, int] | None = None
        self._watching = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def register(self, lab: Lab, ifindex: int) -> None:
        """Route ~domain to the services address on the bridge; never raises."""
        self._target = (lab, ifindex)
        try:
            await self._watch()
        except Failed as exc:
            log.warning("systemd-resolved: cannot watch for its restarts: %s", exc)
        await self._apply()

    async def stop(self) -> None:
        if self._watching:
            self.bus.remove_message_handler(self._on_message)
            with contextlib.suppress(Failed):  # match rules die with the connection anyway
                await self._bus_daemon("RemoveMatch", "s", [_MATCH_OWNER], "")
            self._watching = False
        for task in list(self._tasks):
            task.cancel()

    async def _apply(self) -> None:
        if self._target is None:
            return
        lab, ifindex = self._target
        try:
            pid = await self._resolved_pid()
            if pid is None:
                self.state = "systemd-resolved is not running"
                return
            where = self._same_netns(pid)
            if where is not True:
                self.state = f"not registered: {where}"
                log.info("systemd-resolved: %s", self.state)
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

    def _same_netns(self, pid: int) -> bool | str:
        """True, or why resolved is not (or cannot be shown to be) in the lab's namespace."""
        try:
            theirs = os.stat(f"/proc/{pid}/ns/net")
            ours = os.stat(self.lab_netns)
        except OSError as exc:
            # Reading another user's namespace needs ptrace rights, which a
            # hardened unit may lack: then trust the usual set-up (both in
            # the host's namespace) unless the lab is sandboxed.
            if not self.sandboxed:
                return True
            return f"cannot tell which network namespace systemd-resolved is in ({exc.strerror})"
        if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
            return True
        return "systemd-resolved runs in another network namespace than the lab"

    async def _resolved_pid(self) -> int | None:
        (present,) = await self._bus_daemon("NameHasOwner", "s", [RESOLVE_NAME], "b")
        if not present:
            return None
        (pid,) = await self._bus_daemon("GetConnectionUnixProcessID", "s", [RESOLVE_NAME], "u")
        return pid if isinstance(pid, int) else None

    async def _watch(self) -> None:
        if not self._watching:
            self.bus.add_message_handler(self._on_message)
            self._watching = True
            await self._bus_daemon("AddMatch", "s", [_MATCH_OWNER], "")

    def _on_message(self, msg: Message) -> None:
        if (
            msg.message_type is MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.interface == DBUS_INTERFACE
            and msg.body
            and msg.body[0] == RESOLVE_NAME
        ):
            if not msg.body[2]:
                self.state = "systemd-resolved is not running"
                return
            log.info("systemd-resolved (re)started; registering the lab again")
            task = asyncio.get_running_loop().create_task(self._apply())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _bus_daemon(
        self, member: str, signature: str, body: list[object], reply: str
    ) -> list[Any]:
        target = (DBUS_NAME, DBUS_PATH, DBUS_INTERFACE, "bus daemon did not answer")
        return await self._call(target, member, signature, body, reply)

    async def _manager(self, member: str, signature: str, body: list[object]) -> None:
        target = (RESOLVE_NAME, RESOLVE_PATH, RESOLVE_MANAGER, "systemd-resolved did not answer")
        await self._call(target, member, signature, body, "")

    async def _call(
        self,
        target: tuple[str, str, str, str],
        member: str,
        signature: str,
        body: list[object],
        reply: str,
    ) -> list[Any]:
        name, path, interface, unavailable = target
        msg = Message(
            destination=name,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
        )
        return await call(self.bus, msg, TIMEOUT, unavailable, reply)
