"""A real systemd-resolved inside a test's network namespace, on a private bus.

Debian's systemd-resolved package cannot be installed here: its postinst
takes over the machine's /etc/resolv.conf. So the binaries come from the
package file (`apt-get download`, the version of the installed systemd,
whose libsystemd-shared they link against), unpacked once into a cache, and
run without installing anything:

- in the test's network namespace (it only sees the lab's links, its stub
  listens on that namespace's 127.0.0.53);
- in a private mount namespace with tmpfs over /run/systemd and
  /etc/systemd (its state and its resolved.conf) and an empty file over
  /etc/resolv.conf, so it reads no host resolver and writes nothing outside;
- with no DNS servers of its own (DNS=, FallbackDNS= empty; no LLMNR/mDNS):
  the only server it may ever ask is the one qvmd registers;
- as user nobody with the capabilities it needs (run as root it would want
  the systemd-resolve user, which this machine does not have), owning
  org.freedesktop.resolve1 on the private bus by a policy written here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import busenv

CACHE = Path("/var/cache/qvmd-test/systemd-resolved")
RUN_AS = "nobody"
NS_EXEC = ("ip", "netns", "exec")
PRIVATE_MOUNTS = ("unshare", "--mount", "--propagation", "private")
RESOLVED = Path("lib/systemd/systemd-resolved")
RESOLVECTL = Path("usr/bin/resolvectl")

BUS_POLICY = f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="{RUN_AS}">
    <allow own="org.freedesktop.resolve1"/>
  </policy>
  <policy context="default">
    <allow send_destination="org.freedesktop.resolve1"/>
    <allow receive_sender="org.freedesktop.resolve1"/>
  </policy>
</busconfig>
"""

RESOLVED_CONF = """[Resolve]
DNS=
FallbackDNS=
LLMNR=no
MulticastDNS=no
DNSSEC=no
"""

# Inside `unshare -m` (private propagation: nothing here reaches the host).
SETUP = """set -e
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -m 0755 /run/systemd/resolve
chown {user} /run/systemd/resolve
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd
cp {conf} /etc/systemd/resolved.conf
mount --bind {empty} /etc/resolv.conf
ip link set lo up
caps=+net_bind_service,+net_raw,+setpcap
exec setpriv --reuid={user} --regid=nogroup --clear-groups \\
    --inh-caps=$caps --ambient-caps=$caps {binary}
"""


def binaries() -> Path | str:
    """The unpacked package, or why it could not be had."""
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "systemd"], capture_output=True, text=True
    ).stdout.strip()
    if not version:
        return "systemd is not installed"
    root = CACHE / version
    if (root / RESOLVED).exists():
        return root
    work = Path(tempfile.mkdtemp(prefix="qvt-resolved-"))
    try:
        got = subprocess.run(
            ["apt-get", "download", f"systemd-resolved={version}"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
        )
        debs = list(work.glob("systemd-resolved_*.deb"))
        if got.returncode != 0 or not debs:
            return f"apt-get download systemd-resolved={version} failed: {got.stderr.strip()}"
        unpacked = work / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        os.replace(unpacked, root)  # atomic: a half-unpacked cache is never seen
        return root
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def bus_policy() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qvt-resolve1-"))
    try:
        path = d / "org.freedesktop.resolve1.conf"
        path.write_text(BUS_POLICY)
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Resolved:
    """systemd-resolved in `netns` on `bus`; start() and stop() may repeat."""

    def __init__(self, root: Path, netns: str, bus: str) -> None:
        self.root = root
        self.netns = netns
        self.bus = bus
        self.dir = Path(tempfile.mkdtemp(prefix="qvt-resolved-"))
        self.dir.chmod(0o755)
        (self.dir / "resolved.conf").write_text(RESOLVED_CONF)
        (self.dir / "resolv.conf").write_text("")
        self.log = self.dir / "resolved.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script = SETUP.format(
            user=RUN_AS,
            conf=self.dir / "resolved.conf",
            empty=self.dir / "resolv.conf",
            binary=self.root / RESOLVED,
        )
        env = busenv.clean_env(self.bus, {"SYSTEMD_LOG_LEVEL": "debug"})
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*NS_EXEC, self.netns, *PRIVATE_MOUNTS, "sh", "-c", script],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        proc = self.proc
        try:
            busenv.wait_for_name(
                self.bus, "org.freedesktop.resolve1", alive=lambda: proc.poll() is None
            )
        except busenv.HarnessError as exc:
            self.stop()
            raise busenv.HarnessError(f"{exc}\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc is not None:
            busenv.stop_process(self.proc)
            self.proc = None

    def ctl(self, *args: str) -> str:
        """resolvectl in the namespace, on the private bus."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.netns, str(self.root / RESOLVECTL), "--no-pager", *args],
            env=busenv.clean_env(self.bus),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout + out.stderr

    def wait_ctl(self, want: str, *args: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while True:
            out = self.ctl(*args)
            if want in out:
                return out
            if time.monotonic() > deadline:
                raise AssertionError(f"resolvectl {' '.join(args)}: no {want!r} in:\n{out}")
            time.sleep(0.1)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
