"""Crash-safe file writes: temp file in the same directory, fsync, rename.

A reader (or qvmd after kill -9) sees either the old content or the new,
never a truncated file.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(
    path: str | Path, data: bytes, mode: int = 0o644, uid: int = -1, gid: int = -1
) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        # open() applies the umask; fchmod sets exactly what was asked.
        os.fchmod(fd, mode)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str | Path, mode: int) -> Path:
    """Create `path` (and parents) if missing and force its mode."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def sweep_stale_temp_files(directory: str | Path) -> list[Path]:
    """Remove atomic_write's temp files left by a process killed mid-write.

    They are named `.<file>.tmp-<pid>`; one whose pid is alive belongs to a
    writer still at work and is left alone.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return removed
    for path in entries:
        name = path.name
        if not name.startswith(".") or ".tmp-" not in name:
            continue
        pid = name.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
