"""Connects the core to the system bus: name, dispatch, signals."""

from __future__ import annotations

import logging

from dbus_fast import BusType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag

from qvmd import nsutil
from qvmd.bus.api import ADMIN_ACTION, BUS_NAME, OBJECT_PATH, build_interface
from qvmd.bus.polkit import Authority
from qvmd.bus.resolved import ResolvedRegistration
from qvmd.bus.service import BusService, install_backpressure
from qvmd.core import Core
from qvmd.errors import Failed
from qvmd.firewall.firewalld import FirewalldBinding

log = logging.getLogger(__name__)


class BusServer:
    def __init__(self, core: Core, address: str) -> None:
        self.core = core
        self.address = address
        self.bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM)
        self.service: BusService | None = None
        self.firewalld: FirewalldBinding | None = None
        self.resolved: ResolvedRegistration | None = None

    async def start(self) -> None:
        try:
            await self.bus.connect()
        except Exception as exc:
            raise Failed(f"cannot connect to the system bus at {self.address}: {exc}") from None
        install_backpressure(self.bus)
        self.service = BusService(
            self.bus, OBJECT_PATH, build_interface(self.core), Authority(self.bus), ADMIN_ACTION
        )
        self.service.export()
        reply = await self.bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            self.bus.disconnect()
            raise Failed(f"cannot own {BUS_NAME} ({reply.name}): is another qvmd running?")
        svc = self.service
        listeners = self.core.listeners
        listeners.tap_added.append(lambda name, uid: svc.emit("TapAdded", name, uid))
        listeners.tap_removed.append(lambda name: svc.emit("TapRemoved", name))
        listeners.healed.append(lambda what, detail: svc.emit("Healed", what, detail))
        self.core.services.on_lease_change.append(
            lambda c: svc.emit(
                "LeaseChanged", c.kind, c.lease.mac, str(c.lease.ip), c.lease.hostname or ""
            )
        )
        sandbox = self.core.sandbox
        resolved = ResolvedRegistration(
            self.bus,
            nsutil.netns_path(sandbox) if sandbox else "/proc/self/ns/net",
            sandboxed=sandbox is not None,
        )
        self.resolved = resolved
        self.core.bridge_hooks.append(lambda index: resolved.register(self.core.lab, index))
        self.core.host_resolution = lambda: resolved.state
        if sandbox is None:
            # firewalld (when it runs) must let the lab through: bind the
            # bridge to a zone like libvirt does; undone by teardown only.
            firewalld = FirewalldBinding(self.bus, self.core.lab.bridge)
            self.firewalld = firewalld
            # start() binds and watches firewalld's reloads; idempotent, so
            # it also serves `qvmctl up` after a `down` unbound us.
            self.core.bridge_hooks.append(lambda _index: firewalld.start())
            self.core.teardown_hooks.append(lambda: firewalld.stop(unbind=True))
        listeners.lab_changed.append(
            lambda: svc.properties_changed("Bridge", "Gateway", "Domain", "LabUp")
        )
        log.info("serving %s on %s", BUS_NAME, self.address)

    async def stop(self) -> None:
        if self.resolved is not None:
            await self.resolved.stop()
        if self.firewalld is not None:
            await self.firewalld.stop(unbind=False)  # a restart adopts the binding
        if self.service is not None:
            for task in list(self.service.tasks):
                task.cancel()
        self.bus.disconnect()
