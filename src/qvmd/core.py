"""The core: the lab's desired state, the reconciler and its events.

No bus imports here (design rule): the bus adapter calls these methods and
subscribes to `listeners` for signals. Everything that changes the lab goes
through the plane's lock, so a D-Bus request, a netlink-triggered repair and
a reload never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from qvmd import monitor, nsutil
from qvmd.certs import CertService
from qvmd.config import check_state_dependent, check_subnet_free, load_config
from qvmd.firewall.service import FirewallService, default_route_dev, forward_dict
from qvmd.fsutil import sweep_stale_temp_files
from qvmd.healer import Healer
from qvmd.hostservices import HostServices
from qvmd.links import lookup, main_routes
from qvmd.model import Lab
from qvmd.plane import NetworkPlane, TapStatus
from qvmd.services.supervisor import terminate_stale
from qvmd.state import StateStore
from qvmd.taps import Caller, TapManager, TapResult

log = logging.getLogger(__name__)

PERIODIC_CHECK_SECONDS = 30.0


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
        self.services = HostServices(lab, state_dir)
        self.firewall = FirewallService(state_dir)
        self.certs = CertService(
            lambda: self.services.pki, lambda: self.lab, lambda: self.plane.state, self.plane.store
        )
        self.healer = Healer(self._heal)
        self.healer.on_repair = self._on_repair
        self.monitors: list[monitor.NetlinkMonitor | monitor.NftMonitor] = []
        self.svc_monitors: list[monitor.NetlinkMonitor | monitor.NftMonitor] = []
        self.listeners = Listeners()
        self.lab_up = False
        # Called with the bridge's ifindex whenever it is (re)created: the
        # bus side registers it with systemd-resolved.
        self.bridge_hooks: list[Callable[[int], Awaitable[None]]] = []
        # Called before the lab is torn down (firewalld binding, ...).
        self.teardown_hooks: list[Callable[[], Awaitable[None]]] = []
        self._periodic: asyncio.Task[None] | None = None
        self.host_resolution: Callable[[], str] = lambda: "no system bus (started with --no-bus)"

    # -- lifecycle -----------------------------------------------------

    async def check_host(self) -> None:
        check_subnet_free(self.lab, await self.plane.main.run(main_routes))

    async def start(self) -> list[str]:
        state = self.plane.store.dir
        for directory in (state, state / "dnsmasq", state / "ganesha"):
            for path in sweep_stale_temp_files(directory):
                log.info("removed %s, left by a qvmd killed while writing it", path)
        changes = await self.plane.reconcile()
        self.firewall.load(self.lab)
        # The first pass of a new process always re-applies the tables (it
        # cannot know their content is its own); the replace is atomic, so
        # guests see no gap. Logged, not counted as a change of the lab.
        for change in await self.firewall.ensure(self.lab, bridge_created=True):
            log.info("firewall: %s", change)
        await self.services.start()
        await self._bridge_created()
        self.lab_up = True
        self._start_monitors()
        self.healer.start()
        self._periodic = asyncio.create_task(self._periodic_check(), name="periodic-check")
        return changes

    async def _periodic_check(self) -> None:
        # Some drift sends no event: a deleted services namespace (processes
        # in it keep it alive, so no link goes away) — checked every second
        # with one stat(); anything else (a TAP's owner changed by hand) — a
        # full pass every PERIODIC_CHECK_SECONDS, a few milliseconds each.
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            if not nsutil.exists(self.lab.services.netns):
                self.healer.wake(f"namespace {self.lab.services.netns} is gone")
            elif ticks % int(PERIODIC_CHECK_SECONDS) == 0:
                self.healer.wake("periodic check")

    async def _heal(self, taps: frozenset[str] | None = None) -> list[str]:
        """One healer pass; `taps`: only those TAPs had events (a cheap pass)."""
        if taps is not None:
            return await self.plane.reconcile_taps(taps)
        changes = await self.plane.reconcile()
        bridge_created = any(c.startswith("created bridge") for c in changes)
        changes += await self.firewall.ensure(self.lab, bridge_created)
        if bridge_created:
            await self._bridge_created()
        if any(c.startswith("created namespace") for c in changes):
            await self.services.namespace_recreated()
            self._start_services_monitors()
            changes.append("restarted host services in the new services namespace")
        elif await self.services.ensure_redirect():
            changes.append("re-applied the DNS :5300 redirect in the services namespace")
        return changes

    def _start_monitors(self) -> None:
        main = monitor.NetlinkMonitor(
            monitor.open_event_socket(),
            self.is_ours,
            self.healer.wake,
            "host",
            is_tap=self.plane.is_lab_tap_name,
        )
        main.on_lost_tap = self._tap_lost
        main.start()
        self.monitors.append(main)
        nft = monitor.NftMonitor(monitor.open_nft_event_socket(), self.healer.wake)
        nft.start()
        self.monitors.append(nft)
        self._start_services_monitors()

    def _start_services_monitors(self) -> None:
        """Links and nft (the :5300 redirect) inside the services namespace:
        the sockets are opened on that namespace's worker thread."""
        for m in self.svc_monitors:
            m.stop()
        self.svc_monitors = []
        if self.plane.svc is None:
            return
        where = self.lab.services.netns
        links_sock = self.plane.svc.run_sync(lambda _ipr: monitor.open_event_socket())
        nft_sock = self.plane.svc.run_sync(lambda _ipr: monitor.open_nft_event_socket())
        self.svc_monitors = [
            monitor.NetlinkMonitor(links_sock, self.is_ours, self.healer.wake, where),
            monitor.NftMonitor(nft_sock, self.healer.wake),
        ]
        for m in self.svc_monitors:
            m.start()

    def _tap_lost(self, name: str) -> None:
        # Its QEMU's fd now points at a dead device: nothing can give that
        # QEMU its network back. The healer recreates the TAP so a restarted
        # QEMU can attach; say so plainly.
        detail = (
            f"TAP {name} was deleted while a process (QEMU) held it: that process has lost "
            "its network and must be restarted; the TAP is being recreated for it"
        )
        log.warning("%s", detail, extra={"QVM_TAP": name})
        for cb in self.listeners.healed:
            cb(f"TAP {name} lost by its QEMU", detail)

    async def _bridge_created(self) -> None:
        bridge = await self.plane.main.run(lookup, self.lab.bridge)
        if bridge is not None:
            for hook in self.bridge_hooks:
                await hook(bridge.index)

    def is_ours(self, name: str) -> bool:
        lab = self.lab
        return name in (lab.bridge, lab.services.bridge_port, lab.services.interface) or (
            self.plane.is_lab_tap_name(name)
        )

    async def stop(self) -> None:
        if self._periodic is not None:
            self._periodic.cancel()
            self._periodic = None
        await self.healer.stop()
        for m in self.monitors + self.svc_monitors:
            m.stop()
        self.monitors.clear()
        self.svc_monitors.clear()
        await self.services.stop()

    async def teardown(self) -> list[str]:
        """Remove the lab, including a dnsmasq a killed qvmd left behind."""
        for hook in self.teardown_hooks:
            await hook()
        paths = self.services.dnsmasq_paths
        terminate_stale(paths.pid, str(paths.conf))
        changes = await self.firewall.teardown()
        return changes + await self.plane.teardown()

    def close(self) -> None:
        self.plane.close()

    # -- operations ----------------------------------------------------

    async def up(self) -> list[str]:
        if self.lab_up:
            return await self.plane.reconcile()
        changes = await self.start()
        self._lab_changed()
        return changes

    async def down(self) -> list[str]:
        """Remove the lab but keep serving (`qvmctl up` brings it back)."""
        await self.stop()
        self.lab_up = False
        changes = await self.teardown()
        self._lab_changed()
        return changes

    async def reload(self) -> list[str]:
        """Re-read the config; apply it only if it is entirely valid."""
        loaded = load_config(self.config_path, self.default_config, self.sandbox)
        new = loaded.lab
        check_state_dependent(new, str(self.plane.store.dir))
        check_subnet_free(new, await self.plane.main.run(main_routes))
        if new == self.lab:
            return await self.plane.reconcile() if self.lab_up else []
        changes = await self.plane.replace_lab(new, reconcile=self.lab_up)
        self.lab = new
        self.firewall.load(new)
        if self.lab_up:
            changes += await self.firewall.ensure(new, bridge_created=True)
            await self.services.apply(new)
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

    async def add_forward(
        self, caller: Caller, proto: str, host_port: int, guest: str, guest_port: int
    ) -> dict[str, Any]:
        fwd = await self.firewall.add(
            self.lab, proto, host_port, guest, guest_port, caller.uid, await caller.is_admin()
        )
        log.info(
            "forward %s/%d -> %s:%d by uid %d",
            fwd.proto,
            fwd.host_port,
            fwd.guest,
            fwd.guest_port,
            caller.uid,
            extra={"QVM_UID": caller.uid},
        )
        return forward_dict(fwd)

    async def remove_forward(self, caller: Caller, proto: str, host_port: int) -> None:
        gone = await self.firewall.remove(
            self.lab, proto, host_port, caller.uid, await caller.is_admin()
        )
        log.info("removed forward %s/%d by uid %d", gone.proto, gone.host_port, caller.uid)

    def list_forwards(self) -> list[dict[str, Any]]:
        return [forward_dict(f) for f in self.firewall.forwards]

    async def doctor(self) -> list[dict[str, str]]:
        uplink = default_route_dev(await self.plane.main.run(main_routes))
        findings = [
            {"severity": f.severity, "summary": f.summary, "fix": f.fix}
            for f in await self.firewall.doctor(self.lab, uplink)
        ]
        resolution = self.host_resolution()
        if not resolution.startswith("registered"):
            lab = self.lab
            g = lab.guests[0] if lab.guests else None
            findings.append(
                {
                    "severity": "warning",
                    "summary": f"The host cannot resolve *.{lab.domain} names ({resolution}).",
                    "fix": f"send {lab.domain} to {lab.services.address}: with systemd-resolved "
                    f"running qvmd does it itself; with dnsmasq or NetworkManager's dnsmasq add "
                    f"server=/{lab.domain}/{lab.services.address}; or list the guests in /etc/hosts"
                    + (f" ({g.ip} {g.fqdn} ...)" if g else ""),
                }
            )
        return findings

    async def guests(self) -> list[dict[str, Any]]:
        """The user's guest table, live: TAP state, lease, certificate."""
        taps = {t.name: t for t in await self.plane.taps()}
        leases = {le["guest"]: le for le in self.services.leases() if le["guest"]}
        certs = {c["guest"]: c for c in await self.certs.list() if c["guest"]}
        rows = []
        for g in self.lab.guests:
            tap = taps.get(g.tap)
            lease = leases.get(g.name)
            cert = certs.get(g.name)
            rows.append(
                {
                    "name": g.name,
                    "fqdn": g.fqdn,
                    "ip": str(g.ip),
                    "mac": g.mac,
                    "tap": g.tap,
                    "tap_owner": -1 if tap is None or tap.uid is None else tap.uid,
                    "tap_state": "missing"
                    if tap is None
                    else ("in use" if tap.carrier else "idle"),
                    "lease_ip": lease["ip"] if lease else "",
                    "lease_expiry": lease["expiry"] if lease else 0,
                    "cert_days_left": cert["days_left"] if cert else -1,
                    "cert_not_after": cert["not_after"] if cert else "",
                }
            )
        return rows

    async def list_taps(self) -> list[TapStatus]:
        return await self.plane.taps()

    async def status(self) -> dict[str, Any]:
        snap = await self.plane.snapshot()
        stats = self.healer.stats
        snap["lab_up"] = self.lab_up
        snap["host_services"] = self.services.status()
        snap["drift"] += await self.firewall.drift(self.lab)
        snap["firewall"] = {
            "forwards": len(self.firewall.forwards),
            "counters": await asyncio.to_thread(self.firewall.counters),
        }
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
        # "created bridge qvm0" -> what = "bridge qvm0": the object repaired.
        verb, _, obj = change.partition(" ")
        for cb in self.listeners.healed:
            cb(obj or verb, change)

    def _lab_changed(self) -> None:
        for cb in self.listeners.lab_changed:
            cb()
