"""qvmd installed and run under a real systemd (PID 1): the debian-host guest
(guests/debian/build-host.sh) booted under QEMU with no network device.

- `cached_debian_host()` / `build_debian_host()` the image (cache
  /var/cache/qvmd-guests/debian-host, or QVM_HOST_GUEST_CACHE).
- `stage_share()` what the guest gets on its second, read-only disk
  (ext4, label `qvmdsrc`): the tree `make install` needs, wheels of qvmd's
  PyPI dependencies (and of the build backend) for an offline pip, and the
  guest-side script `systemd_hosttest.sh`.
- `qemu_argv()` QEMU (TCG) with the overlay, that disk, and `-nic none`.
- `read_hosttest()` the guest's
  `QVM-HOSTTEST <step> ok|FAIL up=<guest uptime, s> <detail>` lines.

Everything qvmd does (bridge, TAPs, nftables, namespaces, its own D-Bus and
polkit) happens inside the guest's kernel; the host only runs QEMU.
No pytest imports, like tinyguest and debianguest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.debianguest import (
    DebianGuestError,
    DebianImage,
    _image_from_manifest,
    _parse_manifest,
    cached_debian,
    qemu_base_argv,
)
from tests.e2e.tinyguest import run_build_script

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "guests" / "debian" / "build-host.sh"
GUEST_SCRIPT = Path(__file__).resolve().parent / "systemd_hosttest.sh"
DEFAULT_CACHE = Path("/var/cache/qvmd-guests/debian-host")
SHARE_LABEL = "qvmdsrc"  # qvm-hosttest.service in the image mounts this label
# What `make install` reads (README.md: pyproject's readme).
TREE = ("Makefile", "pyproject.toml", "README.md", "src", "data", "scripts")

_LINE_RE = re.compile(r"QVM-HOSTTEST (\S+) (ok|FAIL) up=([0-9.]+) ?(.*)")
_END_RE = re.compile(r"QVM-HOSTTEST end up=([0-9.]+) phase=(\d) failed=(\d+)")


@dataclass(frozen=True)
class HostStep:
    name: str
    status: str  # ok | FAIL
    guest_uptime: float
    detail: str


def cache_dir() -> Path:
    return Path(os.environ.get("QVM_HOST_GUEST_CACHE") or DEFAULT_CACHE)


def cached_debian_host() -> DebianImage | None:
    return cached_debian(cache_dir())


def build_debian_host(timeout: float = 3600) -> DebianImage:
    try:
        stdout = run_build_script(BUILD_SCRIPT, cache_dir(), timeout)
    except RuntimeError as exc:
        raise DebianGuestError(str(exc)) from None
    return _image_from_manifest(_parse_manifest(stdout))


def wheel_requirements() -> list[str]:
    """qvmd's dependencies and its build backend, from pyproject.toml."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [*meta["project"]["dependencies"], *meta["build-system"]["requires"]]


def stage_share(stage: Path, image_path: Path, timeout: float = 600) -> None:
    """Fill `stage` (tree/, wheels/, hosttest.sh) and make the ext4 disk
    `image_path` of it (mkfs.ext4 -d: no mount, no loop device)."""
    tree = stage / "tree"
    tree.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in TREE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(src, tree / name)
    wheels = stage / "wheels"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "--wheel-dir", str(wheels), *wheel_requirements()],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise DebianGuestError(f"pip wheel failed ({res.returncode}):\n{res.stderr[-3000:]}")
    shutil.copy2(GUEST_SCRIPT, stage / "hosttest.sh")
    res = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", SHARE_LABEL, "-d", str(stage), str(image_path), "256M"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise DebianGuestError(f"mkfs.ext4 -d failed: {res.stderr}")


def qemu_argv(image: DebianImage, overlay: Path, share: Path) -> list[str]:
    """No network device at all (`-nic none`): the lab lives in the guest's
    kernel. -no-reboot (from qemu_base_argv): the guest's reboot ends QEMU,
    and the test starts it again on the same overlay."""
    return [
        *qemu_base_argv(image, overlay),
        "-nic", "none",
        "-drive", f"file={share},if=virtio,format=raw,readonly=on",
    ]  # fmt: skip


def boot(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """QEMU as root (nothing on the host is shared with the guest but the
    two disks), serial console to `log_path`. The caller stops it."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _lines(log_path: Path) -> list[str]:
    try:
        text = log_path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return []
    return [line.rstrip("\r") for line in text[: text.rfind("\n") + 1].splitlines()]


def read_hosttest(log_path: Path) -> list[HostStep]:
    out = []
    for line in _lines(log_path):
        m = _LINE_RE.search(line)
        if m:
            out.append(HostStep(m.group(1), m.group(2), float(m.group(3)), m.group(4).strip()))
    return out


def end_line(log_path: Path) -> tuple[float, int, int] | None:
    """(guest uptime, phase, failed) of `QVM-HOSTTEST end`, or None."""
    for line in _lines(log_path):
        m = _END_RE.search(line)
        if m:
            return float(m.group(1)), int(m.group(2)), int(m.group(3))
    return None


def tagged(log_path: Path, tag: str) -> list[str]:
    """The text after `tag ` on each console line that has it
    (QVM-HOSTTEST-OUT, QVM-HOSTTEST-TIME, QVM-HOSTTEST-WARN)."""
    pattern = re.compile(re.escape(tag) + r" (.*)")
    return [m.group(1) for line in _lines(log_path) if (m := pattern.search(line))]


__all__ = [
    "HostStep",
    "boot",
    "build_debian_host",
    "cached_debian_host",
    "end_line",
    "qemu_argv",
    "read_hosttest",
    "stage_share",
    "tagged",
]
