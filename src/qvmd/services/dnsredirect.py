"""DNS on the lab's second port: an nft redirect in the services namespace.

dnsmasq listens on one port (53, what DHCP hands the guests). The user's
table also names port 5300, so TCP and UDP to services-address:5300 are
redirected to :53 by a table that lives in the services namespace, one
process, one cache, one config (see docs/services-dns.md for the choice).

`build_dns_redirect` is pure (nft JSON, golden-tested); `apply_dns_redirect`
pushes it with libnftables from a short-lived thread that has entered the
namespace: a netlink socket belongs to the network namespace of the thread
that creates it, and a fresh thread (not a pool thread, which would be
reused later in the wrong namespace) is discarded afterwards.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from qvmd.errors import Failed, NotFound
from qvmd.model import Lab

TABLE = "qvm_dns"
FAMILY = "inet"
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")
Json = dict[str, Any]


def _rule(chain: str, proto: str, address: str, from_port: int, to_port: int) -> Json:
    return {
        "family": FAMILY,
        "table": TABLE,
        "chain": chain,
        "expr": [
            {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                    "right": address,
                }
            },
            {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": proto, "field": "dport"}},
                    "right": from_port,
                }
            },
            {"redirect": {"port": to_port}},
        ],
    }


def _chains() -> list[Json]:
    # prerouting: queries arriving from the bridge (guests, the host);
    # output: queries made inside the services namespace itself.
    return [
        {
            "family": FAMILY,
            "table": TABLE,
            "name": hook,
            "type": "nat",
            "hook": hook,
            "prio": -100,
            "policy": "accept",
        }
        for hook in ("prerouting", "output")
    ]


def redirect_rules(lab: Lab, listen_port: int = 53) -> list[Json]:
    """The rules alone; none when the lab's DNS port is the one dnsmasq uses."""
    svc = lab.services
    if svc.dns_port == listen_port:
        return []
    return [
        _rule(chain["name"], proto, str(svc.address), svc.dns_port, listen_port)
        for chain in _chains()
        for proto in ("udp", "tcp")
    ]


def build_dns_redirect(lab: Lab, listen_port: int = 53) -> Json:
    """One nft transaction that replaces our table with the desired one.

    add + delete + add: deleting a table that does not exist fails, so it is
    first made to exist; the whole batch is atomic, nothing else in the
    namespace's ruleset is touched.
    """
    table = {"family": FAMILY, "name": TABLE}
    cmds: list[Json] = [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    cmds += [{"add": {"chain": chain}} for chain in _chains()]
    cmds += [{"add": {"rule": rule}} for rule in redirect_rules(lab, listen_port)]
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *cmds]}


def build_dns_redirect_removal() -> Json:
    table = {"family": FAMILY, "name": TABLE}
    return {"nftables": [{"add": {"table": table}}, {"delete": {"table": table}}]}


def _comparable(listing: Json) -> tuple[list[Json], list[Json]]:
    """(chains, rules) of a `list table` answer, without handles."""
    chains: list[Json] = []
    rules: list[Json] = []
    for item in listing.get("nftables", []):
        if "chain" in item:
            chain = dict(item["chain"])
            chain.pop("handle", None)
            chains.append(chain)
        elif "rule" in item:
            keep = ("family", "table", "chain", "expr")
            rules.append({k: v for k, v in item["rule"].items() if k in keep})
    return chains, rules


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a new thread that has entered network namespace `netns`."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(f"{NETNS_DIR}/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            error.append(NotFound(f"network namespace {netns!r} does not exist"))
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                error.append(Failed(f"cannot enter namespace {netns!r}: {os.strerror(err)}"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _nft_json(cmd: Json) -> tuple[int, Json | None, str]:
    import nftables  # python3-nftables, from the distribution

    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, err = nft.json_cmd(cmd)
    return int(rc), (out if isinstance(out, dict) else None), str(err)


def _apply(desired: Json, rules: list[Json]) -> bool:
    rc, out, _err = _nft_json(
        {"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]}
    )
    if rc == 0 and out is not None and _comparable(out) == (_chains(), rules):
        return False
    rc, _out, err = _nft_json(desired)
    if rc != 0:
        raise Failed(f"nft refused the DNS redirect table: {err.strip()}")
    return True


def apply_dns_redirect(lab: Lab, listen_port: int = 53) -> bool:
    """Make the redirect table in the lab's services namespace what it should
    be; True if something was changed (False: it already was)."""
    desired = build_dns_redirect(lab, listen_port)
    rules = redirect_rules(lab, listen_port)
    return in_netns(lab.services.netns, lambda: _apply(desired, rules))


def remove_dns_redirect(netns: str) -> None:
    """Delete the table; a missing table or namespace is already removed."""

    def remove() -> None:
        rc, _out, err = _nft_json(build_dns_redirect_removal())
        if rc != 0:
            raise Failed(f"nft could not delete the DNS redirect table: {err.strip()}")

    try:
        in_netns(netns, remove)
    except NotFound:
        return
