"""Read /etc/qvmd/qvmd.toml into a validated Lab.

Parsing is pure: `parse_config(dict)` needs no root and touches nothing; the
one check that needs the host (does the subnet overlap a route the host
already has?) is `check_subnet_free`, fed with routes by the caller. Every
error is a ConfigError naming the key (dotted path, `guests[1].ip`) and the
reason. Unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    NetmaskValueError,
)
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from qvmd.errors import ConfigError, InvalidArgument
from qvmd.metadata.documents import authorized_keys
from qvmd.model import (
    DEFAULT_SERVICES_NETNS,
    DnsSettings,
    Guest,
    Lab,
    MetadataSettings,
    Owner,
    PkiSettings,
    Services,
    default_lab,
    derive_mac,
)
from qvmd.names import validate_domain, validate_ifname, validate_label, validate_mac
from qvmd.services.nfs_exports import parse_nfs_table, resolve_export_path

T = TypeVar("T")

_NETNS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _Table:
    """One TOML table being read: typed getters, and unknown-key detection."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, f"must be a table, not {_tname(data)}")
        self.data: dict[str, Any] = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, typ: type[T], default: T) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        # bool is an int in Python; a port of `true` is still a type error.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(self.key(name), f"must be {_tname_of(typ)}, not {_tname(value)}")
        return value

    def has(self, name: str) -> bool:
        return name in self.data

    def sub(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(self.data.get(name, {}), self.key(name))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def _tname(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _tname_of(typ: type) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string", list: "an array"}.get(
        typ, typ.__name__
    )


def _checked(key: str, fn: Any, value: object) -> Any:
    """Run a names.validate_* function and re-raise with the key attached."""
    try:
        return fn(value)
    except InvalidArgument as exc:
        raise ConfigError(key, str(exc)) from None


def _ifname(t: _Table, name: str, default: str) -> str:
    return str(_checked(t.key(name), validate_ifname, t.get(name, str, default)))


def _ipv4(key: str, text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise ConfigError(key, f"{text!r} is not an IPv4 address") from None


def _uid(t: _Table, name: str, default: int | None) -> int | None:
    t.used.add(name)
    if name not in t.data:
        return default
    value = t.data[name]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(t.key(name), f"must be a user name or uid, not {_tname(value)}")
    if isinstance(value, int):
        if not 0 <= value < 2**32 - 1:
            raise ConfigError(t.key(name), f"uid {value} is out of range")
        return value
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ConfigError(t.key(name), f"no such user {value!r}") from None


def _gid(t: _Table, name: str, default: int | None) -> int | None:
    t.used.add(name)
    if name not in t.data:
        return default
    value = t.data[name]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(t.key(name), f"must be a group name or gid, not {_tname(value)}")
    if isinstance(value, int):
        if not 0 <= value < 2**32 - 1:
            raise ConfigError(t.key(name), f"gid {value} is out of range")
        return value
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(t.key(name), f"no such group {value!r}") from None


def validate_netns_name(name: object, what: str = "namespace name") -> str:
    """A name usable as /run/netns/NAME: no path tricks, nothing exotic."""
    if not isinstance(name, str) or not _NETNS_RE.match(name) or name in (".", ".."):
        raise InvalidArgument(
            f"{what} {name!r} must be 1-64 characters of letters, digits, '_', '.' or '-'"
        )
    return name


@dataclass(frozen=True)
class LoadedConfig:
    lab: Lab
    path: str | None  # None when the embedded default was used


def parse_config(data: dict[str, Any], sandbox: str | None = None) -> Lab:
    """Build a Lab from parsed TOML, starting from the embedded default.

    `sandbox` is the namespace qvmd runs in when started with --netns: the
    services namespace then defaults to a name derived from it, because
    namespace names are global and two sandboxes must not share one.
    """
    base = default_lab(f"{sandbox}-svc" if sandbox else DEFAULT_SERVICES_NETNS)
    top = _Table(data, "")

    domain = str(_checked("domain", validate_domain, top.get("domain", str, base.domain)))

    b = top.sub("bridge")
    bridge = _ifname(b, "name", base.bridge)
    gw_text = b.get("address", str, str(base.gateway))
    try:
        gateway = IPv4Interface(gw_text)
    except (AddressValueError, NetmaskValueError, ValueError):
        raise ConfigError(b.key("address"), f"{gw_text!r} is not an IPv4 address/prefix") from None
    if "/" not in gw_text:
        raise ConfigError(b.key("address"), f"{gw_text!r} needs a prefix length, like 10.42.0.1/24")
    subnet = gateway.network
    if subnet.prefixlen > 29:
        raise ConfigError(b.key("address"), f"/{subnet.prefixlen} leaves no room for guests")
    if gateway.ip in (subnet.network_address, subnet.broadcast_address):
        raise ConfigError(
            b.key("address"), f"{gateway.ip} is the subnet's network or broadcast address"
        )
    b.finish()

    t = top.sub("taps")
    prefix = _ifname(t, "prefix", base.tap_prefix)
    if len(prefix.encode()) > 12:
        raise ConfigError(t.key("prefix"), f"{prefix!r} leaves too little room for a TAP number")
    tap_owner = Owner(
        uid=_uid(t, "owner", base.tap_owner.uid) or 0,
        gid=_gid(t, "group", base.tap_owner.gid),
    )
    multi_queue_default = t.get("multi_queue", bool, False)
    t.finish()

    s = top.sub("services")
    svc_if = _ifname(s, "interface", base.services.interface)
    svc_port = _ifname(s, "bridge_port", base.services.bridge_port)
    netns = str(
        _checked(s.key("netns"), validate_netns_name, s.get("netns", str, base.services.netns))
    )
    svc_addr = _ipv4(s.key("address"), s.get("address", str, str(base.services.address)))
    dns_port = s.get("dns_port", int, base.services.dns_port)
    if not 1 <= dns_port <= 65535:
        raise ConfigError(s.key("dns_port"), f"{dns_port} is not a port number (1-65535)")
    s.finish()
    _check_host_address(s.key("address"), svc_addr, subnet, {gateway.ip: "the gateway address"})
    services = Services(netns, svc_if, svc_port, svc_addr, dns_port)

    pki = _parse_pki(top.sub("pki"))
    dns = _parse_dns(top.sub("dns"))
    metadata = _parse_metadata(top.sub("metadata"))
    top.used.add("nfs")
    nfs = parse_nfs_table(top.data.get("nfs"), subnet)
    guests = _parse_guests(
        top, base, domain, prefix, subnet, gateway.ip, svc_addr, tap_owner, multi_queue_default
    )
    top.finish()

    _check_distinct_ifnames(bridge, svc_port, prefix)
    return Lab(
        bridge=bridge,
        gateway=gateway,
        domain=domain,
        tap_prefix=prefix,
        tap_owner=tap_owner,
        services=services,
        guests=guests,
        pki=pki,
        dns=dns,
        metadata=metadata,
        nfs=nfs,
    )


def _parse_metadata(t: _Table) -> MetadataSettings:
    base = MetadataSettings()
    port = t.get("port", int, base.port)
    if not 1 <= port <= 65535:
        raise ConfigError(t.key("port"), f"{port} is not a port number (1-65535)")
    raw_keys = t.get("ssh_authorized_keys", list, [])
    if not all(isinstance(k, str) for k in raw_keys):
        raise ConfigError(t.key("ssh_authorized_keys"), "must be an array of strings")
    try:
        keys = authorized_keys(raw_keys)
    except ValueError as exc:
        raise ConfigError(t.key("ssh_authorized_keys"), str(exc)) from None
    settings = MetadataSettings(
        enabled=t.get("enabled", bool, base.enabled),
        port=port,
        ssh_authorized_keys=keys,
        disable_firewalld=t.get("disable_firewalld", bool, base.disable_firewalld),
        prefer_fqdn=t.get("prefer_fqdn", bool, base.prefer_fqdn),
    )
    t.finish()
    return settings


def _parse_pki(t: _Table) -> PkiSettings:
    base = PkiSettings()
    key_type = t.get("key_type", str, base.key_type)
    if key_type not in ("ec", "rsa"):
        raise ConfigError(t.key("key_type"), f"{key_type!r} is not 'ec' or 'rsa'")
    lifetime = t.get("lifetime_days", int, base.lifetime_days)
    if not 1 <= lifetime <= 825:
        raise ConfigError(t.key("lifetime_days"), f"{lifetime} is not between 1 and 825")
    renew = t.get("renew_days", int, base.renew_days)
    if not 0 <= renew < lifetime:
        raise ConfigError(t.key("renew_days"), f"{renew} must be at least 0 and below the lifetime")
    t.finish()
    return PkiSettings(key_type, lifetime, renew)


def _parse_dns(t: _Table) -> DnsSettings:
    raw = t.get("upstreams", list, [])
    upstreams = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise ConfigError(f"{t.key('upstreams')}[{i}]", f"must be a string, not {_tname(item)}")
        upstreams.append(_ipv4(f"{t.key('upstreams')}[{i}]", item))
    lease = t.get("lease_seconds", int, DnsSettings().lease_seconds)
    if not 120 <= lease <= 7 * 86400:
        raise ConfigError(t.key("lease_seconds"), f"{lease} is not between 120 and 604800")
    t.finish()
    return DnsSettings(tuple(upstreams), lease)


def _parse_guests(
    top: _Table,
    base: Lab,
    domain: str,
    prefix: str,
    subnet: IPv4Network,
    gateway: IPv4Address,
    services: IPv4Address,
    tap_owner: Owner,
    multi_queue_default: bool,
) -> tuple[Guest, ...]:
    top.used.add("guests")
    if "guests" not in top.data:
        # The default guests follow the (possibly changed) domain and owner.
        return tuple(
            Guest(g.name, f"{g.name}.{domain}", g.ip, g.mac, g.tap, tap_owner, multi_queue_default)
            for g in base.guests
        )
    raw = top.data["guests"]
    if not isinstance(raw, list):
        raise ConfigError("guests", f"must be an array of tables ([[guests]]), not {_tname(raw)}")
    reserved = {gateway: "the gateway address", services: "the services address"}
    seen: dict[str, dict[object, str]] = {"name": {}, "ip": {}, "mac": {}, "tap": {}}
    guests = []
    for i, item in enumerate(raw):
        g = _Table(item, f"guests[{i}]")
        if not g.has("name"):
            raise ConfigError(g.key("name"), "is required")
        name = str(_checked(g.key("name"), validate_label, g.get("name", str, "")))
        if not g.has("ip"):
            raise ConfigError(g.key("ip"), "is required")
        ip = _ipv4(g.key("ip"), g.get("ip", str, ""))
        _check_host_address(g.key("ip"), ip, subnet, reserved)
        if not g.has("tap"):
            raise ConfigError(g.key("tap"), "is required")
        tap = _ifname(g, "tap", "")
        try:
            check_tap_name(tap, prefix)
        except InvalidArgument as exc:
            raise ConfigError(g.key("tap"), str(exc)) from None
        mac = str(_checked(g.key("mac"), validate_mac, g.get("mac", str, derive_mac(ip))))
        owner = Owner(
            uid=_uid(g, "owner", tap_owner.uid) or 0,
            gid=_gid(g, "group", tap_owner.gid),
        )
        multi_queue = g.get("multi_queue", bool, multi_queue_default)
        g.finish()
        for field_name, value in (("name", name), ("ip", ip), ("mac", mac), ("tap", tap)):
            if value in seen[field_name]:
                raise ConfigError(
                    g.key(field_name), f"{value} is already used by {seen[field_name][value]}"
                )
            seen[field_name][value] = f"guests[{i}]"
        guests.append(Guest(name, f"{name}.{domain}", ip, mac, tap, owner, multi_queue))
    return tuple(guests)


def check_tap_name(tap: str, prefix: str, what: str = "TAP name") -> int:
    """A lab TAP is `<prefix><N>`: refuse anything else (eth0, lo, ...)."""
    rest = tap[len(prefix) :] if tap.startswith(prefix) else None
    if (
        not rest
        or not rest.isdigit()
        or not rest.isascii()
        or (rest != "0" and rest.startswith("0"))
    ):
        raise InvalidArgument(f"{what}: {tap!r} is not of the form {prefix}<number>")
    return int(rest)


def _check_host_address(
    key: str, ip: IPv4Address, subnet: IPv4Network, reserved: dict[IPv4Address, str]
) -> None:
    if ip not in subnet:
        raise ConfigError(key, f"{ip} is outside the lab subnet {subnet}")
    if ip in (subnet.network_address, subnet.broadcast_address):
        raise ConfigError(key, f"{ip} is the network or broadcast address of {subnet}")
    if ip in reserved:
        raise ConfigError(key, f"{ip} is {reserved[ip]}")


def _check_distinct_ifnames(bridge: str, bridge_port: str, prefix: str) -> None:
    if bridge == bridge_port:
        raise ConfigError("services.bridge_port", f"{bridge_port!r} is the bridge's own name")
    for key, name in (("bridge.name", bridge), ("services.bridge_port", bridge_port)):
        try:
            check_tap_name(name, prefix)
        except InvalidArgument:
            continue
        raise ConfigError(key, f"{name!r} would collide with the TAP names {prefix}<N>")


def load_config(path: str | None, default_path: str, sandbox: str | None = None) -> LoadedConfig:
    """Read the file at `path` (must exist) or `default_path` (may be absent)."""
    target = Path(path or default_path)
    try:
        text = target.read_bytes()
    except FileNotFoundError:
        if path is not None:
            raise ConfigError("", f"config file {target} does not exist") from None
        return LoadedConfig(parse_config({}, sandbox), None)
    except OSError as exc:
        raise ConfigError("", f"cannot read {target}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", f"{target} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{target}: {exc}") from None
    return LoadedConfig(parse_config(data, sandbox), str(target))


def check_state_dependent(lab: Lab, state_dir: str) -> None:
    """Checks that need the state directory: NFS export paths (relative ones
    live under it, and it must never be exported itself: it holds the CA key)."""
    base = PurePosixPath(os.path.abspath(state_dir))
    for i, export in enumerate(lab.nfs.exports):
        try:
            resolve_export_path(export.path, base)
        except InvalidArgument as exc:
            raise ConfigError(f"nfs.exports[{i}].path", str(exc)) from None


def check_subnet_free(lab: Lab, routes: Iterable[tuple[IPv4Network, str]]) -> None:
    """Refuse a lab subnet that overlaps a route the host already has.

    `routes` are (destination, interface name) pairs from the main table.
    The default route overlaps everything and is how guests get out, so it
    is ignored; routes on our own bridge are ours (we are adopting).
    """
    for dst, dev in routes:
        if dst.prefixlen == 0 or dev == lab.bridge:
            continue
        if dst.overlaps(lab.subnet):
            raise ConfigError(
                "bridge.address",
                f"lab subnet {lab.subnet} overlaps the route {dst} on {dev or 'an unknown device'}"
                " that this host already has",
            )
