"""state.json: round trip, and a corrupt file set aside rather than trusted."""

from __future__ import annotations

import json
from pathlib import Path

from qvmd.links import TapSpec
from qvmd.state import PlaneState, StateStore


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = PlaneState(
        forwarding_restore=True,
        taps={
            "qvm0tap9": TapSpec("qvm0tap9", 1000, 100, True),
            "qvm0tap1": TapSpec("qvm0tap1", 0, None),
        },
        cert_owners={"registry.qvm0.lan": 1000},
    )
    store.save(state)
    assert store.load() == state
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o644
    # Assembled from remembered per-TAP entries, it is still plain JSON.
    assert json.loads((tmp_path / "state.json").read_text()) == {
        "version": 1,
        "forwarding_restore": True,
        "taps": {
            "qvm0tap1": {"uid": 0, "gid": None, "multi_queue": False},
            "qvm0tap9": {"uid": 1000, "gid": 100, "multi_queue": True},
        },
        "cert_owners": {"registry.qvm0.lan": 1000},
    }
    # An entry that changed is encoded anew, not served from memory.
    state.taps["qvm0tap9"] = TapSpec("qvm0tap9", 1001, None, False)
    store.save(state)
    assert store.load() == state


def test_empty_state_is_valid_json(tmp_path: Path) -> None:
    StateStore(tmp_path).save(PlaneState())
    assert StateStore(tmp_path).load() == PlaneState()
    assert json.loads((tmp_path / "state.json").read_text())["taps"] == {}


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "nope").load() == PlaneState()


def test_corrupt_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    assert StateStore(tmp_path).load() == PlaneState()
    assert (tmp_path / "state.corrupt").read_text() == "{not json"
