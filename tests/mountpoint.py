"""A directory to mount over in a private mount namespace, made only if missing.

`mount --bind X /run/systemd` needs /run/systemd to exist. A machine whose
PID 1 is not systemd may not have it; then it is made for the test and
removed afterwards (it stays empty: everything is mounted over it in
private mount namespaces only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def mountpoint(path: Path) -> Iterator[Path]:
    made = not path.exists()
    if made:
        path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()
