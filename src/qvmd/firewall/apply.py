"""Push the ruleset from ruleset.py into the kernel, one transaction at a time.

Talks to the kernel through python-nftables (libnftables' JSON API) in the
network namespace the process is in when `Firewall()` is created: the
netlink socket is opened then and kept for the object's life.

The owner flag
--------------
Where the kernel supports it (5.12+) our tables carry `flags owner`. What
that means, checked on 6.18 with nft 1.0.6:

* only the netlink socket that created the table may change or delete it;
  anyone else gets EPERM (`nft delete table inet qvm` from a shell fails),
* `nft flush ruleset` by anyone else skips the table,
* `nft list ruleset` by anyone else still shows it (`# progname python`);
  but `nft -j` (JSON) listings of an owner-flagged table are broken in
  nft 1.0.6 (a use-after-free prints the flags as garbage, sometimes as
  invalid JSON; fixed in 1.0.7), so this module never JSON-lists tables,
* the kernel deletes the table when that socket closes, i.e. when this
  Firewall object is freed or qvmd exits. Keep exactly one Firewall for the
  daemon's life; a restart re-creates the tables at start-up (see
  docs/firewall.md for the short gap this means).

libnftables 1.0.6 cannot set table flags from JSON (the key is ignored), so
the tables themselves are created with a one-line text command; everything
inside them is JSON. A table whose flag may not change cannot be deleted and
re-added in one batch with the flag kept, so the atomic replace is: flush the
table's rules, delete every chain/set/map/object it holds, add the new ones,
all in ONE batch. The kernel applies the batch as one transaction: a packet
sees the old ruleset or the new one, never a mix, never an empty table.
Without the owner flag (old kernel, or `use_owner_flag=False`) it is the
classic batch instead: add table (no-op if present), delete it, add it with
everything in it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nftables

from qvmd.errors import Busy, Failed
from qvmd.firewall.ruleset import OUR_TABLES
from qvmd.names import validate_ifname

log = logging.getLogger(__name__)

JSON = dict[str, Any]
TableId = tuple[str, str]

# The object kinds ruleset.py creates, deleted in this order after the
# table's rules are flushed (rules reference sets, maps and counters).
_CONTAINED_KINDS = ("chain", "set", "map", "counter")


@dataclass(frozen=True)
class Observation:
    """What the kernel holds of our tables, for drift detection."""

    missing: tuple[TableId, ...]
    # True only if every table is present and its content is exactly what
    # this Firewall applied last for the same desired ruleset.
    matches: bool
    owned: bool


class Firewall:
    """Applies, observes and removes qvmd's nft tables in one namespace.

    Calls are serialized by a lock: the libnftables context keeps per-call
    output buffers and is not thread-safe.
    """

    def __init__(self, tables: Iterable[TableId] = OUR_TABLES, use_owner_flag: bool = True) -> None:
        self._nft = nftables.Nftables()
        self._tables = tuple(tables)
        self._want_owner = use_owner_flag
        # None until the first table is created: that creation is the probe.
        self._owner_supported: bool | None = None
        # Tables this object created with the owner flag, and what each held
        # after our last batch. Nobody else can change an owned table, so
        # that memory is exact; it is what the next batch deletes.
        self._contents: dict[TableId, list[tuple[str, str]]] = {}
        self._lock = threading.Lock()
        self._applied_desired: str | None = None
        self._applied_listing: list[JSON] | None = None

    @property
    def owner_flag(self) -> bool:
        """Whether our tables carry the owner flag (known after the first apply)."""
        return bool(self._want_owner and self._owner_supported)

    # -- talking to libnftables ----------------------------------------------

    def _text(self, cmd: str) -> tuple[int, str, str]:
        rc, out, err = self._nft.cmd(cmd)
        return int(rc), str(out), str(err)

    def _json(self, doc: JSON) -> tuple[int, Any, str]:
        rc, out, err = self._nft.json_cmd(doc)
        return int(rc), out, str(err)

    def _list(self, what: JSON) -> list[JSON]:
        """One JSON `list` command's objects, metainfo dropped.

        Never used for tables: nft 1.0.6 prints a table's flags from freed
        memory (fixed in 1.0.7), which for an owner-flagged table gives
        garbage or invalid JSON. Chains, rules, sets, maps and counters are
        printed without their table, so they are safe.
        """
        rc, out, err = self._json({"nftables": [{"list": what}]})
        if rc != 0:
            raise Failed(f"nft list {json.dumps(what)} failed: {err.strip()}")
        return [o for o in out["nftables"] if "metainfo" not in o]

    def _existing_tables(self) -> list[TableId]:
        rc, out, err = self._text("list tables")
        if rc != 0:
            raise Failed(f"nft list tables failed: {err.strip()}")
        found = []
        for line in out.splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "table":
                found.append((words[1], words[2]))
        return found

    def _is_owned(self, table: TableId) -> bool:
        # Text output, for the reason in _list(). The header reads
        # "table inet qvm { # progname python" then "\tflags owner".
        rc, out, _ = self._text(f"list table {table[0]} {table[1]}")
        head = out.splitlines()[:3] if rc == 0 else []
        return any(line.strip().startswith("flags") and "owner" in line for line in head)

    def _contents_of(self, table: TableId) -> list[JSON]:
        """Chains with their rules, sets, maps and counters of one table."""
        family, name = table
        out: list[JSON] = []
        for c in self._list({"chains": {"family": family}}):
            if c["chain"]["table"] == name:
                out += self._list(
                    {"chain": {"family": family, "table": name, "name": c["chain"]["name"]}}
                )
        for kind in ("sets", "maps"):
            out += [
                o
                for o in self._list({kind: {"family": family}})
                if next(iter(o.values()))["table"] == name
            ]
        out += self._list({"counters": {"family": family, "table": name}})
        return out

    # -- table creation --------------------------------------------------------

    def _take_owned(self, table: TableId, exists: bool) -> bool:
        """Create `table` with the owner flag (replacing an unowned one).

        Returns False, and remembers it, if the kernel refuses the flag.
        """
        family, name = table
        if exists:
            if self._is_owned(table):
                raise Busy(
                    f"nft table {family} {name} is owned by another process; "
                    "is another qvmd running in this network namespace?"
                )
            # Left by a qvmd without the owner flag, or made by hand. The
            # empty table between this and the next batch filters nothing.
            cmd = f"delete table {family} {name}\nadd table {family} {name} {{ flags owner; }}"
        else:
            cmd = f"add table {family} {name} {{ flags owner; }}"
        rc, _, err = self._text(cmd)
        if rc == 0:
            self._owner_supported = True
            self._contents[table] = []
            return True
        if self._owner_supported:
            raise Failed(f"cannot create nft table {family} {name}: {err.strip()}")
        # Kernels before 5.12 refuse the flag: remember, go without.
        log.warning("nft table owner flag unsupported, going without: %s", err.strip())
        self._owner_supported = False
        return False

    # -- public API ----------------------------------------------------------

    def apply(self, ruleset: JSON) -> None:
        """Replace our tables' whole content with `ruleset` in one transaction."""
        objects = ruleset["nftables"]
        tables = _tables_of(ruleset)
        if set(tables) - set(self._tables):
            raise Failed(f"ruleset names tables {tables} outside {list(self._tables)}")
        with self._lock:
            existing = set(self._existing_tables())
            batch: list[JSON] = []
            for table in tables:
                family, name = table
                ref = {"family": family, "name": name}
                if table in self._contents and table not in existing:
                    del self._contents[table]  # gone under us (cannot happen while owned)
                owned = table in self._contents
                if not owned and self._want_owner and self._owner_supported is not False:
                    owned = self._take_owned(table, table in existing)
                if owned:
                    # Flush (rules first: they hold references), then delete
                    # every object; the table and its flag stay.
                    batch.append({"flush": {"table": ref}})
                    for kind in _CONTAINED_KINDS:
                        batch += [
                            {"delete": {k: {"family": family, "table": name, "name": n}}}
                            for k, n in self._contents[table]
                            if k == kind
                        ]
                else:
                    # The classic idiom: add (no-op if present), delete, add.
                    batch += [
                        {"add": {"table": ref}},
                        {"delete": {"table": ref}},
                        {"add": {"table": ref}},
                    ]
            for o in objects:
                if "table" not in o:
                    batch.append({"add": o})
            rc, _, err = self._json({"nftables": batch})
            if rc != 0:
                self._applied_desired = None
                if "Operation not permitted" in err:
                    raise Busy(
                        "nft refused to change our tables (owned by another process?): "
                        + err.strip()
                    )
                raise Failed(f"nft refused the ruleset: {err.strip()}")
            for table in tables:
                if table in self._contents:
                    self._contents[table] = [
                        (kind, body["name"])
                        for o in objects
                        for kind, body in o.items()
                        if kind != "rule"
                        and kind != "table"
                        and (body["family"], body["table"]) == table
                    ]
            self._applied_desired = _canonical(ruleset)
            self._applied_listing = self._listing_of(tables)

    def observe(self, ruleset: JSON) -> Observation:
        """Compare the kernel with what `apply(ruleset)` put there."""
        with self._lock:
            existing = set(self._existing_tables())
            missing = tuple(t for t in self._tables if t not in existing)
            owned = not missing and all(self._is_owned(t) for t in self._tables)
            if missing or self._applied_desired != _canonical(ruleset):
                return Observation(missing, False, owned)
            listing = self._listing_of(_tables_of(ruleset))
            return Observation(missing, listing == self._applied_listing, owned)

    def remove(self) -> list[TableId]:
        """Delete our tables (only ours); absent ones are fine. Returns what was deleted."""
        with self._lock:
            existing = set(self._existing_tables())
            present = [t for t in self._tables if t in existing]
            self._applied_desired = None
            self._applied_listing = None
            self._contents.clear()
            if not present:
                return []
            rc, _, err = self._json(
                {"nftables": [{"delete": {"table": {"family": f, "name": n}}} for f, n in present]}
            )
            if rc != 0 and "No such file or directory" not in err:
                if "Operation not permitted" in err:
                    raise Busy(f"nft table owned by another process: {err.strip()}")
                raise Failed(f"cannot delete our nft tables: {err.strip()}")
            return present

    def list_ruleset(self) -> JSON:
        """The namespace's whole ruleset in `nft -j list ruleset` shape, for doctor.

        Assembled from per-object listings (see _list() for why); table
        objects carry only family and name.
        """
        with self._lock:
            out: list[JSON] = [
                {"table": {"family": f, "name": n}} for f, n in self._existing_tables()
            ]
            for c in self._list({"chains": None}):
                ch = c["chain"]
                ref = {"family": ch["family"], "table": ch["table"], "name": ch["name"]}
                out += self._list({"chain": ref})
            out += self._list({"sets": None}) + self._list({"maps": None})
            return {"nftables": out}

    def counters(self) -> dict[str, int]:
        """Packets counted by each named counter in our tables ("family/name")."""
        with self._lock:
            existing = set(self._existing_tables())
            out: dict[str, int] = {}
            for family, name in self._tables:
                if (family, name) not in existing:
                    continue
                for o in self._list({"counters": {"family": family, "table": name}}):
                    c = o["counter"]
                    out[f"{c['family']}/{c['name']}"] = int(c.get("packets", 0))
            return out

    def _listing_of(self, tables: Iterable[TableId]) -> list[JSON]:
        out: list[JSON] = []
        for t in tables:
            out += _normalize(self._contents_of(t))
        return out


def _tables_of(ruleset: JSON) -> list[TableId]:
    return [(o["table"]["family"], o["table"]["name"]) for o in ruleset["nftables"] if "table" in o]


def _canonical(ruleset: JSON) -> str:
    return json.dumps(ruleset, sort_keys=True)


def _normalize(listing: list[JSON]) -> list[JSON]:
    """Drop what changes without anyone changing the ruleset: handles, counts."""
    out: list[JSON] = []
    for obj in listing:
        ((kind, body),) = obj.items()
        clean = {k: v for k, v in body.items() if k not in ("handle", "packets", "bytes")}
        out.append({kind: clean})
    return out


def enable_localhost_forwards(bridge: str) -> None:
    """Let forwards work from the host's own 127.0.0.1 (`curl localhost:6443`).

    The kernel refuses to route a packet with a loopback source out of a
    real interface unless route_localnet is on for that interface; after
    output DNAT the packet to 127.0.0.1:PORT leaves through the bridge, and
    postrouting masquerades it to the gateway address. The input chain drops
    anything from the bridge to 127.0.0.0/8, which route_localnet would
    otherwise let guests reach (Docker's CVE-2020-8558). Call it whenever the
    bridge is (re)created: the setting lives on the interface.
    """
    validate_ifname(bridge, "bridge name")
    Path(f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet").write_text("1\n")
