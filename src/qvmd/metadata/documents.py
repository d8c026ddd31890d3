"""The four NoCloud documents of one guest, built from the lab model.

Pure: every function here is a function of the lab, the guest, the PKI
material handed in and the options; nothing reads files, the clock or the
network, so the output is golden-tested without root (tests/golden/metadata/).

YAML is emitted by PyYAML (`yaml.safe_dump`, Debian's python3-yaml) with
keys in the order written here, and multi-line strings (PEM) as literal
blocks so a person can read the documents with curl.

Choices (docs/metadata.md says more):

- instance-id is `qvm-<fqdn>`: stable for the life of the guest's name in
  the lab. cloud-init runs its per-instance modules (write_files, ssh host
  keys, users) again whenever the id changes, so an id that followed the
  certificate would regenerate the guest's SSH host keys on every renewal.
  A renewed certificate reaches a running guest by another way (see docs).
- network-config is a static v2 configuration matched by MAC, with the
  same address, gateway, DNS server and search domain dnsmasq's static
  lease hands out: a Kubernetes node's address must not depend on the DHCP
  service being up, and it is what the user's setup-guest.sh did by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from qvmd.model import Guest, Lab

# Where the user's notes install the certificates in each guest.
GUEST_CERT_DIR = "/root/cert"
CA_FILE_NAME = "qvm-ca.pem"

# The seed URL is http://<services address>[:port]/nocloud/ for every guest.
DEFAULT_PORT = 80
SEED_PATH = "/nocloud/"

# The names a NoCloud seed directory (or URL) holds; cloud-init 22.4 fetches
# meta-data, user-data and vendor-data over HTTP, 24.3+ also network-config.
DOCUMENT_NAMES: tuple[str, ...] = ("meta-data", "user-data", "vendor-data", "network-config")

# The network-config's name for the guest's interface. Only a label: the
# entry matches the NIC by MAC and cloud-init uses that NIC's own name. No
# `set-name`: besides renaming the NIC, cloud-init 22.4 crashes (KeyError)
# on set-name + nameservers when the NIC has another name, as it does at boot.
GUEST_INTERFACE = "lab0"

CLOUD_CONFIG_HEADER = "#cloud-config\n"

# Disabling firewalld is only meaningful where it is installed; a runcmd
# that failed on a guest without it would mark the whole boot as failed.
_DISABLE_FIREWALLD = (
    "if systemctl cat firewalld.service >/dev/null 2>&1; "
    "then systemctl disable --now firewalld.service; fi"
)


@dataclass(frozen=True)
class GuestMaterial:
    """What the PKI hands out for one guest, as PEM bytes."""

    cert_pem: bytes
    fullchain_pem: bytes
    ca_pem: bytes
    key_pem: bytes = field(repr=False)  # never printed by accident


@dataclass(frozen=True)
class UserDataOptions:
    """The user's choices that are not part of the lab model."""

    ssh_authorized_keys: tuple[str, ...] = ()
    # The user's notes disable firewalld in the guests so it does not
    # interfere with Kubernetes.
    disable_firewalld: bool = False
    # The user's table names guests by FQDN (cp.qvm0.lan): make that the
    # guest's hostname, not just the short name.
    prefer_fqdn: bool = True


@dataclass(frozen=True)
class Documents:
    """The four documents of one guest, as served (UTF-8 bytes)."""

    meta_data: bytes
    user_data: bytes = field(repr=False)  # carries the private key
    vendor_data: bytes
    network_config: bytes

    def by_name(self) -> Mapping[str, bytes]:
        return {
            "meta-data": self.meta_data,
            "user-data": self.user_data,
            "vendor-data": self.vendor_data,
            "network-config": self.network_config,
        }


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_representer)


def _dump(data: Mapping[str, Any]) -> str:
    # width: never fold a long line (an SSH key, a command) across lines.
    return yaml.dump(
        data,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=False,
        width=1 << 16,
    )


def seed_url(lab: Lab, port: int = DEFAULT_PORT) -> str:
    """The NoCloud seed URL. cloud-init appends the document names to it
    as they are (no slash added), so it ends with a slash."""
    host = str(lab.services.address)
    return f"http://{host}{SEED_PATH}" if port == 80 else f"http://{host}:{port}{SEED_PATH}"


def instance_id(lab: Lab, guest: Guest) -> str:
    return f"qvm-{guest.fqdn}"


def meta_data(lab: Lab, guest: Guest) -> str:
    return _dump({"instance-id": instance_id(lab, guest), "local-hostname": guest.name})


def _pem_text(pem: bytes, what: str) -> str:
    try:
        text = pem.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not PEM text") from None
    if "-----BEGIN " not in text:
        raise ValueError(f"{what} is not PEM text")
    return text if text.endswith("\n") else text + "\n"


def user_data(lab: Lab, guest: Guest, material: GuestMaterial, options: UserDataOptions) -> str:
    ca = _pem_text(material.ca_pem, "the CA certificate")
    files = [
        _file("cert.pem", _pem_text(material.cert_pem, "the certificate"), "0644"),
        _file("key.pem", _pem_text(material.key_pem, "the private key"), "0600"),
        _file("fullchain.pem", _pem_text(material.fullchain_pem, "the chain"), "0644"),
        _file(CA_FILE_NAME, ca, "0644"),
    ]
    config: dict[str, Any] = {
        "hostname": guest.name,
        "fqdn": guest.fqdn,
        "prefer_fqdn_over_hostname": options.prefer_fqdn,
        "write_files": files,
        # `ca_certs` is the key cloud-init 22.4 documents; `ca-certs` is
        # accepted there too but deprecated.
        "ca_certs": {"trusted": [ca]},
    }
    if options.ssh_authorized_keys:
        config["ssh_authorized_keys"] = list(options.ssh_authorized_keys)
    if options.disable_firewalld:
        config["runcmd"] = [_DISABLE_FIREWALLD]
    return CLOUD_CONFIG_HEADER + _dump(config)


def _file(name: str, content: str, permissions: str) -> dict[str, str]:
    return {
        "path": f"{GUEST_CERT_DIR}/{name}",
        "owner": "root:root",
        "permissions": permissions,
        "content": content,
    }


def network_config(lab: Lab, guest: Guest) -> str:
    ethernet = {
        "match": {"macaddress": guest.mac},
        "dhcp4": False,
        "addresses": [f"{guest.ip}/{lab.subnet.prefixlen}"],
        "routes": [{"to": "0.0.0.0/0", "via": str(lab.gateway.ip)}],
        "nameservers": {"addresses": [str(lab.services.address)], "search": [lab.domain]},
    }
    return _dump({"version": 2, "ethernets": {GUEST_INTERFACE: ethernet}})


def vendor_data(lab: Lab, guest: Guest) -> str:
    # Nothing the lab must impose beyond user-data; an empty cloud-config
    # (rather than a 404) keeps cloud-init from logging a fetch error.
    return CLOUD_CONFIG_HEADER + "{}\n"


def build_documents(
    lab: Lab, guest: Guest, material: GuestMaterial, options: UserDataOptions
) -> Documents:
    return Documents(
        meta_data=meta_data(lab, guest).encode(),
        user_data=user_data(lab, guest, material, options).encode(),
        vendor_data=vendor_data(lab, guest).encode(),
        network_config=network_config(lab, guest).encode(),
    )


def authorized_keys(lines: Sequence[str]) -> tuple[str, ...]:
    """SSH public keys from authorized_keys-style text lines.

    Blank lines and comments are dropped; anything else must look like a
    public key (`<type> <base64> [comment]`), or ValueError names the line.
    """
    keys: list[str] = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not (
            parts[0].startswith(("ssh-", "ecdsa-", "sk-")) and parts[1].startswith("AAAA")
        ):
            raise ValueError(f"line {number} is not an SSH public key")
        keys.append(line)
    return tuple(keys)


__all__ = [
    "CA_FILE_NAME",
    "DEFAULT_PORT",
    "DOCUMENT_NAMES",
    "GUEST_CERT_DIR",
    "GUEST_INTERFACE",
    "SEED_PATH",
    "Documents",
    "GuestMaterial",
    "UserDataOptions",
    "authorized_keys",
    "build_documents",
    "instance_id",
    "meta_data",
    "network_config",
    "seed_url",
    "user_data",
    "vendor_data",
]
