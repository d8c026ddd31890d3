"""What a guest needs from outside cloud-init: QEMU arguments and, for
guests without cloud-init, the nmcli commands of the user's setup-guest.sh.

Pure functions of the lab model.
"""

from __future__ import annotations

import shlex

from qvmd.errors import NotFound
from qvmd.metadata.documents import seed_url
from qvmd.metadata.qemu import qemu_args
from qvmd.model import Guest, Lab


def find_guest(lab: Lab, name: object) -> Guest:
    guest = lab.guest(name) if isinstance(name, str) else None
    if guest is None:
        known = ", ".join(g.name for g in lab.guests) or "none"
        raise NotFound(f"no guest named {str(name)[:64]!r} (guests: {known})")
    return guest


def guest_qemu_args(lab: Lab, name: object) -> list[str]:
    return qemu_args(lab, find_guest(lab, name), seed_url(lab, lab.metadata.port))


def nmcli_setup(lab: Lab, name: object) -> str:
    """Static configuration with NetworkManager, matched by the guest's MAC
    (interface names differ between guest images; the MAC is qvmd's)."""
    g = find_guest(lab, name)
    con = "qvm-lab"
    prefix = lab.subnet.prefixlen
    lines = [
        f"# {g.name} ({g.fqdn}): run inside the guest as root",
        f"hostnamectl set-hostname {shlex.quote(g.fqdn)}",
        f"nmcli connection delete {con} 2>/dev/null || true",
        " ".join(
            [
                "nmcli connection add type ethernet",
                f"con-name {con}",
                "ifname '*'",
                f"ethernet.mac-address {g.mac}",
                "ipv4.method manual",
                f"ipv4.addresses {g.ip}/{prefix}",
                f"ipv4.gateway {lab.gateway.ip}",
                f"ipv4.dns {lab.services.address}",
                f"ipv4.dns-search {lab.domain}",
                "ipv6.method disabled",
            ]
        ),
        f"nmcli connection up {con}",
    ]
    if lab.metadata.disable_firewalld:
        lines.append("# the user's notes: firewalld interferes with Kubernetes")
        lines.append("systemctl disable --now firewalld.service")
    return "\n".join(lines) + "\n"
