"""The core: the lab's desired state, the reconciler and its events.

No bus imports here (design rule): the bus adapter calls these methods and
subscribes to `listeners` for signals. Everything that changes the lab goes
through the plane's lock, so a D-Bus request, a netlink-triggered repair and
a reload never interleave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qvmd import monitor
from qvmd.config import check_subnet_free, load_config
from qvmd.healer import Healer
from qvmd.links import main_routes
from qvmd.model import Lab
from qvmd.plane import NetworkPlane, TapStatus
from qvmd.state import StateStore
from qvmd.taps import Caller, TapManager, TapResult

log = logging.getLogger(__name__)


@dataclass
class Listeners:
    """Callbacks the bus adapter sets to turn core events into signals."""

    tap_added: list[Callable[[str, int], None]] = field(default_factory=list)
    tap_removed: list[Callable[[str], None]] = field(default_factory=list)
    healed: list[Callable[[str, str], None]] = field(default_factory=list)
    lab_changed: list[Callable[[], None]] = field(default_factory=list)


class Core:
    def __init__(
        self,
        lab: Lab,
        state_dir: str,
        config_path: str | None,
        default_config: str,
        sandbox: str | None,
    ) -> None:
        self.lab = lab
        self.config_path = config_path
        self.default_config = default_config
        self.sandbox = sandbox
        self.plane = NetworkPlane(lab, StateStore(state_dir))
        self.taps = TapManager(self.plane)
        self.healer = Healer(self.plane.reconcile)
        self.healer.on_repair = self._on_repair
        self.monitors: list[monitor.NetlinkMonitor] = []
        self.listeners = Listeners()
        self.lab_up = False
        self.started_at = time.time()

    # -- lifecycle -----------------------------------------------------

    async def check_host(self) -> None:
        check_subnet_free(self.lab, await self.plane.main.run(main_routes))

    async def start(self) -> list[str]:
        changes = await self.plane.reconcile()
        self.lab_up = True
        self._start_monitors()
        self.healer.start()
        return changes

    def _start_monitors(self) -> None:
        main = monitor.NetlinkMonitor(
            monitor.open_event_socket(), self.is_ours, self.healer.wake, "host"
        )
        main.start()
        self.monitors.append(main)
        if self.plane.svc is not None:
            sock = self.plane.svc.run_sync(lambda _ipr: monitor.open_event_socket())
            svc = monitor.NetlinkMonitor(
                sock, self.is_ours, self.healer.wake, self.lab.services.netns
            )
            svc.start()
            self.monitors.append(svc)

    def is_ours(self, name: str) -> bool:
        lab = self.lab
        return name in (lab.bridge, lab.services.bridge_port, lab.services.interface) or (
            self.plane.is_lab_tap_name(name)
        )

    async def stop(self) -> None:
        await self.healer.stop()
        for m in self.monitors:
            m.stop()
        self.monitors.clear()

    def close(self) -> None:
        self.plane.close()

    # -- operations ----------------------------------------------------

    async def up(self) -> list[str]:
        changes = await self.plane.reconcile()
        if not self.lab_up:
            self.lab_up = True
            self._start_monitors()
            self.healer.start()
        self._lab_changed()
        return changes

    async def down(self) -> list[str]:
        """Remove the lab but keep serving (`qvmctl up` brings it back)."""
        await self.stop()
        self.lab_up = False
        changes = await self.plane.teardown()
        self._lab_changed()
        return changes

    async def reload(self) -> list[str]:
        """Re-read the config; apply it only if it is entirely valid."""
        loaded = load_config(self.config_path, self.default_config, self.sandbox)
        new = loaded.lab
        check_subnet_free(new, await self.plane.main.run(main_routes))
        if new == self.lab:
            return await self.plane.reconcile() if self.lab_up else []
        changes = await self.plane.replace_lab(new, reconcile=self.lab_up)
        self.lab = new
        self._lab_changed()
        return changes

    async def create_tap(self, caller: Caller, name: str, **opts: Any) -> TapResult:
        result = await self.taps.create(caller, name, **opts)
        if result.created:
            for cb in self.listeners.tap_added:
                cb(result.spec.name, result.spec.uid)
        return result

    async def delete_tap(self, caller: Caller, name: str) -> None:
        await self.taps.delete(caller, name)
        for cb in self.listeners.tap_removed:
            cb(name)

    async def list_taps(self) -> list[TapStatus]:
        return await self.plane.taps()

    async def status(self) -> dict[str, Any]:
        snap = await self.plane.snapshot()
        stats = self.healer.stats
        snap["lab_up"] = self.lab_up
        snap["heal"] = {
            "passes": stats.passes,
            "repairs": stats.repairs,
            "errors": stats.errors,
            "last": [
                f"{time.strftime('%H:%M:%S', time.localtime(t))} {what}" for t, what in stats.last
            ],
        }
        return snap

    # -- events --------------------------------------------------------

    def _on_repair(self, change: str) -> None:
        what = change.split(" ", 1)[0]
        for cb in self.listeners.healed:
            cb(what, change)

    def _lab_changed(self) -> None:
        for cb in self.listeners.lab_changed:
            cb()
