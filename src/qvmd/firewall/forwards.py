"""Port forwards: host port -> guest port, validated, owned, persisted.

Everything here is pure except `load_forwards`/`save_forwards`, which read
and write one JSON file in the state directory. The list of forwards is an
immutable tuple; every change returns a new tuple that the caller saves and
then hands to the ruleset builder, so the file and the kernel never disagree
about what was accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qvmd.errors import Busy, Failed, InvalidArgument, NotFound, PermissionDenied
from qvmd.fsutil import atomic_write
from qvmd.model import Lab

PROTOCOLS = ("tcp", "udp")
# The kernel's default net.ipv4.ip_unprivileged_port_start: a forward below it
# would let a user answer on a port other programs trust as root-owned (and
# would shadow host services such as ssh on 22), so only admins may take one.
FIRST_UNPRIVILEGED_PORT = 1024
FORWARDS_FILE = "forwards.json"
_FILE_VERSION = 1


@dataclass(frozen=True, order=True)
class PortForward:
    """Connections to `host_port`/`proto` on any host address go to the guest."""

    proto: str
    host_port: int
    guest: str
    guest_port: int
    owner_uid: int

    @property
    def key(self) -> tuple[str, int]:
        """Forwards are unique per (protocol, host port): the kernel map's key."""
        return (self.proto, self.host_port)


def validate_proto(proto: object) -> str:
    if not isinstance(proto, str) or proto.lower() not in PROTOCOLS:
        raise InvalidArgument(f"protocol {proto!r} is not one of {', '.join(PROTOCOLS)}")
    return proto.lower()


def validate_port(port: object, what: str = "port") -> int:
    # bool is an int in Python; a port of True is a caller bug, not port 1.
    if not isinstance(port, int) or isinstance(port, bool):
        raise InvalidArgument(f"{what} must be an integer, not {type(port).__name__}")
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"{what} {port} is outside 1-65535")
    return port


def add_forward(
    lab: Lab,
    forwards: Iterable[PortForward],
    proto: object,
    host_port: object,
    guest: object,
    guest_port: object,
    *,
    caller_uid: int,
    is_admin: bool,
) -> tuple[tuple[PortForward, ...], PortForward]:
    """Validate a new forward; return the new list (sorted) and the forward.

    `is_admin` is the polkit answer for the admin action, decided by the
    caller: this module only knows that privileged ports need it.
    """
    proto = validate_proto(proto)
    host_port = validate_port(host_port, "host port")
    guest_port = validate_port(guest_port, "guest port")
    if not isinstance(guest, str) or lab.guest(guest) is None:
        known = ", ".join(g.name for g in lab.guests) or "none"
        raise NotFound(f"no guest named {guest!r} (guests: {known})")
    if host_port < FIRST_UNPRIVILEGED_PORT and not is_admin:
        raise PermissionDenied(
            f"host port {host_port} is privileged (below {FIRST_UNPRIVILEGED_PORT}); "
            "only an administrator may forward it"
        )
    current = tuple(forwards)
    for f in current:
        if f.key == (proto, host_port):
            raise Busy(
                f"{proto} host port {host_port} is already forwarded to {f.guest}:{f.guest_port}"
            )
    new = PortForward(proto, host_port, guest, guest_port, caller_uid)
    return tuple(sorted((*current, new))), new


def remove_forward(
    forwards: Iterable[PortForward],
    proto: object,
    host_port: object,
    *,
    caller_uid: int,
    is_admin: bool,
) -> tuple[tuple[PortForward, ...], PortForward]:
    """Remove the forward of (proto, host_port); only its owner or an admin may."""
    proto = validate_proto(proto)
    host_port = validate_port(host_port, "host port")
    current = tuple(forwards)
    found = next((f for f in current if f.key == (proto, host_port)), None)
    if found is None:
        raise NotFound(f"{proto} host port {host_port} is not forwarded")
    if found.owner_uid != caller_uid and not is_admin:
        raise PermissionDenied(
            f"{proto} host port {host_port} was forwarded by uid {found.owner_uid}; "
            "only that user or an administrator may remove it"
        )
    return tuple(f for f in current if f is not found), found


def prune_forwards(
    lab: Lab, forwards: Iterable[PortForward]
) -> tuple[tuple[PortForward, ...], tuple[PortForward, ...]]:
    """Split into (kept, dropped): dropped ones name a guest the lab no longer has.

    A config change can remove a guest while its forwards sit in the state
    file; the daemon logs the dropped ones and saves the kept ones.
    """
    kept: list[PortForward] = []
    dropped: list[PortForward] = []
    for f in forwards:
        (kept if lab.guest(f.guest) is not None else dropped).append(f)
    return tuple(kept), tuple(dropped)


def forwards_to_json(forwards: Iterable[PortForward]) -> bytes:
    doc = {"version": _FILE_VERSION, "forwards": [asdict(f) for f in sorted(forwards)]}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def forwards_from_json(data: bytes, source: str = "forwards file") -> tuple[PortForward, ...]:
    """Parse and re-validate: the file is ours, but a hand edit must not reach nft."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise Failed(f"{source}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("version") != _FILE_VERSION:
        raise Failed(f'{source}: expected an object with "version": {_FILE_VERSION}')
    items = doc.get("forwards")
    if not isinstance(items, list):
        raise Failed(f'{source}: "forwards" must be a list')
    out: list[PortForward] = []
    seen: set[tuple[str, int]] = set()
    for i, item in enumerate(items):
        where = f"{source}: forwards[{i}]"
        try:
            f = _forward_from_dict(item)
        except InvalidArgument as e:
            raise Failed(f"{where}: {e}") from e
        if f.key in seen:
            raise Failed(f"{where}: {f.proto} host port {f.host_port} appears twice")
        seen.add(f.key)
        out.append(f)
    return tuple(sorted(out))


def _forward_from_dict(item: Any) -> PortForward:
    if not isinstance(item, dict):
        raise InvalidArgument("must be an object")
    expected = {"proto", "host_port", "guest", "guest_port", "owner_uid"}
    if set(item) != expected:
        raise InvalidArgument(f"keys must be exactly {sorted(expected)}")
    guest = item["guest"]
    if not isinstance(guest, str) or not guest:
        raise InvalidArgument("guest must be a non-empty string")
    uid = item["owner_uid"]
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise InvalidArgument("owner_uid must be a non-negative integer")
    return PortForward(
        proto=validate_proto(item["proto"]),
        host_port=validate_port(item["host_port"], "host port"),
        guest=guest,
        guest_port=validate_port(item["guest_port"], "guest port"),
        owner_uid=uid,
    )


def load_forwards(state_dir: str | Path) -> tuple[PortForward, ...]:
    """The saved forwards; none if the file does not exist yet."""
    path = Path(state_dir) / FORWARDS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ()
    return forwards_from_json(data, str(path))


def save_forwards(state_dir: str | Path, forwards: Iterable[PortForward]) -> None:
    # 0644: the list is not secret (qvmctl forward list shows it to anyone).
    atomic_write(Path(state_dir) / FORWARDS_FILE, forwards_to_json(forwards), mode=0o644)
