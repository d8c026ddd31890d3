"""Build and boot the debian lab guest (guests/debian): Debian 12 with the real
cloud-init, booted under QEMU (TCG) by an unprivileged user.

- `cached_debian()` the image already in the cache (no build, no network),
  or None; `build_debian()` runs guests/debian/build.sh (idempotent).
- `make_overlay()` a throw-away qcow2 overlay on the cached base image,
  owned by the user who runs QEMU, in a directory of its own.
- `boot_debian()` QEMU in a namespace as an unprivileged uid, exactly like
  `tinyguest.boot_tiny` (ip netns exec + setpriv, serial console to a log
  file opened by root), with the network arguments qvmd hands the user.
- `read_reports()` / `wait_report()` the guest's `qvm-report.service`
  lines on the serial console:
  `QVM-REPORT <name> ok|fail|skip up=<guest uptime, s> <detail key=value ...>`.

No pytest imports, like tinyguest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.tinyguest import QEMU, Step, log_tail, run_build_script, stop_qemu

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "guests" / "debian" / "build.sh"
DEFAULT_CACHE = Path("/var/cache/qvmd-guests/debian")

# Anywhere in a line: console output of systemd may precede it.
_REPORT_RE = re.compile(r"QVM-REPORT (\S+) (ok|fail|skip) up=([0-9.]+) ?(.*)")


class DebianGuestError(Exception):
    """The image did not build, QEMU died, or the guest reported a failure."""


@dataclass(frozen=True)
class DebianImage:
    image: Path  # base.qcow2, the backing file of every boot's overlay
    kernel: Path
    initrd: Path
    kernel_version: str
    append: str  # root=/dev/vda rw console=ttyS0
    manifest: dict[str, str]


def cache_dir() -> Path:
    return Path(os.environ.get("QVM_GUEST_CACHE") or DEFAULT_CACHE)


def _image_from_manifest(manifest: dict[str, str]) -> DebianImage:
    try:
        img = DebianImage(
            image=Path(manifest["image"]),
            kernel=Path(manifest["kernel"]),
            initrd=Path(manifest["initrd"]),
            kernel_version=manifest["kernel_version"],
            append=manifest["append"],
            manifest=manifest,
        )
    except KeyError as e:
        raise DebianGuestError(f"manifest has no {e.args[0]}=: {manifest}") from None
    for path in (img.image, img.kernel, img.initrd):
        if not path.is_file():
            raise DebianGuestError(f"manifest names {path}, which does not exist")
    return img


def _parse_manifest(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def cached_debian(cache: Path | None = None) -> DebianImage | None:
    """The image a previous build left in the cache, or None (nothing is built)."""
    cache = cache or cache_dir()
    manifest = cache / "manifest"
    if not (cache / "stamp").is_file() or not manifest.is_file():
        return None
    try:
        return _image_from_manifest(_parse_manifest(manifest.read_text()))
    except DebianGuestError:
        return None


def build_debian(cache: Path | None = None, timeout: float = 3600) -> DebianImage:
    """Build (or reuse) the debian guest; `cache` overrides QVM_GUEST_CACHE."""
    try:
        stdout = run_build_script(BUILD_SCRIPT, cache, timeout)
    except RuntimeError as exc:
        raise DebianGuestError(str(exc)) from None
    return _image_from_manifest(_parse_manifest(stdout))


def make_overlay(image: DebianImage, uid: int, gid: int) -> Path:
    """A fresh qcow2 overlay backed by the cached base image, in a new
    directory of its own (0700, owned by uid:gid) under the temp dir.
    The caller removes it with `remove_overlay()`."""
    d = Path(tempfile.mkdtemp(prefix="qvm-debian-"))
    overlay = d / "root.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.image), "-F", "qcow2",
         str(overlay)],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    os.chown(overlay, uid, gid)
    os.chown(d, uid, gid)
    return overlay


def remove_overlay(overlay: Path) -> None:
    shutil.rmtree(overlay.parent, ignore_errors=True)


def qemu_base_argv(
    image: DebianImage,
    overlay: Path,
    memory_mb: int = 1536,
    cpus: int = 2,
    append: Sequence[str] = (),
) -> list[str]:
    """QEMU for the debian guest without network arguments: the caller adds
    what `qvmctl --json qemu-args <guest>` prints.

    `quiet` keeps the console to our report lines and failures; panic=-1
    with -no-reboot makes QEMU exit when the guest cannot boot. The overlay
    is throw-away, so `cache=unsafe` (no flushes) is safe and faster.
    """
    return [
        QEMU,
        "-machine", "q35,accel=tcg",
        "-m", str(memory_mb),
        "-smp", str(cpus),
        "-nographic",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join((image.append, "quiet", "panic=-1", *append)),
        "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
        # No PXE ROM (package ipxe-qemu) needed for a kernel boot.
        "-global", "virtio-net-pci.romfile=",
    ]  # fmt: skip


def boot_debian(
    netns: str,
    uid: int,
    gid: int,
    log_path: Path,
    image: DebianImage,
    overlay: Path,
    net_args: Sequence[str],
    memory_mb: int = 1536,
    cpus: int = 2,
) -> subprocess.Popen[bytes]:
    """Start QEMU in `netns` as uid:gid (no supplementary groups, no
    capability). The returned process is QEMU itself; the caller stops it
    (`tinyguest.stop_qemu`)."""
    qemu = [*qemu_base_argv(image, overlay, memory_mb, cpus), *net_args]
    argv = [
        "ip", "netns", "exec", netns,
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
        *qemu,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _log_text(log_path: Path) -> str:
    try:
        return log_path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def read_reports(log_path: Path) -> list[Step]:
    """Every QVM-REPORT line in the serial log so far, in order."""
    out = []
    for line in _log_text(log_path).splitlines():
        m = _REPORT_RE.search(line.rstrip("\r"))
        if m:
            out.append(Step(m.group(1), m.group(2), float(m.group(3)), m.group(4).strip()))
    return out


def tagged_lines(log_path: Path, tag: str) -> list[str]:
    """The text after `tag` (e.g. QVM-REPORT-CI, QVM-REPORT-BOOT) on each
    console line that has it."""
    pattern = re.compile(re.escape(tag) + r" (.*)")
    out = []
    for line in _log_text(log_path).splitlines():
        m = pattern.search(line.rstrip("\r"))
        if m:
            out.append(m.group(1))
    return out


def cloud_init_lines(log_path: Path) -> list[str]:
    """What `cloud-init status --long` printed in the guest (and its errors)."""
    return tagged_lines(log_path, "QVM-REPORT-CI")


def wait_report(
    log_path: Path,
    name: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
) -> Step:
    """Wait for the guest's report `name` (any status); raise on timeout or
    when QEMU exits first, with the serial log's tail."""
    deadline = time.monotonic() + timeout
    while True:
        for s in read_reports(log_path):
            if s.name == name:
                return s
        if proc is not None and proc.poll() is not None:
            raise DebianGuestError(
                f"QEMU exited ({proc.returncode}) before report {name}\n--- serial log\n"
                + log_tail(log_path, 60)
            )
        if time.monotonic() > deadline:
            raise DebianGuestError(
                f"no report {name} within {timeout}s\n--- serial log\n" + log_tail(log_path, 60)
            )
        time.sleep(0.1)


__all__ = [
    "DebianGuestError",
    "DebianImage",
    "boot_debian",
    "build_debian",
    "cached_debian",
    "cloud_init_lines",
    "make_overlay",
    "read_reports",
    "remove_overlay",
    "stop_qemu",
    "tagged_lines",
    "wait_report",
]
