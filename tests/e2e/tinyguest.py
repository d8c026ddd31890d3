"""Build and boot the tiny lab guest (guests/tiny) under QEMU, as a user would.

- `build_tiny()` runs guests/tiny/build.sh (idempotent, cached outside the
  repository) and returns the kernel and initrd paths.
- `boot_tiny()` starts `qemu-system-x86_64` (TCG) inside a network namespace
  as an unprivileged uid on an existing TAP: `ip netns exec` enters the
  namespace as root, `setpriv` then drops every uid, gid and group, so QEMU
  holds no capability at all, exactly like the user's QEMU in a toolbox.
  The serial console goes to a log file opened here (by root), so the
  unprivileged QEMU needs no write access anywhere.
- `wait_step()` follows that log for the guest init's
  `QVM-STEP <name> ok|fail|skip up=<s> <detail>` lines.
- `tun_open_to_users()` makes /dev/net/tun 0666 (a desktop's mode) for as
  long as any test holds it, then restores the original mode.

No pytest imports: the end-to-end tests and `make demo` can both use it.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests import busenv

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "guests" / "tiny" / "build.sh"
TUN = Path("/dev/net/tun")

QEMU = "qemu-system-x86_64"
# `quiet` keeps kernel messages from splitting the step lines on the shared
# console; panic=-1 with -no-reboot makes QEMU exit if init dies, so a test
# fails at once instead of waiting for a step that will never come.
BASE_APPEND = ("console=ttyS0", "quiet", "panic=-1")

# Anywhere in a line: the firmware's terminal escapes precede the first one.
_STEP_RE = re.compile(r"QVM-STEP (\S+) (ok|fail|skip) up=([0-9.]+) ?(.*)")


class TinyGuestError(Exception):
    """The image did not build, QEMU died, or the guest reported a failure."""


@dataclass(frozen=True)
class TinyImage:
    kernel: Path
    initrd: Path
    kernel_version: str
    manifest: dict[str, str]


@dataclass(frozen=True)
class Step:
    name: str
    status: str  # ok | fail | skip
    guest_uptime: float  # seconds since the guest kernel started
    detail: str

    def field(self, key: str) -> str | None:
        """Value of `key=value` in the detail, or None."""
        m = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", self.detail)
        return m.group(1) if m else None


def build_tiny(cache: Path | None = None, timeout: float = 900) -> TinyImage:
    """Build (or reuse) the tiny guest; `cache` overrides QVM_GUEST_CACHE."""
    env = dict(os.environ)
    if cache is not None:
        env["QVM_GUEST_CACHE"] = str(cache)
    res = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise TinyGuestError(f"{BUILD_SCRIPT} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    manifest = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    try:
        image = TinyImage(
            kernel=Path(manifest["kernel"]),
            initrd=Path(manifest["initrd"]),
            kernel_version=manifest["kernel_version"],
            manifest=manifest,
        )
    except KeyError as e:
        raise TinyGuestError(f"build printed no {e.args[0]}=:\n{res.stdout}") from None
    for path in (image.kernel, image.initrd):
        if not path.is_file():
            raise TinyGuestError(f"build reported {path}, which does not exist")
    return image


def smbios_serial(seed_url: str) -> str:
    """The SMBIOS system serial cloud-init reads the NoCloud seed from."""
    return f"ds=nocloud;s={seed_url}"


def qemu_argv(
    image: TinyImage,
    tap: str,
    mac: str,
    seed_url: str | None,
    append: Sequence[str] = (),
    memory_mb: int = 256,
) -> list[str]:
    """QEMU command line for one tiny guest on an existing TAP (no privilege)."""
    argv = [
        QEMU,
        "-machine", "q35,accel=tcg",
        "-m", str(memory_mb),
        "-nographic",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join((*BASE_APPEND, *append)),
        "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
        # romfile= : no PXE option ROM; Debian ships it in ipxe-qemu, which
        # a --no-install-recommends QEMU lacks, and a kernel boot needs none.
        "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile=",
    ]  # fmt: skip
    if seed_url is not None:
        # QEMU option syntax: a literal comma in a value is doubled.
        argv += ["-smbios", "type=1,serial=" + smbios_serial(seed_url).replace(",", ",,")]
    return argv


def boot_tiny(
    netns: str,
    tap: str,
    mac: str,
    uid: int,
    gid: int,
    seed_url: str | None,
    log_path: Path,
    image: TinyImage | None = None,
    append: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start QEMU in `netns` as uid:gid (no supplementary groups).

    The returned process is QEMU itself (`ip netns exec` and `setpriv` both
    exec), so terminating it stops the guest. The caller must stop it.
    """
    image = image or build_tiny()
    argv = [
        "ip", "netns", "exec", netns,
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
        *qemu_argv(image, tap, mac, seed_url, append),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own process group: a Ctrl-C meant for pytest does not reach
            # QEMU's terminal handling; cleanup is explicit.
            start_new_session=True,
        )


def stop_qemu(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Terminate QEMU (SIGTERM, then SIGKILL) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def read_steps(log_path: Path) -> list[Step]:
    """Every step line in the serial log so far, in order."""
    try:
        text = log_path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return []
    steps = []
    for line in text.splitlines():
        m = _STEP_RE.search(line.rstrip("\r"))
        if m:
            steps.append(Step(m.group(1), m.group(2), float(m.group(3)), m.group(4).strip()))
    return steps


def log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        text = log_path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_step(
    log_path: Path,
    step: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    accept: Sequence[str] = ("ok",),
) -> Step:
    """Wait for the guest to report `step`; its status must be in `accept`.

    Raises TinyGuestError with the serial log's tail on a bad status, on
    timeout, or when `proc` (QEMU) exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        for s in read_steps(log_path):
            if s.name == step:
                if s.status not in accept:
                    raise TinyGuestError(
                        f"guest step {step}: {s.status} {s.detail}\n--- serial log\n"
                        + log_tail(log_path)
                    )
                return s
        if proc is not None and proc.poll() is not None:
            raise TinyGuestError(
                f"QEMU exited ({proc.returncode}) before step {step}\n--- serial log\n"
                + log_tail(log_path)
            )
        if time.monotonic() > deadline:
            raise TinyGuestError(
                f"no step {step} within {timeout}s\n--- serial log\n" + log_tail(log_path)
            )
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# /dev/net/tun


def _open_tun(previous: list[str]) -> list[str]:
    # A crashed holder's record is the true original mode; the device now
    # shows the 0666 it left behind.
    original = previous[0] if previous else oct(stat.S_IMODE(TUN.stat().st_mode))
    TUN.chmod(0o666)
    return [original]


def _restore_tun(undo: list[str]) -> None:
    if undo:
        TUN.chmod(int(undo[0], 8))


@contextmanager
def tun_open_to_users() -> Iterator[None]:
    """/dev/net/tun mode 0666 while held, as on a desktop; then restored.

    A fresh Debian machine has 0600, so an unprivileged QEMU could not open
    it even for a TAP it owns. Concurrent holders share the change through
    busenv's registry: the first changes the mode, the last one out puts the
    original back (also after a holder crashed).
    """
    with busenv._shared("dev-net-tun-mode", _open_tun, _restore_tun):
        yield
