"""Certificate requests from callers, and who gets which private key.

Policy (docs/api.md): anyone may read the CA certificate and the list of
certificates. A caller authorized to issue certificates may ask for any
name inside the lab. A guest's key is handed only to that guest (through
cloud-init) or to an administrator; a key for another lab name goes to the
user who first asked for that name (recorded) or an administrator. The CA
key is never handed to anyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from qvmd.errors import PermissionDenied
from qvmd.model import Lab
from qvmd.pki import CertInfo, IssuedCert, LabPki, validate_cert_name, validate_issue_options
from qvmd.state import PlaneState, StateStore
from qvmd.taps import Caller


def info_dict(info: CertInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "guest": info.guest or "",
        "subject": info.subject,
        "sans": list(info.sans),
        "serial": info.serial,
        "fingerprint_sha256": info.fingerprint_sha256,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
        "days_left": info.days_left,
        "key_type": info.key_type,
        "path": str(info.path),
    }


class CertService:
    def __init__(
        self,
        pki: Callable[[], LabPki],
        lab: Callable[[], Lab],
        state: Callable[[], PlaneState],
        store: StateStore,
    ) -> None:
        self._pki = pki
        self._lab = lab
        self._state = state
        self._store = store
        self._lock = asyncio.Lock()

    def guest_for(self, name: str | IPv4Address, raw: str) -> str | None:
        for g in self._lab().guests:
            if raw == g.name or name == g.fqdn or name == g.ip:
                return g.name
        return None

    async def issue(
        self, caller: Caller, hostname: object, options: dict[str, Any]
    ) -> dict[str, Any]:
        lab = self._lab()
        name = validate_cert_name(hostname, lab.domain, lab.subnet)
        validate_issue_options(options)
        guest = self.guest_for(name, str(hostname))
        async with self._lock:
            owners = self._state().cert_owners
            key = str(name)
            admin = await caller.is_admin()
            if guest is None and not admin:
                owner = owners.get(key)
                if owner is not None and owner != caller.uid:
                    raise PermissionDenied(f"the certificate for {key} belongs to another user")
            issued: IssuedCert = await asyncio.to_thread(self._pki().issue, hostname, options)
            if guest is None and key not in owners:
                owners[key] = caller.uid
                self._store.save(self._state())
        out = info_dict(issued.info)
        out.update(
            {
                "cert_pem": issued.cert_pem.decode(),
                "fullchain_pem": issued.fullchain_pem.decode(),
                "cert_path": str(issued.paths.cert),
                "fullchain_path": str(issued.paths.fullchain),
                "reissued": issued.reason or "",
            }
        )
        if admin or guest is None:
            out["key_pem"] = issued.key_pem.decode()
            out["key_path"] = str(issued.paths.key)
        return out

    async def list(self) -> list[dict[str, Any]]:
        return [info_dict(i) for i in await asyncio.to_thread(self._pki().list_certs)]

    def ca_pem(self) -> str:
        return self._pki().ca_pem().decode()

    def ca_info(self) -> dict[str, Any]:
        ca = self._pki().ca_info()
        return {
            "subject": ca.subject,
            "fingerprint_sha256": ca.fingerprint_sha256,
            "serial": ca.serial,
            "not_before": ca.not_before.isoformat(),
            "not_after": ca.not_after.isoformat(),
            "key_type": ca.key_type,
            "permitted": list(ca.permitted),
            "excluded": list(ca.excluded),
            "constraints_critical": ca.constraints_critical,
            "subject_hash": ca.subject_hash,
            "public_path": str(ca.public_path),
        }
