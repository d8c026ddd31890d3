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

The whole lab against the real qvmd (tests/e2e/test_lab_e2e.py, tools/demo.py):

- `fake_internet()` a namespace at 203.0.113.1 serving HTTP behind the
  sandbox's uplink (203.0.113.2, default route), so qvmd masquerades to it.
- `lab_guests()` the guests as `qvmctl guest list` gives them to the user;
  `boot_lab_guest()` does what the user does: `qvmctl tap create`, then
  QEMU with the arguments of `qvmctl --json qemu-args <guest>`.
- `watch_steps()` follows several guests at once and records when each
  step appeared (host clock); `curl_as()` the user's curl from the sandbox.

No pytest imports: the end-to-end tests and `make demo` can both use it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import busenv
from tests.netns import delete_netns, netns_exists

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


def run_build_script(script: Path, cache: Path | None, timeout: float) -> str:
    """Run a guests/*/build.sh (`cache` overrides QVM_GUEST_CACHE); its stdout
    is the manifest. A failure raises RuntimeError with the end of stderr."""
    env = dict(os.environ)
    if cache is not None:
        env["QVM_GUEST_CACHE"] = str(cache)
    res = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{script} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


def build_tiny(cache: Path | None = None, timeout: float = 900) -> TinyImage:
    """Build (or reuse) the tiny guest; `cache` overrides QVM_GUEST_CACHE."""
    try:
        stdout = run_build_script(BUILD_SCRIPT, cache, timeout)
    except RuntimeError as exc:
        raise TinyGuestError(str(exc)) from None
    manifest = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    try:
        image = TinyImage(
            kernel=Path(manifest["kernel"]),
            initrd=Path(manifest["initrd"]),
            kernel_version=manifest["kernel_version"],
            manifest=manifest,
        )
    except KeyError as e:
        raise TinyGuestError(f"build printed no {e.args[0]}=:\n{stdout}") from None
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


def qemu_base_argv(image: TinyImage, append: Sequence[str] = (), memory_mb: int = 256) -> list[str]:
    """QEMU for one tiny guest without any network argument: the caller adds
    them, e.g. what `qvmctl --json qemu-args <guest>` prints.

    `-global virtio-net-pci.romfile=` does for a NIC defined elsewhere what
    `romfile=` does in `qemu_argv`: no PXE ROM (package ipxe-qemu) needed.
    """
    return [
        QEMU,
        "-machine", "q35,accel=tcg",
        "-m", str(memory_mb),
        "-nographic",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join((*BASE_APPEND, *append)),
        "-global", "virtio-net-pci.romfile=",
    ]  # fmt: skip


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
    net_args: Sequence[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start QEMU in `netns` as uid:gid (no supplementary groups).

    `net_args`, when given, replaces the network part (`tap`, `mac` and
    `seed_url` are then unused): the arguments qvmd hands the user
    (`qvmctl --json qemu-args <guest>`), taken verbatim.

    The returned process is QEMU itself (`ip netns exec` and `setpriv` both
    exec), so terminating it stops the guest. The caller must stop it.
    """
    image = image or build_tiny()
    if net_args is None:
        qemu = qemu_argv(image, tap, mac, seed_url, append)
    else:
        qemu = [*qemu_base_argv(image, append), *net_args]
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
    # Only whole lines: QEMU may be in the middle of writing the last one
    # (a step read as "name=cp.q" once it was cut there).
    complete = text[: text.rfind("\n") + 1]
    steps = []
    for line in complete.splitlines():
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


# ---------------------------------------------------------------------------
# The whole lab: the real qvmd's guests, booted the way its user boots them.
# Shared by tests/e2e/test_lab_e2e.py and tools/demo.py.

# TEST-NET-3 (RFC 5737): documentation addresses, never routed anywhere real.
INTERNET_ADDR = "203.0.113.1"
UPLINK_ADDR = "203.0.113.2"
INTERNET_PROBE_URL = f"http://{INTERNET_ADDR}/probe"
UPLINK_DEV = "qvmup0"  # the sandbox's end of the uplink
INTERNET_DEV = "inet0"  # the internet namespace's end
LAB_DNS = "10.42.0.2"
QVMCTL = (sys.executable, "-m", "qvmd.cli")

_HTTP_LOG_RE = re.compile(r'^(\S+) - - \[[^\]]*\] "(\S+) (\S+)[^"]*" (\d+)')


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass(frozen=True)
class HttpRequest:
    client: str
    method: str
    path: str
    status: int


@dataclass(frozen=True)
class Internet:
    netns: str
    log_path: Path

    def requests(self) -> list[HttpRequest]:
        """What the internet's HTTP server saw: client address, path, status."""
        out = []
        for line in log_tail(self.log_path, 100000).splitlines():
            m = _HTTP_LOG_RE.match(line)
            if m:
                out.append(HttpRequest(m.group(1), m.group(2), m.group(3), int(m.group(4))))
        return out


@contextmanager
def fake_internet(sandbox: str, name: str, workdir: Path) -> Iterator[Internet]:
    """Namespace `name`: 203.0.113.1/24 serving HTTP (`/probe`), linked to
    `sandbox` by a veth; the sandbox gets 203.0.113.2/24 and its default
    route through it, so qvmd masquerades the guests' traffic out of it.

    Everything is removed on the way out (also when the sandbox is gone).
    """
    docroot = workdir / "www"
    docroot.mkdir(parents=True, exist_ok=True)
    (docroot / "index.html").write_text("qvm fake internet\n")
    (docroot / "probe").write_text("hello from the fake internet\n")
    log_path = workdir / "internet-http.log"
    proc: subprocess.Popen[bytes] | None = None
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", sandbox, "link", "add", UPLINK_DEV, "type", "veth",
            "peer", "name", INTERNET_DEV, "netns", name)  # fmt: skip
        _ip("-n", sandbox, "addr", "add", f"{UPLINK_ADDR}/24", "dev", UPLINK_DEV)
        _ip("-n", sandbox, "link", "set", UPLINK_DEV, "up")
        _ip("-n", name, "addr", "add", f"{INTERNET_ADDR}/24", "dev", INTERNET_DEV)
        _ip("-n", name, "link", "set", INTERNET_DEV, "up")
        _ip("-n", sandbox, "route", "replace", "default", "via", INTERNET_ADDR)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", name, sys.executable, "-u", "-m", "http.server",
                 "80", "--bind", INTERNET_ADDR, "--directory", str(docroot)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        probe = f"import socket; socket.create_connection(('{INTERNET_ADDR}', 80), 1).close()"
        deadline = time.monotonic() + 20
        while (
            subprocess.run(
                ["ip", "netns", "exec", sandbox, sys.executable, "-c", probe],
                capture_output=True, timeout=10, check=False,
            ).returncode
            != 0
        ):  # fmt: skip
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TinyGuestError(
                    f"the internet's HTTP server did not start:\n{log_tail(log_path)}"
                )
            time.sleep(0.1)
        yield Internet(name, log_path)
    finally:
        if proc is not None:
            stop_qemu(proc)  # any process: SIGTERM, then SIGKILL
        if netns_exists(sandbox):
            _ip("-n", sandbox, "link", "del", UPLINK_DEV, check=False)
        delete_netns(name)


@dataclass
class LabGuest:
    """One guest of qvmd's lab (`qvmctl guest list`) and its QEMU."""

    name: str
    fqdn: str
    ip: str
    mac: str
    tap: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # time.monotonic() when QEMU was started
    seen: dict[str, float] = field(default_factory=dict)  # step -> host s after start

    def steps(self) -> dict[str, Step]:
        """The first report of each step so far."""
        out: dict[str, Step] = {}
        for s in read_steps(self.log_path):
            out.setdefault(s.name, s)
        return out

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_qemu(self.proc)


def qvmctl(
    user: busenv.User, bus: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """qvmctl as `user`, on the private bus."""
    return busenv.run_as(user, [*QVMCTL, *args], bus, timeout=timeout)


def qvmctl_json(user: busenv.User, bus: str, *args: str) -> Any:
    res = qvmctl(user, bus, "--json", *args)
    if res.returncode != 0:
        raise TinyGuestError(f"qvmctl {' '.join(args)}: rc={res.returncode} {res.stderr.strip()}")
    return json.loads(res.stdout)


def lab_guests(user: busenv.User, bus: str, logdir: Path) -> list[LabGuest]:
    """The lab's guests as qvmd lists them to the user."""
    return [
        LabGuest(g["name"], g["fqdn"], g["ip"], g["mac"], g["tap"], logdir / f"{g['name']}.log")
        for g in qvmctl_json(user, bus, "guest", "list")
    ]


def lab_append(guest: LabGuest, guests: Sequence[LabGuest]) -> list[str]:
    """Kernel options: write the NFS mark, ping the peers, fetch the internet."""
    peers = ",".join(g.fqdn for g in guests if g.name != guest.name)
    return ["qvm.nfs_mark=1", f"qvm.peers={peers}", f"qvm.probe={INTERNET_PROBE_URL}"]


def boot_lab_guest(
    guest: LabGuest,
    sandbox: str,
    user: busenv.User,
    bus: str,
    image: TinyImage,
    append: Sequence[str],
) -> None:
    """What the user does: claim the TAP, ask for the QEMU arguments, run QEMU."""
    res = qvmctl(user, bus, "tap", "create", guest.tap)
    if res.returncode != 0:
        raise TinyGuestError(f"qvmctl tap create {guest.tap}: rc={res.returncode} {res.stderr}")
    net_args = qvmctl_json(user, bus, "qemu-args", guest.name)
    guest.seen = {}
    guest.started = time.monotonic()
    guest.proc = boot_tiny(
        sandbox, guest.tap, guest.mac, user.uid, user.gid, None, guest.log_path, image,
        append, net_args=[str(a) for a in net_args],
    )  # fmt: skip


def watch_steps(guests: Sequence[LabGuest], until: str = "ready", timeout: float = 180) -> bool:
    """Follow the guests' serial logs, recording when (host clock after QEMU's
    start) each step first appears, until every guest reported `until`, or
    its QEMU is gone, or `timeout`. True when all reported `until`."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        pending = False
        for g in guests:
            for name in g.steps():
                g.seen.setdefault(name, now - g.started)
            if until not in g.seen and g.running():
                pending = True
        if not pending:
            return all(until in g.seen for g in guests)
        if now > deadline:
            return False
        time.sleep(0.05)


def lab_dns_lookup(sandbox: str, fqdn: str) -> str | None:
    """The address the lab DNS (10.42.0.2, port 53) gives `fqdn`, asked from `sandbox`."""
    res = subprocess.run(
        ["ip", "netns", "exec", sandbox, "dig", "+short", "+time=2", "+tries=3",
         f"@{LAB_DNS}", fqdn, "A"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    for line in res.stdout.split():
        if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", line):
            return line
    return None


def curl_as(
    user: busenv.User,
    bus: str,
    sandbox: str,
    fqdn: str,
    address: str,
    cacert: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`curl https://<fqdn>` as `user` in the sandbox ("the host"), the name
    pinned to `address` (the lab DNS's answer: Debian's curl has no c-ares,
    so no --dns-servers). `cacert` adds `--cacert FILE` (the separate form:
    curl 7.88 does not take `--cacert=FILE`); `env` e.g. SSL_CERT_DIR."""
    cmd = ["curl", "-sS", "--max-time", "20", "--resolve", f"{fqdn}:443:{address}"]
    if cacert is not None:
        cmd += ["--cacert", str(cacert)]
    cmd.append(f"https://{fqdn}")
    full_env = busenv.clean_env(bus, env)
    full_env.pop("CURL_CA_BUNDLE", None)
    return subprocess.run(
        ["ip", "netns", "exec", sandbox, *busenv.as_user_argv(user, cmd)],
        env=full_env, cwd="/", capture_output=True, text=True, timeout=40, check=False,
    )  # fmt: skip
