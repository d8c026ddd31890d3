"""Writing a child's configuration files: only what differs, atomically,
and saying what the running child needs for it (nothing, SIGHUP, restart).

dnsmasq and ganesha both re-read some files on SIGHUP and not others; each
file is declared with the change it needs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from pathlib import Path

from qvmd.fsutil import atomic_write


class Change(enum.Enum):
    NONE = "none"
    RELOAD = "reload"  # a file the child re-reads on SIGHUP changed
    RESTART = "restart"  # a file it reads only at start changed


def write_changed(files: Iterable[tuple[Path, str, Change]], mode: int) -> Change:
    """Write each (path, text) that differs from the disk; the strongest need wins."""
    change = Change.NONE
    for path, text, needs in files:
        data = text.encode()
        try:
            if path.read_bytes() == data:
                continue
        except FileNotFoundError:
            pass
        atomic_write(path, data, mode=mode)
        if needs is Change.RESTART or change is Change.NONE:
            change = needs
    return change
