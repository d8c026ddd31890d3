"""Port-forward validation, ownership and persistence. No root.

Persistence uses a real temporary state directory and qvmd.fsutil's atomic
write, so a round trip here is what the daemon does across a restart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvmd.errors import Busy, Failed, InvalidArgument, NotFound, PermissionDenied, QvmError
from qvmd.firewall.forwards import (
    FORWARDS_FILE,
    PortForward,
    add_forward,
    forwards_from_json,
    forwards_to_json,
    load_forwards,
    prune_forwards,
    remove_forward,
    save_forwards,
)
from qvmd.model import default_lab

LAB = default_lab()
USER, OTHER = 1000, 1001


def add(fwds: Any, *args: Any, uid: int = USER, admin: bool = False) -> Any:
    return add_forward(LAB, fwds, *args, caller_uid=uid, is_admin=admin)


def test_add_then_list_sorted() -> None:
    fwds, new = add((), "tcp", 6443, "cp", 6443)
    assert new == PortForward("tcp", 6443, "cp", 6443, USER)
    fwds, _ = add(fwds, "UDP", 5353, "wk-1", 53)
    fwds, _ = add(fwds, "tcp", 2222, "wk-2", 22)
    assert fwds == (
        PortForward("tcp", 2222, "wk-2", 22, USER),
        PortForward("tcp", 6443, "cp", 6443, USER),
        PortForward("udp", 5353, "wk-1", 53, USER),
    )


@pytest.mark.parametrize(
    ("args", "admin", "error", "message"),
    [
        (("icmp", 6443, "cp", 6443), False, InvalidArgument, "protocol 'icmp'"),
        ((6, 6443, "cp", 6443), False, InvalidArgument, "protocol 6"),
        (("tcp", 0, "cp", 6443), False, InvalidArgument, "host port 0 is outside 1-65535"),
        (("tcp", 65536, "cp", 6443), False, InvalidArgument, "outside 1-65535"),
        (("tcp", 6443, "cp", 0), False, InvalidArgument, "guest port 0"),
        (("tcp", "6443", "cp", 6443), False, InvalidArgument, "must be an integer, not str"),
        (("tcp", True, "cp", 6443), False, InvalidArgument, "not bool"),
        (("tcp", 6443, "db", 6443), False, NotFound, "no guest named 'db'"),
        (("tcp", 6443, None, 6443), False, NotFound, "no guest named None"),
        (("tcp", 443, "cp", 443), False, PermissionDenied, "443 is privileged"),
        (("tcp", 1023, "cp", 443), False, PermissionDenied, "privileged"),
    ],
)
def test_refused(args: tuple[Any, ...], admin: bool, error: type[QvmError], message: str) -> None:
    with pytest.raises(error, match=message):
        add((), *args, admin=admin)


def test_privileged_ports_for_admins_and_1024_for_all() -> None:
    fwds, _ = add((), "tcp", 443, "cp", 443, admin=True)
    fwds, _ = add(fwds, "tcp", 1024, "cp", 8080)
    assert [f.host_port for f in fwds] == [443, 1024]


def test_duplicate_host_port_is_busy_per_protocol() -> None:
    fwds, _ = add((), "tcp", 6443, "cp", 6443)
    with pytest.raises(Busy, match="already forwarded to cp:6443"):
        add(fwds, "tcp", 6443, "wk-1", 6443, uid=OTHER)
    # The same number over UDP is another forward.
    fwds, _ = add(fwds, "udp", 6443, "wk-1", 6443)
    assert len(fwds) == 2


def test_remove_by_owner_or_admin_only() -> None:
    fwds, _ = add((), "tcp", 6443, "cp", 6443)
    with pytest.raises(PermissionDenied, match="forwarded by uid 1000"):
        remove_forward(fwds, "tcp", 6443, caller_uid=OTHER, is_admin=False)
    rest, gone = remove_forward(fwds, "tcp", 6443, caller_uid=USER, is_admin=False)
    assert rest == () and gone.guest == "cp"
    rest, _ = remove_forward(fwds, "tcp", 6443, caller_uid=OTHER, is_admin=True)
    assert rest == ()
    with pytest.raises(NotFound, match="udp host port 6443 is not forwarded"):
        remove_forward(fwds, "udp", 6443, caller_uid=USER, is_admin=True)


def test_prune_drops_forwards_to_guests_the_lab_lost() -> None:
    fwds = (PortForward("tcp", 2000, "cp", 22, 0), PortForward("tcp", 2001, "gone", 22, 0))
    kept, dropped = prune_forwards(LAB, fwds)
    assert [f.guest for f in kept] == ["cp"] and [f.guest for f in dropped] == ["gone"]


def test_persistence_round_trip(tmp_path: Path) -> None:
    assert load_forwards(tmp_path) == ()  # no file yet
    fwds, _ = add((), "tcp", 6443, "cp", 6443)
    fwds, _ = add(fwds, "udp", 5353, "wk-1", 53, uid=0)
    save_forwards(tmp_path, fwds)
    path = tmp_path / FORWARDS_FILE
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert load_forwards(tmp_path) == fwds
    # Nothing but the file is left (the temp file was renamed over it).
    assert os.listdir(tmp_path) == [FORWARDS_FILE]
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert doc["forwards"][0] == {
        "proto": "tcp",
        "host_port": 6443,
        "guest": "cp",
        "guest_port": 6443,
        "owner_uid": USER,
    }


@given(
    st.lists(
        st.builds(
            PortForward,
            st.sampled_from(["tcp", "udp"]),
            st.integers(1, 65535),
            st.sampled_from(["cp", "wk-1", "wk-2"]),
            st.integers(1, 65535),
            st.integers(0, 2**32 - 1),
        ),
        unique_by=lambda f: f.key,
        max_size=20,
    )
)
def test_json_round_trip(fwds: list[PortForward]) -> None:
    assert forwards_from_json(forwards_to_json(fwds)) == tuple(sorted(fwds))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "expected an object"),
        (b'{"version": 2, "forwards": []}', "expected an object"),
        (b'{"version": 1, "forwards": {}}', "must be a list"),
        (b'{"version": 1, "forwards": [1]}', r"forwards\[0\]: must be an object"),
        (
            b'{"version": 1, "forwards": [{"proto": "tcp", "host_port": 1, "guest": "cp",'
            b' "guest_port": 1}]}',
            "keys must be exactly",
        ),
        (
            b'{"version": 1, "forwards": [{"proto": "tcp", "host_port": 99999, "guest": "cp",'
            b' "guest_port": 1, "owner_uid": 0}]}',
            r"forwards\[0\]: host port 99999",
        ),
        (
            b'{"version": 1, "forwards": [{"proto": "tcp", "host_port": 1, "guest": "cp",'
            b' "guest_port": 1, "owner_uid": -1}]}',
            "owner_uid",
        ),
        (
            b'{"version": 1, "forwards": ['
            b'{"proto": "tcp", "host_port": 1, "guest": "cp", "guest_port": 1, "owner_uid": 0},'
            b'{"proto": "tcp", "host_port": 1, "guest": "wk-1", "guest_port": 2, "owner_uid": 0}'
            b"]}",
            "appears twice",
        ),
    ],
)
def test_corrupt_file_is_refused_with_the_reason(data: bytes, message: str, tmp_path: Path) -> None:
    (tmp_path / FORWARDS_FILE).write_bytes(data)
    with pytest.raises(Failed, match=message) as exc:
        load_forwards(tmp_path)
    assert str(tmp_path / FORWARDS_FILE) in str(exc.value)
