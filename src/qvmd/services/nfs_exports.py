"""The lab's NFS exports: what is shared, under which name, with what rights.

Pure: parsing the `[nfs]` table of the config and checking exports needs
no root and touches nothing. The ganesha config is built from these
(`ganesha.build_ganesha_conf`).

Decisions, written down in docs/nfs.md:

- A relative `path` is taken under `<state dir>/nfs/` (`$QVM_DIR/nfs/`), so
  the default share (`lab` → `$QVM_DIR/nfs/lab`, pseudo path `/lab`) follows
  `--state-dir` and the config parser does not need to know the state dir.
- An absolute `path` may be anywhere the admin chooses (the config file is
  root's) except where exporting would leak secrets or make no sense: `/`,
  the kernel's pseudo file systems, `/etc`, `/boot`, and qvmd's own state
  directory (it holds the CA's private key), apart from its `nfs/` subtree.
- Clients are the lab subnet unless narrowed; a client network outside the
  lab subnet is refused, since ganesha only listens on the services address
  anyway and a wider rule would only mislead.
- `root_squash` by default: root on a guest becomes `nobody` (65534) on the
  share, so a compromised guest cannot create set-uid-root files that
  another guest would run, nor read root-only files on the share.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network
from pathlib import PurePosixPath
from typing import Any, Literal, cast

from qvmd.errors import ConfigError, InvalidArgument
from qvmd.names import validate_label

Access = Literal["rw", "ro"]
Squash = Literal["root_squash", "no_root_squash", "all_squash"]

ACCESS_VALUES: tuple[Access, ...] = ("rw", "ro")
SQUASH_VALUES: tuple[Squash, ...] = ("root_squash", "no_root_squash", "all_squash")

# nobody/nogroup on Debian and Fedora. ganesha's own default (-2, i.e.
# 4294967294) would leave files owned by a number no tool can name.
DEFAULT_ANON_ID = 65534
NFS_SUBDIR = "nfs"
DEFAULT_EXPORT_NAME = "lab"

# Never exported, nor anything under them, nor any of their parents ("/").
FORBIDDEN_TREES = tuple(
    PurePosixPath(p) for p in ("/proc", "/sys", "/dev", "/run", "/boot", "/etc")
)

# What may appear inside a quoted ganesha config string: a path with a `"`,
# `\`, `;`, `{`, `}` or `#` could end the string and add config of its own.
_SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9._+@%=,:/ -]+$")


@dataclass(frozen=True)
class Export:
    """One share. `path` is absolute, or relative to `<state dir>/nfs/`
    until `resolve_exports` makes it absolute."""

    export_id: int
    name: str
    path: PurePosixPath
    pseudo: PurePosixPath
    access: Access = "rw"
    squash: Squash = "root_squash"
    # Empty: the whole lab subnet.
    clients: tuple[IPv4Network, ...] = field(default_factory=tuple)
    anon_uid: int = DEFAULT_ANON_ID
    anon_gid: int = DEFAULT_ANON_ID


@dataclass(frozen=True)
class NfsSettings:
    enabled: bool = True
    exports: tuple[Export, ...] = field(default_factory=lambda: default_exports())


def default_exports() -> tuple[Export, ...]:
    """One read-write share, `$QVM_DIR/nfs/lab`, seen by guests as `/lab`."""
    return (
        Export(
            export_id=1,
            name=DEFAULT_EXPORT_NAME,
            path=PurePosixPath(DEFAULT_EXPORT_NAME),
            pseudo=PurePosixPath("/" + DEFAULT_EXPORT_NAME),
        ),
    )


def _check_path_text(text: str, what: str) -> PurePosixPath:
    if not text:
        raise InvalidArgument(f"{what} is empty")
    if not _SAFE_PATH_RE.match(text):
        raise InvalidArgument(
            f"{what} {text!r} may only contain letters, digits, spaces and . _ + @ % = , : / -"
        )
    path = PurePosixPath(text)
    # PurePosixPath drops "." and repeated slashes but keeps "..": a path
    # with ".." could point anywhere once symlinks resolve, so refuse it.
    if ".." in path.parts:
        raise InvalidArgument(f"{what} {text!r} must not contain '..'")
    return path


def check_pseudo(text: str) -> PurePosixPath:
    pseudo = _check_path_text(text, "pseudo path")
    if not pseudo.is_absolute():
        raise InvalidArgument(f"pseudo path {text!r} must start with '/'")
    if pseudo == PurePosixPath("/"):
        raise InvalidArgument("pseudo path '/' is ganesha's own pseudo root; use '/NAME'")
    return pseudo


def check_export(export: Export, subnet: IPv4Network) -> None:
    """One export on its own (paths may still be relative)."""
    validate_label(export.name, "export name")
    if not 1 <= export.export_id <= 65535:
        # 0 is the pseudo root ganesha makes itself; the id is 16 bits.
        raise InvalidArgument(f"export id {export.export_id} is not between 1 and 65535")
    _check_path_text(str(export.path), "export path")
    check_pseudo(str(export.pseudo))
    if export.access not in ACCESS_VALUES:
        raise InvalidArgument(f"access {export.access!r} is not one of {', '.join(ACCESS_VALUES)}")
    if export.squash not in SQUASH_VALUES:
        raise InvalidArgument(f"squash {export.squash!r} is not one of {', '.join(SQUASH_VALUES)}")
    for net in export.clients:
        if not net.subnet_of(subnet):
            raise InvalidArgument(f"client network {net} is outside the lab subnet {subnet}")
    for what, value in (("anonymous uid", export.anon_uid), ("anonymous gid", export.anon_gid)):
        if not 0 <= value < 2**32 - 1:
            raise InvalidArgument(f"{what} {value} is not a valid id")


def check_exports(exports: Iterable[Export], subnet: IPv4Network) -> None:
    """Each export valid, and ids, names and pseudo paths unique.

    Pseudo paths must also not nest (`/lab` and `/lab/x`): ganesha would
    accept it, but the inner export would hide a directory of the outer
    one, which is never what a lab share wants.
    """
    seen_ids: dict[int, str] = {}
    seen_names: set[str] = set()
    seen_pseudo: dict[PurePosixPath, str] = {}
    for e in exports:
        check_export(e, subnet)
        if e.export_id in seen_ids:
            raise InvalidArgument(
                f"export id {e.export_id} is used by both {seen_ids[e.export_id]!r} and {e.name!r}"
            )
        seen_ids[e.export_id] = e.name
        if e.name in seen_names:
            raise InvalidArgument(f"export name {e.name!r} is used twice")
        seen_names.add(e.name)
        for other, other_name in seen_pseudo.items():
            if (
                e.pseudo == other
                or e.pseudo.is_relative_to(other)
                or other.is_relative_to(e.pseudo)
            ):
                raise InvalidArgument(
                    f"pseudo path {str(e.pseudo)!r} of {e.name!r} overlaps "
                    f"{str(other)!r} of {other_name!r}"
                )
        seen_pseudo[e.pseudo] = e.name


def resolve_export_path(path: PurePosixPath, state_dir: PurePosixPath) -> PurePosixPath:
    """The absolute directory to export, refused where exporting is unsafe."""
    if not state_dir.is_absolute():
        raise InvalidArgument(f"state directory {str(state_dir)!r} is not absolute")
    share_root = state_dir / NFS_SUBDIR
    full = path if path.is_absolute() else share_root / path
    if full == share_root:
        raise InvalidArgument(
            f"export path {str(full)!r} is the share root; name a directory in it"
        )
    for tree in FORBIDDEN_TREES:
        if full.is_relative_to(tree) or tree.is_relative_to(full):
            raise InvalidArgument(f"export path {str(full)!r} would export {str(tree)!r}")
    if state_dir.is_relative_to(full) or (
        full.is_relative_to(state_dir) and not full.is_relative_to(share_root)
    ):
        raise InvalidArgument(
            f"export path {str(full)!r} would export qvmd's state (and the CA key); "
            f"shares inside {str(state_dir)!r} go under {str(share_root)!r}"
        )
    return full


def resolve_exports(exports: Iterable[Export], state_dir: PurePosixPath) -> tuple[Export, ...]:
    """The exports with absolute, checked paths (ganesha needs absolute ones)."""
    return tuple(replace(e, path=resolve_export_path(e.path, state_dir)) for e in exports)


# --- the [nfs] table of qvmd.toml ------------------------------------------

_EXPORT_KEYS = {
    "id", "name", "path", "pseudo", "access", "squash", "clients", "anon_uid", "anon_gid",
}  # fmt: skip


def _typed(table: Mapping[str, Any], key: str, typ: type, where: str) -> Any:
    value = table[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key}", f"must be {typ.__name__}, not {type(value).__name__}")
    return value


def parse_nfs_table(data: object, subnet: IPv4Network) -> NfsSettings:
    """`[nfs]` → NfsSettings; every error names its key (`nfs.exports[1].path`).

    No `[nfs]` table, or one without `exports`: the default share. An empty
    `exports = []` means no share (ganesha is then not started).
    """
    if data is None:
        return NfsSettings()
    if not isinstance(data, dict):
        raise ConfigError("nfs", f"must be a table, not {type(data).__name__}")
    unknown = sorted(set(data) - {"enabled", "exports"})
    if unknown:
        raise ConfigError(f"nfs.{unknown[0]}", "unknown key")
    enabled = _typed(data, "enabled", bool, "nfs") if "enabled" in data else True
    if "exports" not in data:
        exports = default_exports()
    else:
        raw = data["exports"]
        if not isinstance(raw, list):
            raise ConfigError("nfs.exports", "must be an array of tables ([[nfs.exports]])")
        exports = tuple(_parse_export(item, i) for i, item in enumerate(raw))
    # Check growing prefixes: the first that fails names the culprit's index.
    for i in range(len(exports)):
        try:
            check_exports(exports[: i + 1], subnet)
        except InvalidArgument as e:
            raise ConfigError(f"nfs.exports[{i}]", str(e)) from None
    return NfsSettings(enabled=enabled, exports=exports)


def _parse_export(item: object, i: int) -> Export:
    where = f"nfs.exports[{i}]"
    if not isinstance(item, dict):
        raise ConfigError(where, f"must be a table, not {type(item).__name__}")
    unknown = sorted(set(item) - _EXPORT_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown key")
    if "name" not in item:
        raise ConfigError(f"{where}.name", "is required")

    def field_of(key: str, typ: type, default: Any) -> Any:
        return _typed(item, key, typ, where) if key in item else default

    def checked(key: str, fn: Any, value: Any) -> Any:
        try:
            return fn(value)
        except InvalidArgument as e:
            raise ConfigError(f"{where}.{key}", str(e)) from None

    name = checked("name", lambda v: validate_label(v, "export name"), field_of("name", str, ""))
    # The id is in every file handle a client holds: keep it stable. By
    # default it follows the position, so reordering [[nfs.exports]]
    # changes it (clients then see ESTALE) unless `id` is given.
    export_id = field_of("id", int, i + 1)
    path = checked(
        "path", lambda v: _check_path_text(v, "export path"), field_of("path", str, name)
    )
    pseudo = checked("pseudo", check_pseudo, field_of("pseudo", str, f"/{name}"))
    access = field_of("access", str, "rw")
    if access not in ACCESS_VALUES:
        raise ConfigError(f"{where}.access", f"{access!r} is not one of {', '.join(ACCESS_VALUES)}")
    squash = field_of("squash", str, "root_squash")
    if squash not in SQUASH_VALUES:
        raise ConfigError(f"{where}.squash", f"{squash!r} is not one of {', '.join(SQUASH_VALUES)}")
    clients = []
    for j, text in enumerate(field_of("clients", list, [])):
        key = f"{where}.clients[{j}]"
        if not isinstance(text, str):
            raise ConfigError(key, f"must be a string, not {type(text).__name__}")
        try:
            clients.append(IPv4Network(text, strict=True))
        except ValueError as e:
            raise ConfigError(key, f"{text!r} is not an IPv4 network ({e})") from None
    export = Export(
        export_id=export_id,
        name=name,
        path=path,
        pseudo=pseudo,
        access=cast(Access, access),
        squash=cast(Squash, squash),
        clients=tuple(clients),
        anon_uid=field_of("anon_uid", int, DEFAULT_ANON_ID),
        anon_gid=field_of("anon_gid", int, DEFAULT_ANON_ID),
    )
    return export
