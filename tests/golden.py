"""Golden files: the expected output of a pure builder, reviewed as a diff.

`QVMD_UPDATE_GOLDEN=1 pytest ...` rewrites them; review with `git diff`.
"""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"


def check_golden(path: Path, text: str) -> None:
    if os.environ.get("QVMD_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"golden file {path} missing; run with QVMD_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs from its golden file {path}"
