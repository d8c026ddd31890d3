#!/usr/bin/env python3
"""`make demo`: the whole lab in a sandbox namespace, shown live.

Starts qvmd inside a network namespace of its own (`qvm-demo`, which qvmd
creates and removes), waits for READY=1 exactly as systemd would, then prints
the lab as tables until Ctrl-C (or once, with --once), and stops qvmd, which
removes the sandbox. Nothing outside the sandbox is touched.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qvmd import links, nsutil
from qvmd.config import load_config
from qvmd.nlworker import NetlinkWorker
from qvmd.table import render

SANDBOX = "qvm-demo"


def wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            sys.exit(f"qvmd exited with status {proc.returncode} before it was ready")
        sock.settimeout(0.1)
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            continue
        if "READY=1" in msg.splitlines():
            return time.monotonic() - start
    sys.exit(f"qvmd was not ready within {timeout}s")


def show(lab_ns: str, svc_ns: str) -> str:
    main = NetlinkWorker(lab_ns, "demo-main")
    svc = NetlinkWorker(svc_ns, "demo-svc")
    try:
        have = main.run_sync(links.snapshot)
        svc_have = svc.run_sync(links.snapshot)
        gw = svc.run_sync(links.default_gateway)
    finally:
        main.close()
        svc.close()
    lab = load_config("/dev/null", "/dev/null", SANDBOX).lab
    br = have.get(lab.bridge)
    out = [f"qvmd sandbox '{lab_ns}' — lab domain {lab.domain}", ""]
    out.append(
        render(
            ["BRIDGE", "STATE", "ADDRESS", "MAC"],
            [
                [
                    lab.bridge,
                    "up" if br and br.up else "DOWN",
                    ", ".join(map(str, br.addresses)) if br else "-",
                    br.mac if br else "-",
                ]
            ],
        )
    )
    out.append("")
    rows = []
    for g in lab.guests:
        tap = have.get(g.tap)
        tun = tap.tun if tap else None
        rows.append(
            [
                g.name,
                g.fqdn,
                g.ip,
                g.mac,
                g.tap,
                tun.owner if tun else "-",
                ("in use" if tap.carrier else "idle") if tap else "MISSING",
                "yes" if tap and br and tap.master == br.index else "no",
            ]
        )
    out.append(
        render(["GUEST", "FQDN", "IP", "MAC", "TAP", "OWNER", "TAP STATE", "ON BRIDGE"], rows)
    )
    out.append("")
    v = svc_have.get(lab.services.interface)
    out.append(
        render(
            ["SERVICES NETNS", "INTERFACE", "ADDRESS", "STATE", "DEFAULT VIA"],
            [
                [
                    svc_ns,
                    lab.services.interface,
                    ", ".join(map(str, v.addresses)) if v else "-",
                    "up" if v and v.up else "DOWN",
                    gw or "-",
                ]
            ],
        )
    )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--once", action="store_true", help="print the tables once and stop")
    p.add_argument("--interval", type=float, default=2.0)
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("make demo needs root: it creates a network namespace")
    if nsutil.exists(SANDBOX):
        sys.exit(
            f"namespace {SANDBOX} exists (another demo running?); "
            f"stop it or remove it with: ip netns del {SANDBOX}; ip netns del {SANDBOX}-svc"
        )
    with tempfile.TemporaryDirectory(prefix="qvm-demo-") as tmp:
        os.chmod(tmp, 0o711)  # dnsmasq reads its files after dropping root
        notify_path = Path(tmp) / "notify"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        cmd = [
            sys.executable,
            "-m",
            "qvmd.daemon",
            "--netns",
            SANDBOX,
            "--state-dir",
            str(Path(tmp) / "state"),
            "--config",
            "/dev/null",
            "--no-bus",
        ]
        log_path = Path(tmp) / "qvmd.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            took = wait_ready(sock, proc, 30)
            print(f"qvmd ready in {took * 1000:.0f} ms (READY=1 on the notify socket)\n")
            while True:
                table = show(SANDBOX, f"{SANDBOX}-svc")
                if args.once:
                    print(table)
                    break
                print("\033[H\033[2J" + table + "\n\n(Ctrl-C to stop and clean up)", flush=True)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            sock.close()
            removed = not nsutil.exists(SANDBOX) and not nsutil.exists(SANDBOX + "-svc")
            print(f"\nqvmd stopped (status {proc.returncode}); sandbox removed: {removed}")
            if proc.returncode != 0:
                print(log_path.read_text())
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
