"""Pure tests of the NFS parts: no root, no processes.

ganesha's two files are compared with golden files under tests/golden/ganesha/
(regenerate with QVMD_UPDATE_GOLDEN=1 and review the diff); the export model,
the `[nfs]` config table and the path rules are table-tested.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from ipaddress import IPv4Network
from pathlib import Path, PurePosixPath

import pytest

from qvmd.errors import ConfigError, Failed, InvalidArgument
from qvmd.model import default_lab
from qvmd.services import ganesha
from qvmd.services.conffiles import Change
from qvmd.services.ganesha import (
    GaneshaFiles,
    GaneshaPaths,
    build_ganesha_conf,
    build_ganesha_exports,
    build_ganesha_files,
    ensure_export_dirs,
    ganesha_argv,
    ganesha_child,
    write_ganesha_files,
)
from qvmd.services.nfs_exports import (
    Export,
    NfsSettings,
    check_exports,
    default_exports,
    parse_nfs_table,
    resolve_export_path,
    resolve_exports,
)
from tests import golden

GOLDEN = Path(__file__).parent / "golden" / "ganesha"
STATE = PurePosixPath("/var/lib/qvmd")
PATHS = GaneshaPaths(Path("/var/lib/qvmd/ganesha"))
LAB = default_lab()
SUBNET = LAB.subnet


def check_golden(name: str, text: str) -> None:
    golden.check_golden(GOLDEN / name, text)


def export(name: str = "lab", export_id: int = 1, **kw: object) -> Export:
    return Export(
        export_id=export_id,
        name=name,
        path=kw.pop("path", PurePosixPath(f"/srv/{name}")),  # type: ignore[arg-type]
        pseudo=kw.pop("pseudo", PurePosixPath(f"/{name}")),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


# --- golden ------------------------------------------------------------------


def test_default_lab_files_match_golden() -> None:
    exports = resolve_exports(NfsSettings().exports, STATE)
    files = build_ganesha_files(LAB, exports, PATHS)
    check_golden("ganesha.conf", files.conf)
    check_golden("exports.conf", files.exports)


def test_several_exports_match_golden() -> None:
    exports = resolve_exports(
        (
            export("tools", 7, path=PurePosixPath("/srv/tools"), access="ro"),
            export("scratch", 3, path=PurePosixPath("scratch"), squash="all_squash"),
            export(
                "cp-only",
                4,
                path=PurePosixPath("cp"),
                pseudo=PurePosixPath("/private/cp"),
                squash="no_root_squash",
                clients=(IPv4Network("10.42.0.10/32"),),
                anon_uid=1000,
                anon_gid=1000,
            ),
        ),
        STATE,
    )
    check_golden("exports-several.conf", build_ganesha_exports(LAB, exports))


# --- what the config says, line by line ---------------------------------------


def test_core_conf_is_nfsv4_only_on_the_services_address() -> None:
    lines = [line.strip() for line in build_ganesha_conf(LAB, PATHS).splitlines()]
    for expected in [
        "Bind_Addr = 10.42.0.2;",
        "NFS_Port = 2049;",
        "Protocols = 4;",
        "Enable_UDP = false;",
        "Enable_NLM = false;",
        "Enable_RQUOTA = false;",
        "Graceless = true;",
        'RecoveryRoot = "/var/lib/qvmd/ganesha/recovery";',
        'CCacheDir = "/var/lib/qvmd/ganesha/krb5cc";',
        "Active_krb5 = false;",
        "Access_Type = None;",
        '%include "/var/lib/qvmd/ganesha/exports.conf"',
    ]:
        assert expected in lines, f"ganesha.conf lacks {expected!r}"
    text = "\n".join(lines)
    assert "/var/lib/nfs" not in text and "/var/run" not in text


def test_services_address_follows_the_lab() -> None:
    from ipaddress import IPv4Address, IPv4Interface

    lab = replace(
        LAB,
        gateway=IPv4Interface("192.168.50.1/24"),
        services=replace(LAB.services, address=IPv4Address("192.168.50.2")),
    )
    assert "    Bind_Addr = 192.168.50.2;" in build_ganesha_conf(lab, PATHS).splitlines()
    exports = build_ganesha_exports(lab, [export()]).splitlines()
    assert exports.count("        Clients = 192.168.50.0/24;") == 2  # pseudo root + share


def test_every_export_is_restricted_to_its_clients() -> None:
    text = build_ganesha_exports(
        LAB, [export("a", 1), export("b", 2, clients=(IPv4Network("10.42.0.8/29"),))]
    )
    blocks = text.split("EXPORT {")[1:]
    assert len(blocks) == 3  # pseudo root, a, b
    assert "Clients = 10.42.0.0/24;" in blocks[0] and "FSAL { Name = PSEUDO; }" in blocks[0]
    assert "Clients = 10.42.0.0/24;" in blocks[1] and "Squash = root_squash;" in blocks[1]
    assert "Clients = 10.42.0.8/29;" in blocks[2]
    for b in blocks:
        assert "Protocols = 4;" in b and "Transports = TCP;" in b and "SecType = sys;" in b


def test_exports_need_absolute_paths() -> None:
    with pytest.raises(InvalidArgument, match="not absolute"):
        build_ganesha_exports(LAB, [export(path=PurePosixPath("lab"))])


def test_builder_checks_exports() -> None:
    with pytest.raises(InvalidArgument, match="export id 1 is used by both"):
        build_ganesha_exports(LAB, [export("a", 1), export("b", 1)])


def test_state_path_that_would_break_the_config_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="cannot be written"):
        build_ganesha_conf(LAB, GaneshaPaths(Path('/var/lib/q"; Bind_Addr = 0.0.0.0; #')))


# --- argv and child -----------------------------------------------------------


def test_argv_runs_in_the_foreground_logging_to_stderr() -> None:
    assert ganesha_argv(PATHS) == (
        "ganesha.nfsd",
        "-F",
        "-L",
        "STDERR",
        "-N",
        "NIV_EVENT",
        "-f",
        "/var/lib/qvmd/ganesha/ganesha.conf",
        "-p",
        "/var/lib/qvmd/ganesha/ganesha.pid",
    )


def test_child_runs_isolated_in_the_services_namespace() -> None:
    spec = ganesha_child(LAB, PATHS, python="/usr/bin/python3")
    assert spec.name == "ganesha"
    assert spec.netns == "qvm-services"
    assert spec.argv[:4] == ("/usr/bin/python3", "-m", "qvmd.services.ganesha", "--")
    assert spec.argv[4:] == ganesha_argv(PATHS)
    assert spec.stop_timeout >= 5


def test_child_never_gets_the_real_system_bus() -> None:
    for isolate in (True, False):
        env = ganesha_child(LAB, PATHS, isolate=isolate).env
        assert env is not None
        assert env["DBUS_SYSTEM_BUS_ADDRESS"] == "unix:path=/var/lib/qvmd/ganesha/no-system-bus"
        assert "PATH" in env and set(env) == {"PATH", "LANG", "DBUS_SYSTEM_BUS_ADDRESS"}


def test_child_without_isolation_execs_ganesha_directly() -> None:
    spec = ganesha_child(LAB, PATHS, binary="/opt/g/ganesha.nfsd", isolate=False)
    assert spec.argv[0] == "/opt/g/ganesha.nfsd"


def test_isolated_child_refuses_a_directory_under_run() -> None:
    with pytest.raises(InvalidArgument, match="under /run"):
        ganesha_child(LAB, GaneshaPaths(Path("/run/qvmd/ganesha")))
    ganesha_child(LAB, GaneshaPaths(Path("/run/qvmd/ganesha")), isolate=False)


def test_wrapper_without_command_is_a_usage_error() -> None:
    assert ganesha.main([]) == 2
    assert ganesha.main(["ganesha.nfsd"]) == 2


# --- the export model -----------------------------------------------------------


def test_default_export_is_the_lab_share() -> None:
    (e,) = default_exports()
    assert (e.export_id, e.name, e.access, e.squash) == (1, "lab", "rw", "root_squash")
    assert e.pseudo == PurePosixPath("/lab")
    assert resolve_export_path(e.path, STATE) == PurePosixPath("/var/lib/qvmd/nfs/lab")


@pytest.mark.parametrize(
    ("exports", "message"),
    [
        ([export(export_id=0)], "not between 1 and 65535"),
        ([export(export_id=65536)], "not between 1 and 65535"),
        ([export(name="Bad_Name")], "export name"),
        ([export(pseudo=PurePosixPath("/"))], "pseudo root"),
        ([export(pseudo=PurePosixPath("lab"))], "must start with '/'"),
        ([export(path=PurePosixPath("/srv/../etc"))], "'..'"),
        ([export(path=PurePosixPath('/srv/a"b'))], "may only contain"),
        ([export(path=PurePosixPath("/srv/a;b"))], "may only contain"),
        ([export(path=PurePosixPath("/srv/a\nb"))], "may only contain"),
        ([export(access="rx")], "access"),
        ([export(squash="squash_all")], "squash"),
        ([export(clients=(IPv4Network("10.42.1.0/24"),))], "outside the lab subnet"),
        ([export(clients=(IPv4Network("0.0.0.0/0"),))], "outside the lab subnet"),
        ([export(anon_uid=-1)], "anonymous uid"),
        ([export("a", 1), export("b", 1)], "export id 1 is used by both 'a' and 'b'"),
        ([export("a", 1), export("a", 2, path=PurePosixPath("/x"))], "name 'a' is used twice"),
        (
            [export("a", 1), export("b", 2, pseudo=PurePosixPath("/a"))],
            "'/a' of 'b' overlaps '/a' of 'a'",
        ),
        ([export("a", 1), export("b", 2, pseudo=PurePosixPath("/a/b"))], "overlaps"),
        (
            [
                export("a", 1, pseudo=PurePosixPath("/x/y")),
                export("b", 2, pseudo=PurePosixPath("/x")),
            ],
            "overlaps",
        ),
    ],
)
def test_bad_exports_are_refused(exports: list[Export], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")):
        check_exports(exports, SUBNET)


def test_good_exports_pass() -> None:
    check_exports(
        [
            export("a", 1, clients=(IPv4Network("10.42.0.10/32"), IPv4Network("10.42.0.128/25"))),
            export("b", 65535, pseudo=PurePosixPath("/ab")),  # a prefix by text, not by path
            export("c", 2, path=PurePosixPath("rel/dir"), access="ro", squash="all_squash"),
        ],
        SUBNET,
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("lab", "/var/lib/qvmd/nfs/lab"),
        ("a/b", "/var/lib/qvmd/nfs/a/b"),
        ("/srv/lab", "/srv/lab"),
        ("/home/dev/project", "/home/dev/project"),
        ("/var/lib/qvmd/nfs/x", "/var/lib/qvmd/nfs/x"),
        ("/var/lib/other", "/var/lib/other"),
    ],
)
def test_export_paths_resolve(path: str, expected: str) -> None:
    assert resolve_export_path(PurePosixPath(path), STATE) == PurePosixPath(expected)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/", "would export '/proc'"),
        ("/etc", "would export '/etc'"),
        ("/etc/ssl", "would export '/etc'"),
        ("/proc/1", "would export '/proc'"),
        ("/run/user/1000", "would export '/run'"),
        ("/var/lib/qvmd", "qvmd's state"),
        ("/var/lib", "qvmd's state"),
        ("/var", "qvmd's state"),
        ("/var/lib/qvmd/certs", "qvmd's state"),
        ("/var/lib/qvmd/nfs", "share root"),
        (".", "share root"),
    ],
)
def test_unsafe_export_paths_are_refused(path: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        resolve_export_path(PurePosixPath(path), STATE)


# --- the [nfs] config table -----------------------------------------------------


def test_no_nfs_table_gives_the_default_share() -> None:
    assert parse_nfs_table(None, SUBNET) == NfsSettings(True, default_exports())
    assert parse_nfs_table({}, SUBNET) == NfsSettings(True, default_exports())
    assert parse_nfs_table({"enabled": False}, SUBNET).enabled is False
    assert parse_nfs_table({"exports": []}, SUBNET).exports == ()


def test_nfs_table_with_exports() -> None:
    got = parse_nfs_table(
        {
            "exports": [
                {"name": "lab"},
                {
                    "name": "tools",
                    "id": 20,
                    "path": "/srv/tools",
                    "pseudo": "/t",
                    "access": "ro",
                    "squash": "all_squash",
                    "clients": ["10.42.0.10/32"],
                    "anon_uid": 1000,
                    "anon_gid": 100,
                },
            ]
        },
        SUBNET,
    )
    assert got.exports == (
        default_exports()[0],
        Export(
            20,
            "tools",
            PurePosixPath("/srv/tools"),
            PurePosixPath("/t"),
            "ro",
            "all_squash",
            (IPv4Network("10.42.0.10/32"),),
            1000,
            100,
        ),
    )


@pytest.mark.parametrize(
    ("table", "key", "reason"),
    [
        ([], "nfs", "must be a table"),
        ({"enable": True}, "nfs.enable", "unknown key"),
        ({"enabled": "yes"}, "nfs.enabled", "must be bool"),
        ({"exports": {"name": "x"}}, "nfs.exports", "array of tables"),
        ({"exports": ["x"]}, "nfs.exports[0]", "must be a table"),
        ({"exports": [{}]}, "nfs.exports[0].name", "is required"),
        ({"exports": [{"name": "a", "paht": "/x"}]}, "nfs.exports[0].paht", "unknown key"),
        ({"exports": [{"name": "a", "id": "1"}]}, "nfs.exports[0].id", "must be int"),
        ({"exports": [{"name": "a", "id": True}]}, "nfs.exports[0].id", "must be int"),
        ({"exports": [{"name": "A B"}]}, "nfs.exports[0].name", "export name"),
        ({"exports": [{"name": "a", "path": "/x/../etc"}]}, "nfs.exports[0].path", "'..'"),
        ({"exports": [{"name": "a", "pseudo": "a"}]}, "nfs.exports[0].pseudo", "start with"),
        ({"exports": [{"name": "a", "access": "RW"}]}, "nfs.exports[0].access", "not one of"),
        ({"exports": [{"name": "a", "squash": "root"}]}, "nfs.exports[0].squash", "not one of"),
        ({"exports": [{"name": "a", "clients": [1]}]}, "nfs.exports[0].clients[0]", "string"),
        (
            {"exports": [{"name": "a", "clients": ["10.42.0.1/24"]}]},
            "nfs.exports[0].clients[0]",
            "not an IPv4 network",
        ),
        (
            {"exports": [{"name": "a", "clients": ["10.0.0.0/8"]}]},
            "nfs.exports[0]",
            "outside the lab subnet",
        ),
        ({"exports": [{"name": "a", "id": 0}]}, "nfs.exports[0]", "not between"),
        (
            {"exports": [{"name": "a"}, {"name": "b", "path": "/x"}, {"name": "c", "id": 2}]},
            "nfs.exports[2]",
            "export id 2 is used by both 'b' and 'c'",
        ),
        (
            {"exports": [{"name": "a"}, {"name": "b", "pseudo": "/a/b"}]},
            "nfs.exports[1]",
            "overlaps",
        ),
    ],
)
def test_bad_nfs_tables_name_the_key(table: object, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_nfs_table(table, SUBNET)
    assert info.value.key == key, str(info.value)
    assert reason in info.value.reason


# --- the writers (a temp dir; no root needed) -------------------------------------


def test_write_reports_restart_reload_or_nothing(tmp_path: Path) -> None:
    paths = GaneshaPaths(tmp_path / "ganesha")
    exports = resolve_exports(default_exports(), PurePosixPath(tmp_path))
    files = build_ganesha_files(LAB, exports, paths)
    assert write_ganesha_files(paths, files) is Change.RESTART
    assert write_ganesha_files(paths, files) is Change.NONE
    more = (*exports, replace(exports[0], export_id=2, name="b", pseudo=PurePosixPath("/b")))
    files2 = build_ganesha_files(LAB, more, paths)
    assert write_ganesha_files(paths, files2) is Change.RELOAD
    assert paths.exports.read_text() == files2.exports
    files3 = GaneshaFiles(files2.conf.replace("Lease_Lifetime = 60", "Lease_Lifetime = 30"), "x")
    assert write_ganesha_files(paths, files3) is Change.RESTART
    for d in (paths.directory, paths.recovery, paths.ccache):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in (paths.conf, paths.exports):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert not paths.no_bus.exists()


def test_export_dirs_are_made_only_under_the_share_root(tmp_path: Path) -> None:
    root = tmp_path / "nfs"
    exports = resolve_exports(
        (export("a", 1, path=PurePosixPath("a")), export("b", 2, path=PurePosixPath("b/c"))),
        PurePosixPath(tmp_path),
    )
    assert ensure_export_dirs(exports, root) == [root / "a", root / "b" / "c"]
    assert stat.S_IMODE((root / "a").stat().st_mode) == 0o1777
    # Owned by the anonymous user: see ensure_export_dirs (fs.protected_regular).
    assert ((root / "a").stat().st_uid, (root / "a").stat().st_gid) == (65534, 65534)
    os.chmod(root / "a", 0o750)
    assert ensure_export_dirs(exports, root) == []
    assert stat.S_IMODE((root / "a").stat().st_mode) == 0o750  # the admin's choice stays
    outside = (export("x", 3, path=PurePosixPath(tmp_path / "elsewhere")),)
    with pytest.raises(Failed, match="does not exist"):
        ensure_export_dirs(outside, root)
    assert not (tmp_path / "elsewhere").exists()
