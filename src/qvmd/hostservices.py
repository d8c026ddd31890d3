"""Host services of the lab: the CA; dnsmasq (DHCP + DNS) with the :5300
→ :53 redirect and the lease watcher; the cloud-init metadata server; and
nfs-ganesha — all in the services namespace.

Order matters and is written once here: certificates first (cloud-init
needs them), then dnsmasq's files, the redirect, dnsmasq, the metadata
server, ganesha. Everything that can be reloaded is reloaded (SIGHUP); a
restart happens only when a daemon's own conf file changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from qvmd.metadata.documents import UserDataOptions
from qvmd.metadata.server import MetadataServer, PkiDocumentSource
from qvmd.model import Lab
from qvmd.pki import LabPki
from qvmd.services import ganesha
from qvmd.services.conffiles import Change
from qvmd.services.dnsmasq import (
    DnsmasqPaths,
    build_dnsmasq_files,
    dnsmasq_child,
    write_dnsmasq_files,
)
from qvmd.services.dnsredirect import apply_dns_redirect
from qvmd.services.leases import Lease, LeaseChange, LeaseWatcher, guest_of
from qvmd.services.nfs_exports import resolve_exports
from qvmd.services.supervisor import Child, ChildStatus, terminate_stale
from qvmd.services.upstreams import read_host_upstreams

log = logging.getLogger(__name__)

RENEW_CHECK_INTERVAL = 86400.0  # the issue asks for "at start and daily"


def make_pki(state_dir: Path, lab: Lab) -> LabPki:
    return LabPki(
        state_dir,
        lab,
        key_type="rsa" if lab.pki.key_type == "rsa" else "ec",
        lifetime_days=lab.pki.lifetime_days,
        renew_days=lab.pki.renew_days,
    )


class HostServices:
    def __init__(self, lab: Lab, state_dir: str) -> None:
        self.lab = lab
        self.state_dir = Path(state_dir)
        self.pki = make_pki(self.state_dir, lab)
        self.dnsmasq_paths = DnsmasqPaths(self.state_dir / "dnsmasq")
        self.dnsmasq: Child | None = None
        self.watcher: LeaseWatcher | None = None
        self.on_lease_change: list[Callable[[LeaseChange], None]] = []
        self._renewal: asyncio.Task[None] | None = None
        self.upstream_note = ""
        self.metadata: MetadataServer | None = None
        self.ganesha_paths = ganesha.GaneshaPaths(self.state_dir / "ganesha")
        self.nfs: Child | None = None
        self.nfs_note = ""

    async def start(self) -> None:
        # dnsmasq reads its files as user dnsmasq, so the state dir must be
        # traversable by others; the CA's own directory stays 0700.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        await self.ensure_certificates()
        await self._write_dnsmasq_files()
        terminate_stale(self.dnsmasq_paths.pid, str(self.dnsmasq_paths.conf))
        await asyncio.to_thread(apply_dns_redirect, self.lab)
        self.dnsmasq = Child(dnsmasq_child(self.lab, self.dnsmasq_paths))
        self.dnsmasq.start()
        self.watcher = LeaseWatcher(self.dnsmasq_paths.leases, self._leases_changed)
        self.watcher.start()
        if self.lab.metadata.enabled:
            self.metadata = MetadataServer(self.lab, self._documents(), port=self.lab.metadata.port)
            await self.metadata.start()
        await self._start_nfs()
        self._renewal = asyncio.create_task(self._renew_daily(), name="pki-renewal")

    def _documents(self) -> PkiDocumentSource:
        m = self.lab.metadata
        return PkiDocumentSource(
            self.pki, UserDataOptions(m.ssh_authorized_keys, m.disable_firewalld, m.prefer_fqdn)
        )

    async def _start_nfs(self) -> None:
        nfs = self.lab.nfs
        if not nfs.enabled or not nfs.exports:
            self.nfs_note = "disabled in the config"
            return
        if shutil.which(ganesha.GANESHA_BINARY) is None:
            self.nfs_note = "nfs-ganesha is not installed"
            log.warning("NFS not served: %s", self.nfs_note)
            return
        change = await asyncio.to_thread(self._write_nfs_files)
        if self.nfs is None:
            terminate_stale(self.ganesha_paths.pid, str(self.ganesha_paths.conf))
            self.nfs = Child(ganesha.ganesha_child(self.lab, self.ganesha_paths))
            self.nfs.start()
        elif change is Change.RESTART:
            self.nfs.spec = ganesha.ganesha_child(self.lab, self.ganesha_paths)
            await self.nfs.restart()
        elif change is Change.RELOAD:
            self.nfs.reload()
        self.nfs_note = ", ".join(str(e.pseudo) for e in self.lab.nfs.exports)

    def _write_nfs_files(self) -> Change:
        exports = resolve_exports(self.lab.nfs.exports, PurePosixPath(self.state_dir))
        ganesha.ensure_export_dirs(exports, self.state_dir / "nfs")
        files = ganesha.build_ganesha_files(self.lab, exports, self.ganesha_paths)
        return ganesha.write_ganesha_files(self.ganesha_paths, files)

    async def ensure_certificates(self) -> list[str]:
        changes = await asyncio.to_thread(self.pki.ensure)
        for change in changes:
            log.info("certificates: %s", change)
        return changes

    async def _renew_daily(self) -> None:
        while True:
            await asyncio.sleep(RENEW_CHECK_INTERVAL)
            try:
                await self.ensure_certificates()
            except Exception:
                log.exception("daily certificate check failed")

    async def _write_dnsmasq_files(self) -> Change:
        if self.lab.dns.upstreams:
            servers = self.lab.dns.upstreams
            self.upstream_note = "from the config"
        else:
            found = read_host_upstreams()
            servers = found.servers
            self.upstream_note = f"from {found.source}" if servers else "none usable on this host"
            for addr, why in found.skipped:
                log.info("upstream resolver %s not used: %s", addr, why)
        files = build_dnsmasq_files(
            self.lab, self.dnsmasq_paths, servers, lease_seconds=self.lab.dns.lease_seconds
        )
        return await asyncio.to_thread(write_dnsmasq_files, self.dnsmasq_paths, files)

    async def apply(self, lab: Lab) -> None:
        """A new lab model (reload): reissue what changed, reload dnsmasq."""
        self.lab = lab
        self.pki = make_pki(self.state_dir, lab)
        await self.ensure_certificates()
        change = await self._write_dnsmasq_files()
        await asyncio.to_thread(apply_dns_redirect, lab)
        if self.dnsmasq is not None:
            if change is Change.RESTART or self.dnsmasq.spec != dnsmasq_child(
                lab, self.dnsmasq_paths
            ):
                self.dnsmasq.spec = dnsmasq_child(lab, self.dnsmasq_paths)
                await self.dnsmasq.restart()
            elif change is Change.RELOAD:
                self.dnsmasq.reload()
        if self.metadata is not None:
            await self.metadata.update(lab, self._documents())
        if self.nfs is not None and (not lab.nfs.enabled or not lab.nfs.exports):
            await self.nfs.stop()
            self.nfs = None
        await self._start_nfs()

    async def ensure_redirect(self) -> bool:
        """Re-apply the :5300 redirect if it differs; True when it changed."""
        if self.dnsmasq is None:
            return False
        return await asyncio.to_thread(apply_dns_redirect, self.lab)

    async def namespace_recreated(self) -> None:
        """The services namespace was deleted and made anew: our redirect
        and dnsmasq's sockets died with the old one."""
        await asyncio.to_thread(apply_dns_redirect, self.lab)
        if self.dnsmasq is not None:
            await self.dnsmasq.restart()
        if self.metadata is not None:
            await self.metadata.restart()
        if self.nfs is not None:
            await self.nfs.restart()

    async def stop(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
        # Forget each part once stopped: start() after stop() (qvmctl down,
        # then up) must make fresh ones.
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            await watcher.stop()
        for child in (self.dnsmasq, self.nfs):
            if child is not None:
                await child.stop()
        self.dnsmasq = self.nfs = None
        metadata, self.metadata = self.metadata, None
        if metadata is not None:
            await metadata.stop()
        self._renewal = None

    # -- observation ---------------------------------------------------

    def leases(self) -> list[dict[str, Any]]:
        leases = self.watcher.leases if self.watcher else ()
        return [self._lease_dict(lease) for lease in leases]

    def _lease_dict(self, lease: Lease) -> dict[str, Any]:
        return {
            "mac": lease.mac,
            "ip": str(lease.ip),
            "hostname": lease.hostname or "",
            "expiry": lease.expiry if lease.expiry is not None else 0,
            "guest": guest_of(lease, self.lab) or "",
        }

    def _leases_changed(self, changes: tuple[LeaseChange, ...], _all: tuple[Lease, ...]) -> None:
        for change in changes:
            log.info("lease %s: %s %s", change.kind, change.lease.mac, change.lease.ip)
            for cb in self.on_lease_change:
                cb(change)

    def status(self) -> list[dict[str, Any]]:
        out = []
        if self.dnsmasq is not None:
            st: ChildStatus = self.dnsmasq.status()
            out.append(
                {
                    "name": "dnsmasq",
                    "state": st.state.value,
                    "pid": st.pid or 0,
                    "restarts": st.restarts,
                    "last_error": st.last_error or "",
                    "address": str(self.lab.services.address),
                    "ports": f"53/udp+tcp, {self.lab.services.dns_port} (redirected), 67/udp",
                    "note": f"upstream resolvers {self.upstream_note}",
                }
            )
        if self.metadata is not None:
            out.append(
                {
                    "name": "cloud-init metadata",
                    "state": "running" if self.metadata.running else "stopped",
                    "pid": os.getpid(),
                    "restarts": 0,
                    "last_error": "",
                    "address": str(self.lab.services.address),
                    "ports": f"{self.lab.metadata.port}/tcp",
                    "note": self.metadata.url,
                }
            )
        nfs = self.nfs.status() if self.nfs is not None else None
        out.append(
            {
                "name": "nfs-ganesha",
                "state": nfs.state.value if nfs else "off",
                "pid": (nfs.pid or 0) if nfs else 0,
                "restarts": nfs.restarts if nfs else 0,
                "last_error": (nfs.last_error or "") if nfs else "",
                "address": str(self.lab.services.address),
                "ports": "2049/tcp (NFSv4)",
                "note": self.nfs_note,
            }
        )
        return out
