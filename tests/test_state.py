"""state.json: round trip, and a corrupt file set aside rather than trusted."""

from __future__ import annotations

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


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "nope").load() == PlaneState()


def test_corrupt_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    assert StateStore(tmp_path).load() == PlaneState()
    assert (tmp_path / "state.corrupt").read_text() == "{not json"
