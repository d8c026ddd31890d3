"""What qvmd knows of one link: the fields reconcile compares, no more."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Interface


@dataclass(frozen=True)
class TunInfo:
    owner: int | None
    group: int | None
    multi_queue: bool
    persist: bool
    is_tap: bool


@dataclass
class LinkState:
    index: int
    name: str
    kind: str | None
    up: bool
    carrier: bool
    master: int | None
    mac: str
    tun: TunInfo | None = None
    addresses: list[IPv4Interface] = field(default_factory=list)
