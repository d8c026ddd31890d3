#!/usr/bin/env python3
"""`make demo`: the whole lab with three real guests, shown live.

What it does, all on this machine and all removed at the end:

1. builds the tiny guest image if needed (guests/tiny/build.sh, cached in
   /var/cache/qvmd-guests/tiny; the first build downloads ~28 MB);
2. starts a private system bus with the real polkitd and a demo user in
   group qvm (tests/busenv.py), so the machine's own bus is never used;
3. starts qvmd in the sandbox namespace `qvm-demo` (qvmd creates it and
   removes it when it stops), and a fake internet `qvm-demo-inet`
   (203.0.113.1, HTTP) behind the sandbox's uplink;
4. as the demo user, for cp, wk-1 and wk-2: `qvmctl tap create qvm0tapN`,
   then QEMU (TCG) with the arguments of `qvmctl --json qemu-args <guest>`;
5. prints a status table every 2 s until Ctrl-C: guest, IP, lease,
   certificate days left, HTTPS (curl from the sandbox with the lab CA),
   NFS, peers by name, internet, boot progress;
6. tears everything down: QEMU, qvmd (and so the sandbox), the internet
   namespace, the users, polkit files, /dev/net/tun's mode.

`--once` waits until the guests are ready (or a timeout), prints the table
once, and exits 0 only if everything works (a CI smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# tests/ (busenv, tinyguest) and src/ (qvmd, should the venv lack it) importable.
sys.path[:0] = [str(REPO), str(REPO / "src")]

from qvmd.table import render  # noqa: E402
from tests import busenv  # noqa: E402
from tests.e2e.tinyguest import (  # noqa: E402
    LabGuest,
    TinyGuestError,
    boot_lab_guest,
    build_tiny,
    curl_as,
    fake_internet,
    lab_append,
    lab_dns_lookup,
    lab_guests,
    log_tail,
    qvmctl_json,
    tun_open_to_users,
    watch_steps,
)
from tests.netns import netns_exists  # noqa: E402
from tests.qvmd_proc import Qvmd, state_dir  # noqa: E402

SANDBOX = "qvm-demo"
SERVICES = f"{SANDBOX}-svc"
INTERNET = f"{SANDBOX}-inet"
ONCE_TIMEOUT = 240.0


class Stop(Exception):
    """Ctrl-C or SIGTERM: leave the loop and clean up."""


def _on_sigterm(_sig: int, _frame: FrameType | None) -> None:
    # Once: a second SIGTERM must not cut the clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stop


def check_stop() -> None:
    """A Ctrl-C pressed while setting up (SIGINT is blocked, see main)."""
    if signal.SIGINT in signal.sigpending():
        signal.sigtimedwait([signal.SIGINT], 0)
        raise Stop


def say(text: str) -> None:
    print(text, flush=True)


class Status:
    """One look at the lab: what qvmd says, and what works."""

    def __init__(
        self, guests: list[LabGuest], user: busenv.User, bus: str, q: Qvmd, started: float
    ) -> None:
        self.guests = guests
        self.user = user
        self.bus = bus
        self.q = q
        self.started = started
        self.ok: dict[str, dict[str, bool]] = {}

    def row(self, g: LabGuest, info: dict[str, Any]) -> list[str]:
        steps = g.steps()
        ok = self.ok.setdefault(g.name, {})
        lease = "-"
        if info.get("lease_ip"):
            left = int(info["lease_expiry"] - time.time()) if info["lease_expiry"] else 0
            lease = f"{info['lease_ip']} ({left // 60}m left)" if left > 0 else info["lease_ip"]
        days = info.get("cert_days_left", -1)
        https = "-"
        if "https" in steps:
            addr = lab_dns_lookup(self.q.netns, g.fqdn)
            if addr is None:
                https = "no DNS answer"
            else:
                ca = self.q.state_dir / "ca-cert" / "qvm-ca.pem"
                res = curl_as(self.user, self.bus, self.q.netns, g.fqdn, addr, cacert=ca)
                ok["https"] = res.returncode == 0 and "s_server" in res.stdout
                https = "ok" if ok["https"] else f"FAIL (curl rc {res.returncode})"
        mark = list(self.q.state_dir.rglob(f"qvm-{g.fqdn}"))
        nfs_step, peers_step = steps.get("nfs"), steps.get("nfs-peers")
        ok["nfs"] = False
        if mark and peers_step is not None and peers_step.status == "ok":
            ok["nfs"] = True
            nfs = f"ok (wrote, read {len((peers_step.field('names') or '').split(','))} peers)"
        elif nfs_step is not None:
            nfs = "mounted" if nfs_step.status == "ok" else f"{nfs_step.status.upper()}"
        else:
            nfs = "-"
        peer_steps = [s for n, s in steps.items() if n.startswith("peer-")]
        ok["peers"] = len(peer_steps) == len(self.guests) - 1 and all(
            s.status == "ok" for s in peer_steps
        )
        peers = f"{sum(s.status == 'ok' for s in peer_steps)}/{len(self.guests) - 1}"
        inet = steps.get("internet")
        ok["internet"] = inet is not None and inet.status == "ok"
        internet = inet.status if inet else "-"
        ok["ready"] = "ready" in g.seen
        if ok["ready"]:
            boot = f"ready in {g.seen['ready']:.1f}s"
        elif not g.running():
            boot = "QEMU EXITED"
        else:
            last = list(steps)[-1] if steps else "starting"
            boot = f"{last}..."
        fails = [n for n, s in steps.items() if s.status == "fail"]
        if fails:
            boot += " FAILED: " + ",".join(fails)
        return [
            g.name,
            g.ip,
            lease,
            str(days) if days >= 0 else "-",
            https,
            nfs,
            peers,
            internet,
            boot,
        ]

    def table(self) -> str:
        watch_steps(self.guests, timeout=0)  # record step times so far
        try:
            info = {r["name"]: r for r in qvmctl_json(self.user, self.bus, "guest", "list")}
        except TinyGuestError as e:
            info = {}
            say(f"qvmctl guest list failed: {e}")
        rows = [self.row(g, info.get(g.name, {})) for g in self.guests]
        head = (
            f"qvmd lab in sandbox '{SANDBOX}' ({time.monotonic() - self.started:.0f}s since the "
            f"guests started; QEMU as user {self.user.name})"
        )
        table = render(
            ["GUEST", "IP", "LEASE", "CERT DAYS", "HTTPS", "NFS", "PEERS", "INTERNET", "BOOT"],
            rows,
        )
        return f"{head}\n\n{table}"

    def summary(self) -> str:
        n = len(self.guests)

        def count(key: str) -> int:
            return sum(self.ok.get(g.name, {}).get(key, False) for g in self.guests)

        return (
            f"summary: {count('ready')}/{n} guests ready, HTTPS ok {count('https')}/{n}, "
            f"NFS ok {count('nfs')}/{n}, peers by name ok {count('peers')}/{n}, "
            f"internet ok {count('internet')}/{n}"
        )

    def all_ok(self) -> bool:
        keys = ("ready", "https", "nfs", "peers", "internet")
        return all(self.ok.get(g.name, {}).get(k, False) for g in self.guests for k in keys)


def preflight() -> None:
    if os.geteuid() != 0:
        sys.exit("make demo needs root: it creates network namespaces, users and TAPs")
    busy = [n for n in (SANDBOX, SERVICES, INTERNET) if netns_exists(n)]
    if busy:
        sys.exit(
            f"namespace(s) {', '.join(busy)} exist (another demo running?); stop it, or "
            "remove them with: " + "; ".join(f"ip netns del {n}" for n in busy)
        )


@contextlib.contextmanager
def qvmd_running(bus: str) -> Iterator[Qvmd]:
    q = Qvmd(SANDBOX, state_dir(), None, bus)
    try:
        t = time.monotonic()
        q.start(env=busenv.clean_env(bus))
        q.wait_ready(60)
        say(f"qvmd ready in {time.monotonic() - t:.1f}s (READY=1 on the notify socket)")
        yield q
    finally:
        out = q.stop()
        code = getattr(q, "last_returncode", None)
        say(f"qvmd stopped (status {code})")
        if code not in (0, None):
            say(out[-3000:])
        q.close()
        shutil.rmtree(q.state_dir.parent, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qvm-demo-")))
        say("building the tiny guest image if needed (guests/tiny/build.sh) ...")
        t = time.monotonic()
        image = build_tiny()
        say(f"  image ready in {time.monotonic() - t:.1f}s: {image.kernel.parent}")
        check_stop()
        bus = stack.enter_context(busenv.private_system_bus())
        stack.enter_context(busenv.polkitd_on(bus, debug=False))
        user = stack.enter_context(busenv.test_users()).member
        say(f"private system bus with polkitd; demo user {user.name} (uid {user.uid}, group qvm)")
        q = stack.enter_context(qvmd_running(bus))
        stack.enter_context(fake_internet(SANDBOX, INTERNET, tmp))
        say(f"fake internet: namespace {INTERNET}, http://203.0.113.1/ via the sandbox uplink")
        stack.enter_context(tun_open_to_users())
        guests = lab_guests(user, bus, tmp)
        stack.callback(lambda: say(f"stopped {len(guests)} QEMU"))
        for g in guests:
            stack.callback(g.stop)
        check_stop()
        started = time.monotonic()
        for g in guests:
            say(f"  {user.name}$ qvmctl tap create {g.tap}")
            say(
                f"  {user.name}$ qemu-system-x86_64 -kernel ... -initrd ... "
                f"$(qvmctl qemu-args {g.name})   # serial log {g.log_path}"
            )
            boot_lab_guest(g, SANDBOX, user, bus, image, lab_append(g, guests))
        status = Status(guests, user, bus, q, started)
        if args.once:
            deadline = time.monotonic() + ONCE_TIMEOUT
            ready = False
            while not ready and time.monotonic() < deadline:
                ready = watch_steps(guests, "ready", 1.0)
                if all("ready" in g.seen or not g.running() for g in guests):
                    break  # ready, or a QEMU is gone: nothing more to wait for
                check_stop()
            say("")
            say(status.table())
            say("")
            say(status.summary())
            if not ready or not status.all_ok():
                for g in guests:
                    say(f"--- {g.name} serial log\n{log_tail(g.log_path, 25)}")
                return 1
            return 0
        try:
            while True:
                table = status.table()
                say("\033[H\033[2J" + table + "\n\n" + status.summary())
                say(
                    f"\ntry it (as root): ip netns exec {SANDBOX} curl --cacert "
                    f"{q.state_dir}/ca-cert/qvm-ca.pem --resolve cp.qvm0.lan:443:10.42.0.10 "
                    "https://cp.qvm0.lan\n(Ctrl-C stops everything and cleans up)"
                )
                if signal.sigtimedwait([signal.SIGINT], args.interval) is not None:
                    raise Stop
        except Stop:
            say("\nstopping ...")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--once", action="store_true", help="wait for the guests, print once, stop")
    p.add_argument("--interval", type=float, default=2.0, help="refresh period (s)")
    args = p.parse_args()
    preflight()
    # Ctrl-C reaches the whole foreground process group: the bus, polkitd,
    # qvmd would die under our feet. Blocked here, SIGINT stays blocked in
    # every child (the mask is inherited across exec); this process takes it
    # with sigtimedwait/sigpending and tears everything down in order.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    signal.signal(signal.SIGTERM, _on_sigterm)
    code = 1
    try:
        code = run(args)
    except Stop:
        say("\nstopped while setting up")
    except (TinyGuestError, busenv.HarnessError, subprocess.CalledProcessError) as e:
        say(f"demo failed: {e}")
    finally:
        left = [n for n in (SANDBOX, SERVICES, INTERNET) if netns_exists(n)]
        say(
            "cleaned up: QEMU, qvmd, bus, polkitd, demo users, /dev/net/tun mode; "
            f"namespaces removed: {not left}" + (f" (LEFT: {', '.join(left)})" if left else "")
        )
        if left:
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
