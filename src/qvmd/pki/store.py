"""The lab PKI on disk: layout, modes, locking, renewal, the public CA.

Layout under the state directory ($QVM_DIR)::

    certs/                      0755
      ca/                       0700  created once, never replaced
        qvm-ca.pem              0644
        qvm-ca.key              0600
      hosts/                    0755
        cp -> .versions/cp/20250101T000000Z-1a2b3c4d   (symlink)
        .versions/cp/<version>/ 0755  cert.pem 0644, key.pem 0600, fullchain.pem 0644
      .locks/                   0700  one flock file per host, one for the CA
    ca-cert/                    0755
      qvm-ca.pem                0644
      <hash>.0 -> qvm-ca.pem    as `openssl rehash` makes it

Crash safety. A host's cert, key and chain are written into a fresh
version directory that nothing points to yet; then the `hosts/<name>`
symlink is replaced by rename(2), which is atomic. A reader, or qvmd
after a crash, sees the old complete version or the new complete version,
never a key without its cert; a version orphaned by a crash is removed the
next time that host is touched. The CA is built the same way in a temporary
directory renamed to `ca/`. A `ca/` that exists but cannot be loaded is
never overwritten: replacing a CA silently would break every client that
trusts it.

Concurrency. Each host has its own flock(2) lock file; flock locks belong to
the open file, so the lock serialises threads of one process as well as
separate processes. Concurrent requests for one host therefore yield one
pair: the first writes it, the others find it valid and return it. The
methods block (file I/O, flock, RSA key generation): call them from a
worker thread, not from an event loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from cryptography import x509

from qvmd.errors import Failed, InvalidArgument, NotFound, PermissionDenied
from qvmd.fsutil import atomic_write, fsync_dir
from qvmd.model import Lab
from qvmd.pki import builder
from qvmd.pki.builder import KeyType, PrivateKey
from qvmd.pki.hostnames import validate_cert_name, validate_issue_options

log = logging.getLogger(__name__)

CA_CERT = "qvm-ca.pem"
CA_KEY = "qvm-ca.key"
CERT = "cert.pem"
KEY = "key.pem"
FULLCHAIN = "fullchain.pem"

DEFAULT_LIFETIME_DAYS = 397
DEFAULT_RENEW_DAYS = 30
MAX_LIFETIME_DAYS = 3650

_DIR_MODE = 0o755
_PRIVATE_DIR_MODE = 0o700
_CERT_MODE = 0o644
_KEY_MODE = 0o600
_HASH_LINK = re.compile(r"[0-9a-f]{8}\.[0-9]+")
_VERSIONS = ".versions"
_LOCKS = ".locks"
_CA_TMP_PREFIX = ".ca.new-"

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class HostPaths:
    """Where a host's files are, through the stable `hosts/<name>` link."""

    directory: Path
    cert: Path
    key: Path
    fullchain: Path


@dataclass(frozen=True)
class CertInfo:
    name: str  # guest name, or the FQDN / address of another lab name
    guest: str | None  # the guest this certificate belongs to, if any
    subject: str  # RFC 4514
    sans: tuple[str, ...]  # DNS names, then addresses
    serial: str  # hex
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime
    days_left: int  # whole days; negative once expired
    key_type: str  # "EC secp256r1", "RSA 3072"
    path: Path  # cert.pem through the stable link


@dataclass(frozen=True)
class IssuedCert:
    info: CertInfo
    paths: HostPaths
    cert_pem: bytes
    fullchain_pem: bytes  # the certificate, then the CA
    key_pem: bytes = field(repr=False)  # never logged by accident
    reason: str | None = None  # why it was (re)issued; None: the valid one was reused


@dataclass(frozen=True)
class CaInfo:
    subject: str
    fingerprint_sha256: str
    serial: str
    not_before: datetime
    not_after: datetime
    key_type: str
    path_length: int | None
    permitted: tuple[str, ...]  # "DNS:qvm0.lan", "IP:10.42.0.0/24"
    excluded: tuple[str, ...]
    constraints_critical: bool
    subject_hash: str  # the `<hash>` of the ca-cert/<hash>.0 link
    public_path: Path


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: PrivateKey
    pem: bytes
    stamp: tuple[int, int, int, int]  # (ino, mtime) of cert and key: reload on change


@dataclass(frozen=True)
class _Host:
    directory: Path  # the version directory the link points at
    cert: x509.Certificate
    key: PrivateKey
    cert_pem: bytes
    key_pem: bytes
    fullchain_pem: bytes


@dataclass(frozen=True)
class _Wanted:
    """The names a host's certificate must carry."""

    name: str
    guest: str | None
    dns: tuple[str, ...]
    ips: tuple[IPv4Address, ...]

    def general_names(self) -> set[x509.GeneralName]:
        return {*(x509.DNSName(d) for d in self.dns), *(x509.IPAddress(ip) for ip in self.ips)}


class LabPki:
    """The lab CA and the certificates it issues, kept under `state_dir`."""

    def __init__(
        self,
        state_dir: str | Path,
        lab: Lab,
        *,
        key_type: KeyType = "ec",
        lifetime_days: int = DEFAULT_LIFETIME_DAYS,
        renew_days: int = DEFAULT_RENEW_DAYS,
        ca_lifetime_days: int = builder.CA_LIFETIME_DAYS,
        clock: Clock = _utcnow,
    ) -> None:
        if key_type not in builder.KEY_TYPES:
            raise InvalidArgument(
                f"key type {key_type!r} is not one of {', '.join(builder.KEY_TYPES)}"
            )
        if not 1 <= lifetime_days <= MAX_LIFETIME_DAYS:
            raise InvalidArgument(f"certificate lifetime must be 1-{MAX_LIFETIME_DAYS} days")
        if not 0 <= renew_days < lifetime_days:
            raise InvalidArgument(
                "the renewal window must be shorter than the certificate lifetime"
            )
        if ca_lifetime_days < lifetime_days:
            raise InvalidArgument("the CA lifetime must be at least the certificate lifetime")
        self.state_dir = Path(state_dir)
        self.lab = lab
        self.key_type: KeyType = key_type
        self.lifetime = timedelta(days=lifetime_days)
        self.renew_window = timedelta(days=renew_days)
        self.ca_lifetime_days = ca_lifetime_days
        self._clock = clock
        self.certs_dir = self.state_dir / "certs"
        self.ca_dir = self.certs_dir / "ca"
        self.hosts_dir = self.certs_dir / "hosts"
        self.public_dir = self.state_dir / "ca-cert"
        self._versions = self.hosts_dir / _VERSIONS
        self._locks = self.certs_dir / _LOCKS
        self._ca_cache: _Ca | None = None

    # --- public API -----------------------------------------------------------

    def ensure(self, now: datetime | None = None) -> list[str]:
        """Create the CA if absent; issue, renew or reissue every certificate.

        Guests get a certificate for their FQDN and address; certificates
        issued earlier for other lab names are renewed too. Returns what
        changed, one line each; an empty list means nothing was written.
        Failures of single hosts are collected and raised together (as
        Failed) after the others have been handled.
        """
        now = self._now(now)
        changes: list[str] = []
        ca = self._ensure_ca(now, changes)
        errors: list[str] = []
        for wanted in self._all_wanted():
            try:
                _, reason = self._ensure_host(wanted, ca, now, force=False)
            except Failed as exc:
                errors.append(str(exc))
                continue
            if reason:
                changes.append(f"{wanted.name}: {reason}")
        if errors:
            raise Failed("; ".join(errors))
        return changes

    def issue(self, hostname: object, options: Mapping[str, object] | None = None) -> IssuedCert:
        """The certificate for one lab name, issued if needed.

        `hostname` is a guest's name, FQDN or address, or any other name
        inside the lab (hostnames.py). A guest's name maps to that guest's
        certificate. Options: `force` (bool) reissues a still-valid one.
        Bad input raises InvalidArgument before anything is written.
        """
        force = validate_issue_options(options)
        target = validate_cert_name(hostname, self.lab.domain, self.lab.subnet)
        wanted = self._wanted_for(target)
        now = self._now(None)
        ca = self._ensure_ca(now, [])
        host, reason = self._ensure_host(wanted, ca, now, force=force)
        return self._issued(wanted, host, now, reason)

    def list_certs(self, now: datetime | None = None) -> list[CertInfo]:
        """Every host certificate on disk, sorted by name."""
        now = self._now(now)
        guests = {g.name for g in self.lab.guests}
        out = []
        for name in self._host_names():
            try:
                host = self._read_host_unlocked(name)
            except Failed as exc:
                log.warning("skipping certificate %s: %s", name, exc)
                continue
            if host is not None:
                out.append(self._info(name, name if name in guests else None, host, now))
        return out

    def ca_pem(self) -> bytes:
        """The public CA certificate (PEM). The CA key never leaves this class."""
        return self._load_ca_or_raise().pem

    def ca_info(self) -> CaInfo:
        ca = self._load_ca_or_raise()
        cert = ca.cert
        permitted: tuple[str, ...] = ()
        excluded: tuple[str, ...] = ()
        critical = False
        try:
            ext = cert.extensions.get_extension_for_class(x509.NameConstraints)
        except x509.ExtensionNotFound:
            pass
        else:
            critical = ext.critical
            permitted = tuple(_general_name(n) for n in ext.value.permitted_subtrees or ())
            excluded = tuple(_general_name(n) for n in ext.value.excluded_subtrees or ())
        try:
            path_length = cert.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value.path_length
        except x509.ExtensionNotFound:
            path_length = None
        return CaInfo(
            subject=cert.subject.rfc4514_string(),
            fingerprint_sha256=builder.sha256_fingerprint(cert),
            serial=f"{cert.serial_number:x}",
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            key_type=builder.describe_key(cert.public_key()),
            path_length=path_length,
            permitted=permitted,
            excluded=excluded,
            constraints_critical=critical,
            subject_hash=builder.subject_hash(cert.subject),
            public_path=self.public_dir / CA_CERT,
        )

    def host_paths(self, name: str) -> HostPaths:
        """Paths for a certificate name (a guest name, or an FQDN/address)."""
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgument(f"bad certificate name {name!r}")
        directory = self.hosts_dir / name
        return HostPaths(directory, directory / CERT, directory / KEY, directory / FULLCHAIN)

    # --- the CA ---------------------------------------------------------------

    def _ensure_ca(self, now: datetime, changes: list[str]) -> _Ca:
        # The state directory itself (and its mode) belongs to the daemon.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _ensure_dir(self.certs_dir, _DIR_MODE, changes)
        _ensure_dir(self._locks, _PRIVATE_DIR_MODE, changes)
        with self._lock("ca"):
            self._remove_stale_ca_builds()
            ca = self._load_ca()
            if ca is None:
                ca = self._create_ca(now)
                changes.append(
                    f"created CA {ca.cert.subject.rfc4514_string()} "
                    f"({builder.describe_key(ca.key)}), "
                    f"fingerprint {builder.sha256_fingerprint(ca.cert)}"
                )
            else:
                self._check_ca_covers_lab(ca)
                _ensure_mode(self.ca_dir, _PRIVATE_DIR_MODE, changes)
                _ensure_mode(self.ca_dir / CA_KEY, _KEY_MODE, changes)
            changes += export_public(ca.pem, self.public_dir, dir_mode=_DIR_MODE)
        return ca

    def _check_ca_covers_lab(self, ca: _Ca) -> None:
        """Refuse to issue from a CA whose constraints exclude the lab.

        That happens when the lab's domain or subnet changed after the CA
        was made. Replacing the CA is the admin's decision (every client
        must trust the new one), so this asks for it instead of doing it.
        """
        try:
            nc = ca.cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            return
        domain, subnet = self.lab.domain, self.lab.subnet
        dns_ok = nc.permitted_subtrees is None or any(
            isinstance(n, x509.DNSName) and (domain == n.value or domain.endswith("." + n.value))
            for n in nc.permitted_subtrees
        )
        ip_ok = nc.permitted_subtrees is None or any(
            isinstance(n, x509.IPAddress)
            and isinstance(n.value, IPv4Network)
            and subnet.subnet_of(n.value)
            for n in nc.permitted_subtrees
        )
        if not (dns_ok and ip_ok):
            allowed = ", ".join(_general_name(n) for n in nc.permitted_subtrees or ())
            raise Failed(
                f"the lab CA in {self.ca_dir} may only certify {allowed}, but the lab is "
                f"{domain} {subnet}; move {self.ca_dir} away to create a new CA "
                "(clients must then trust the new one)"
            )

    def _load_ca_or_raise(self) -> _Ca:
        ca = self._load_ca()
        if ca is None:
            raise NotFound("the lab CA has not been created yet")
        return ca

    def _load_ca(self) -> _Ca | None:
        """The CA on disk; None if there is none; Failed if it is unusable."""
        cert_path, key_path = self.ca_dir / CA_CERT, self.ca_dir / CA_KEY
        try:
            cs, ks = cert_path.stat(), key_path.stat()
        except FileNotFoundError:
            if cert_path.exists() or key_path.exists():
                raise Failed(
                    f"{self.ca_dir} holds only one of {CA_CERT} and {CA_KEY}; "
                    "restore the other or move the directory away to create a new CA"
                ) from None
            return None
        stamp = (cs.st_ino, cs.st_mtime_ns, ks.st_ino, ks.st_mtime_ns)
        if self._ca_cache is not None and self._ca_cache.stamp == stamp:
            return self._ca_cache
        try:
            pem = cert_path.read_bytes()
            cert = x509.load_pem_x509_certificate(pem)
            key = builder.load_key(key_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise Failed(f"cannot load the lab CA from {self.ca_dir}: {exc}") from None
        if not builder.key_matches(cert, key):
            raise Failed(f"{self.ca_dir}: {CA_KEY} does not belong to {CA_CERT}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise Failed(f"{self.ca_dir / CA_CERT} is not a CA certificate")
        self._ca_cache = _Ca(cert, key, builder.cert_pem(cert), stamp)
        return self._ca_cache

    def _create_ca(self, now: datetime) -> _Ca:
        key = builder.generate_key(self.key_type)
        cert = builder.build_ca(
            key,
            domain=self.lab.domain,
            subnet=self.lab.subnet,
            now=now,
            lifetime_days=self.ca_lifetime_days,
        )
        build = self.certs_dir / f"{_CA_TMP_PREFIX}{secrets.token_hex(4)}"
        os.mkdir(build, _PRIVATE_DIR_MODE)
        try:
            os.chmod(build, _PRIVATE_DIR_MODE)
            atomic_write(build / CA_KEY, builder.key_pem(key), mode=_KEY_MODE)
            atomic_write(build / CA_CERT, builder.cert_pem(cert), mode=_CERT_MODE)
            # rename(2) onto a missing or empty directory is atomic; onto one
            # with files in it, it fails, and we never replace a CA.
            os.rename(build, self.ca_dir)
        except OSError as exc:
            shutil.rmtree(build, ignore_errors=True)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise Failed(
                    f"{self.ca_dir} holds files that are not a lab CA; move them away"
                ) from None
            raise
        fsync_dir(self.certs_dir)
        log.info("created lab CA %s", cert.subject.rfc4514_string())
        ca = self._load_ca()
        assert ca is not None
        return ca

    def _remove_stale_ca_builds(self) -> None:
        for entry in self.certs_dir.iterdir():
            if entry.name.startswith(_CA_TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)

    # --- hosts ----------------------------------------------------------------

    def _wanted_for(self, target: str | IPv4Address) -> _Wanted:
        for g in self.lab.guests:
            if target in (g.fqdn, g.ip):
                return self._guest_wanted(g.name, g.fqdn, g.ip)
        if isinstance(target, IPv4Address):
            return _Wanted(str(target), None, (), (target,))
        return _Wanted(target, None, (target,), ())

    def _guest_wanted(self, name: str, fqdn: str, ip: IPv4Address) -> _Wanted:
        # The short name is deliberately not a SAN: a single-label dNSName
        # lies outside the permitted subtree `domain`, and OpenSSL, Go and
        # browsers reject the whole chain for it (docs/pki.md).
        checked = validate_cert_name(fqdn, self.lab.domain, self.lab.subnet)
        address = validate_cert_name(str(ip), self.lab.domain, self.lab.subnet)
        assert isinstance(checked, str) and isinstance(address, IPv4Address)
        return _Wanted(name, name, (checked,), (address,))

    def _all_wanted(self) -> list[_Wanted]:
        wanted = {g.name: self._guest_wanted(g.name, g.fqdn, g.ip) for g in self.lab.guests}
        for name in self._host_names():
            if name in wanted:
                continue
            try:
                target = validate_cert_name(name, self.lab.domain, self.lab.subnet)
            except InvalidArgument:
                continue  # no longer a lab name (domain or subnet changed): left alone
            extra = self._wanted_for(target)
            if extra.guest is None and extra.name == name:
                wanted[name] = extra
        return list(wanted.values())

    def _host_names(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.hosts_dir))
        except FileNotFoundError:
            return []
        return [e for e in entries if not e.startswith(".")]

    def _ensure_host(
        self, wanted: _Wanted, ca: _Ca, now: datetime, *, force: bool
    ) -> tuple[_Host, str | None]:
        _ensure_dir(self.hosts_dir, _DIR_MODE, [])
        _ensure_dir(self._versions, _DIR_MODE, [])
        with self._lock(f"host-{wanted.name}"):
            reason: str | None
            try:
                current = self._read_host(wanted.name)
            except Failed as exc:
                current, reason = None, f"reissued: {exc}"
            else:
                reason = (
                    "issued" if current is None else self._why_reissue(current, wanted, ca, now)
                )
            if reason is None and force:
                reason = "reissued on request"
            if reason is None:
                assert current is not None
                self._remove_other_versions(wanted.name, current.directory)
                return current, None
            host = self._write_host(wanted, ca, now)
            log.info("certificate %s %s", wanted.name, reason)
            return host, reason

    def _why_reissue(self, host: _Host, wanted: _Wanted, ca: _Ca, now: datetime) -> str | None:
        cert = host.cert
        if not builder.issued_by(cert, ca.cert):
            return "reissued: signed by another CA"
        try:
            sans = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            sans = set()
        if sans != wanted.general_names():
            have = ", ".join(builder.san_values(cert))
            want = ", ".join([*wanted.dns, *map(str, wanted.ips)])
            return f"reissued: names changed ({have} -> {want})"
        if builder.key_type_of(host.key) != self.key_type:
            return f"reissued: key type is now {self.key_type}"
        not_after = cert.not_valid_after_utc
        # A renewal that cannot outlive the current certificate (the CA
        # expires first) would only churn keys on every check.
        if not_after - now <= self.renew_window and ca.cert.not_valid_after_utc > not_after:
            if not_after <= now:
                return f"renewed: expired on {not_after:%Y-%m-%d}"
            return f"renewed: expires on {not_after:%Y-%m-%d}"
        return None

    def _write_host(self, wanted: _Wanted, ca: _Ca, now: datetime) -> _Host:
        key = builder.generate_key(self.key_type)
        try:
            cert = builder.build_host_cert(
                key.public_key(),
                ca_cert=ca.cert,
                ca_key=ca.key,
                dns_names=wanted.dns,
                ips=wanted.ips,
                now=now,
                lifetime_days=self.lifetime.days,
            )
        except ValueError as exc:  # the CA has expired
            raise Failed(
                f"cannot issue for {wanted.name}: {exc}; move {self.ca_dir} away to create a new CA"
            ) from None
        cert_pem, key_pem = builder.cert_pem(cert), builder.key_pem(key)
        fullchain = cert_pem + ca.pem
        versions = self._versions / wanted.name
        _ensure_dir(versions, _DIR_MODE, [])
        version = versions / f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
        os.mkdir(version, _DIR_MODE)
        os.chmod(version, _DIR_MODE)
        atomic_write(version / KEY, key_pem, mode=_KEY_MODE)
        atomic_write(version / CERT, cert_pem, mode=_CERT_MODE)
        atomic_write(version / FULLCHAIN, fullchain, mode=_CERT_MODE)
        fsync_dir(versions)
        # The switch: a new symlink beside the versions, renamed over the
        # stable name. rename(2) replaces the old link atomically.
        link = self.hosts_dir / wanted.name
        tmp = versions / f".link-{secrets.token_hex(4)}"
        os.symlink(os.path.relpath(version, self.hosts_dir), tmp)
        try:
            _check_replaceable(link)
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.hosts_dir)
        self._remove_other_versions(wanted.name, version)
        return _Host(version, cert, key, cert_pem, key_pem, fullchain)

    def _remove_other_versions(self, name: str, keep: Path) -> None:
        try:
            entries = list((self._versions / name).iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name == keep.name:
                continue
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink(missing_ok=True)
            else:
                shutil.rmtree(entry, ignore_errors=True)

    def _read_host(self, name: str) -> _Host | None:
        """The current version of `name`: None if absent, Failed if unusable."""
        link = self.hosts_dir / name
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise Failed(f"{link} is not a link made by qvmd; move it away") from None
            raise
        directory = (self.hosts_dir / target).resolve()
        if directory.parent != (self._versions / name).resolve():
            raise Failed(f"{link} points outside {self._versions / name}")
        try:
            cert_pem = (directory / CERT).read_bytes()
            key_pem = (directory / KEY).read_bytes()
            fullchain = (directory / FULLCHAIN).read_bytes()
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = builder.load_key(key_pem)
        except FileNotFoundError:
            raise Failed(f"{link} points to an incomplete version") from None
        except ValueError as exc:
            raise Failed(f"{link}: unreadable certificate or key ({exc})") from None
        if not builder.key_matches(cert, key):
            raise Failed(f"{link}: key does not belong to the certificate")
        return _Host(directory, cert, key, cert_pem, key_pem, fullchain)

    def _read_host_unlocked(self, name: str) -> _Host | None:
        # Without the lock a writer may remove the version we resolved
        # between readlink and read; the link then already names a newer one.
        for _ in range(3):
            try:
                return self._read_host(name)
            except Failed:
                continue
        return self._read_host(name)

    def _issued(
        self, wanted: _Wanted, host: _Host, now: datetime, reason: str | None
    ) -> IssuedCert:
        return IssuedCert(
            info=self._info(wanted.name, wanted.guest, host, now),
            paths=self.host_paths(wanted.name),
            cert_pem=host.cert_pem,
            fullchain_pem=host.fullchain_pem,
            key_pem=host.key_pem,
            reason=reason,
        )

    def _info(self, name: str, guest: str | None, host: _Host, now: datetime) -> CertInfo:
        cert = host.cert
        not_after = cert.not_valid_after_utc
        return CertInfo(
            name=name,
            guest=guest,
            subject=cert.subject.rfc4514_string(),
            sans=builder.san_values(cert),
            serial=f"{cert.serial_number:x}",
            fingerprint_sha256=builder.sha256_fingerprint(cert),
            not_before=cert.not_valid_before_utc,
            not_after=not_after,
            days_left=(not_after - now) // timedelta(days=1),
            key_type=builder.describe_key(host.key),
            path=self.host_paths(name).cert,
        )

    # --- plumbing -------------------------------------------------------------

    def _now(self, now: datetime | None) -> datetime:
        value = self._clock() if now is None else now
        if value.tzinfo is None:
            raise ValueError("the PKI clock must return timezone-aware datetimes")
        return value

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        _ensure_dir(self._locks, _PRIVATE_DIR_MODE, [])
        fd = os.open(self._locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def export_public(ca_pem: bytes, dest_dir: str | Path, *, dir_mode: int | None = None) -> list[str]:
    """Put the public CA and its OpenSSL hash link into `dest_dir`.

    Makes `dest_dir/qvm-ca.pem` (0644) and `dest_dir/<hash>.<n> -> qvm-ca.pem`
    exactly as `openssl rehash` would, so both `curl --cacert DIR/qvm-ca.pem`
    and `SSL_CERT_DIR=DIR` work. Needs no privilege: `qvmctl ca export DIR`
    runs it as the user. Other files in the directory are left alone (a
    different certificate with the same hash keeps its link, ours takes the
    next number); links of ours under an old hash are removed. `dir_mode`
    forces the directory's mode; None leaves an existing directory's mode
    as it is and creates a missing one 0755. Writes nothing when all is
    already in place. Returns what changed. Run it with the privileges of
    whoever owns `dest_dir`: as root, it refuses a directory (or parent)
    owned by anyone else (PermissionDenied).
    """
    try:
        cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise InvalidArgument(f"not a PEM certificate: {exc}") from None
    pem = builder.cert_pem(cert)
    dest = Path(dest_dir)
    _refuse_foreign_dir_as_root(dest)
    changes: list[str] = []
    _ensure_dir(
        dest, _DIR_MODE if dir_mode is None else dir_mode, changes, force=dir_mode is not None
    )
    target = dest / CA_CERT
    try:
        st = target.lstat()
        same = (
            stat.S_ISREG(st.st_mode)
            and stat.S_IMODE(st.st_mode) == _CERT_MODE
            and target.read_bytes() == pem
        )
    except FileNotFoundError:
        same = False
    if not same:
        atomic_write(target, pem, mode=_CERT_MODE)
        changes.append(f"wrote {target}")

    digest = builder.subject_hash(cert.subject)
    ours: list[str] = []
    taken: set[str] = set()
    for entry in os.listdir(dest):
        if not _HASH_LINK.fullmatch(entry):
            continue
        path = dest / entry
        if path.is_symlink() and os.readlink(path) == CA_CERT:
            ours.append(entry)
        else:
            taken.add(entry)
    keep = next((e for e in sorted(ours, key=_link_order) if e.startswith(digest + ".")), None)
    if keep is None:
        n = 0
        while f"{digest}.{n}" in taken:
            n += 1
        keep = f"{digest}.{n}"
        tmp = dest / f".{keep}.tmp-{secrets.token_hex(4)}"
        os.symlink(CA_CERT, tmp)
        os.replace(tmp, dest / keep)
        changes.append(f"linked {dest / keep} -> {CA_CERT}")
    for entry in ours:
        if entry != keep:
            (dest / entry).unlink(missing_ok=True)
            changes.append(f"removed stale link {dest / entry}")
    if changes:
        fsync_dir(dest)
    return changes


def _refuse_foreign_dir_as_root(dest: Path) -> None:
    """Root never writes into a directory another user controls.

    atomic_write's temporary name is predictable; in a directory the user
    owns, the user could plant a symlink there and have root overwrite any
    file. `qvmctl ca export` must run export_public as the user instead.
    """
    if os.geteuid() != 0:
        return
    for path in (dest, dest.parent):
        try:
            owner = path.stat().st_uid
        except FileNotFoundError:
            continue
        if owner != 0:
            raise PermissionDenied(
                f"{path} belongs to uid {owner}: export the CA as that user, not as root"
            )


def _link_order(entry: str) -> tuple[str, int]:
    digest, n = entry.split(".")
    return digest, int(n)


def _general_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    return f"{type(name).__name__}:{name.value}"


def _ensure_dir(path: Path, mode: int, changes: list[str], *, force: bool = True) -> None:
    """Create `path` with `mode`; fix the mode only if it differs (no ctime churn)."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if force:
            _ensure_mode(path, mode, changes)
        return
    os.chmod(path, mode)  # mkdir applies the umask
    changes.append(f"created {path}")


def _ensure_mode(path: Path, mode: int, changes: list[str]) -> None:
    if stat.S_IMODE(path.stat().st_mode) != mode:
        os.chmod(path, mode)
        changes.append(f"set mode {mode:o} on {path}")


def _check_replaceable(link: Path) -> None:
    if link.exists() and not link.is_symlink():
        raise Failed(f"{link} is not a link made by qvmd; move it away")


__all__ = [
    "CaInfo",
    "CertInfo",
    "HostPaths",
    "IssuedCert",
    "LabPki",
    "export_public",
]
