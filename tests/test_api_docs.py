"""docs/api.md documents every method, signal, property and action the
daemon really exports (built from the same table as the dispatcher)."""

from __future__ import annotations

import re
from pathlib import Path

from qvmd.bus.api import build_interface
from qvmd.bus.service import PUBLIC

DOC = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
POLICY = (
    Path(__file__).resolve().parent.parent / "data" / "polkit" / "org.qvm.Net.policy"
).read_text()


def test_every_method_signal_and_property_is_documented() -> None:
    iface = build_interface(None)  # type: ignore[arg-type]  # only names are read
    for m in iface.methods:
        assert re.search(rf"\*\*`{m.name}\(", DOC), f"docs/api.md lacks method {m.name}"
    for s in iface.signals:
        assert f"`{s.name}(" in DOC, f"docs/api.md lacks signal {s.name}"
    for p in iface.properties:
        assert f"`{p.name}`" in DOC, f"docs/api.md lacks property {p.name}"


def test_every_action_is_shipped_and_documented() -> None:
    iface = build_interface(None)  # type: ignore[arg-type]
    actions = {m.action for m in iface.methods} - {PUBLIC}
    shipped = set(re.findall(r'<action id="([^"]+)"', POLICY))
    assert actions == shipped
    for action in actions:
        assert f"`{action}`" in DOC
