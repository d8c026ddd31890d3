"""The lab model: one immutable description of everything qvmd builds.

Every other part (links, firewall, DHCP/DNS, certificates, cloud-init) reads
the lab from here. `default_lab()` is exactly the user's tables; the config
file may change any value (see config.py), and the result is always a
validated `Lab`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from qvmd.services.nfs_exports import NfsSettings

DEFAULT_STATE_DIR = "/var/lib/qvmd"
DEFAULT_CONFIG_PATH = "/etc/qvmd/qvmd.toml"
DEFAULT_SERVICES_NETNS = "qvm-services"


@dataclass(frozen=True)
class Owner:
    """Who may open a TAP: the kernel's TUNSETOWNER / TUNSETGROUP values.

    A TAP with neither set can be opened by anyone who can open
    /dev/net/tun, so qvmd always sets at least the uid (root by default).
    """

    uid: int = 0
    gid: int | None = None


@dataclass(frozen=True)
class Guest:
    name: str
    fqdn: str
    ip: IPv4Address
    mac: str
    tap: str
    owner: Owner
    multi_queue: bool = False


@dataclass(frozen=True)
class Services:
    """The host-services end: `interface` (in `netns`) holds `address`."""

    netns: str
    interface: str
    bridge_port: str
    address: IPv4Address
    dns_port: int


@dataclass(frozen=True)
class PkiSettings:
    key_type: str = "ec"  # "ec" (P-256) or "rsa" (3072)
    lifetime_days: int = 397
    renew_days: int = 30


@dataclass(frozen=True)
class DnsSettings:
    # Empty: forward to the host's own resolvers (read at start and reload).
    upstreams: tuple[IPv4Address, ...] = ()
    lease_seconds: int = 3600


@dataclass(frozen=True)
class MetadataSettings:
    """cloud-init NoCloud over HTTP on the services address."""

    enabled: bool = True
    port: int = 80
    ssh_authorized_keys: tuple[str, ...] = ()
    # The user's notes disable firewalld in guests (it interferes with k8s).
    disable_firewalld: bool = False
    prefer_fqdn: bool = True


@dataclass(frozen=True)
class Lab:
    bridge: str
    gateway: IPv4Interface
    domain: str
    tap_prefix: str
    tap_owner: Owner
    services: Services
    guests: tuple[Guest, ...] = field(default_factory=tuple)
    pki: PkiSettings = field(default_factory=PkiSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    metadata: MetadataSettings = field(default_factory=MetadataSettings)
    nfs: NfsSettings = field(default_factory=NfsSettings)

    @property
    def subnet(self) -> IPv4Network:
        return self.gateway.network

    def guest(self, name: str) -> Guest | None:
        return next((g for g in self.guests if g.name == name), None)

    def guest_by_tap(self, tap: str) -> Guest | None:
        return next((g for g in self.guests if g.tap == tap), None)


def derive_mac(ip: IPv4Address) -> str:
    """A deterministic MAC for a guest: 52:54 then the four IPv4 octets.

    52:54 is QEMU's customary prefix and has the locally-administered bit set
    and the multicast bit clear. Deriving the rest from the IP makes every
    MAC in a subnet unique by construction, and stable across restarts.
    """
    return "52:54:" + ":".join(f"{b:02x}" for b in ip.packed)


DEFAULT_GUESTS: tuple[tuple[str, str, str], ...] = (
    ("cp", "10.42.0.10", "qvm0tap0"),
    ("wk-1", "10.42.0.11", "qvm0tap1"),
    ("wk-2", "10.42.0.12", "qvm0tap2"),
)


def default_lab(services_netns: str = DEFAULT_SERVICES_NETNS) -> Lab:
    """The user's tables, exactly."""
    domain = "qvm0.lan"
    owner = Owner()
    guests = tuple(
        Guest(
            name=name,
            fqdn=f"{name}.{domain}",
            ip=IPv4Address(ip),
            mac=derive_mac(IPv4Address(ip)),
            tap=tap,
            owner=owner,
        )
        for name, ip, tap in DEFAULT_GUESTS
    )
    return Lab(
        bridge="qvm0",
        gateway=IPv4Interface("10.42.0.1/24"),
        domain=domain,
        tap_prefix="qvm0tap",
        tap_owner=owner,
        services=Services(
            netns=services_netns,
            interface="veth0",
            bridge_port="qvm0-svc",
            address=IPv4Address("10.42.0.2"),
            dns_port=5300,
        ),
        guests=guests,
    )
