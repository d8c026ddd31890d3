"""qvmd's entry point and composition root.

Start-up order: parse flags → read and validate the config (a bad one exits
78 before anything changes) → enter the sandbox namespace if asked → check
the subnet against the host's routes → reconcile (adopting what exists) →
READY=1 → serve events until SIGTERM/SIGINT → stop within a bounded time.
A plain stop leaves the lab up (guests keep running); `--teardown` removes it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass

from qvmd import monitor, nsutil
from qvmd.config import check_subnet_free, load_config, validate_netns_name
from qvmd.errors import ConfigError, InvalidArgument, QvmError
from qvmd.healer import Healer
from qvmd.links import main_routes
from qvmd.logsetup import setup_logging
from qvmd.model import DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR, Lab
from qvmd.plane import NetworkPlane
from qvmd.sdnotify import Notifier
from qvmd.state import StateStore

log = logging.getLogger("qvmd")

EXIT_CONFIG = 78  # sysexits EX_CONFIG; the unit file does not restart on it
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Options:
    config: str | None
    state_dir: str
    netns: str | None
    teardown: bool
    check_config: bool
    log_level: str


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="qvmd", description="qvmd: the QEMU lab network daemon")
    p.add_argument("--config", metavar="PATH", help=f"config file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        default=os.environ.get("QVM_DIR") or DEFAULT_STATE_DIR,
        help="persistent state (default $QVM_DIR or %(default)s)",
    )
    p.add_argument("--netns", metavar="NAME", help="run the whole daemon inside namespace NAME")
    p.add_argument("--teardown", action="store_true", help="remove everything qvmd made, then exit")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    a = p.parse_args(argv)
    if a.netns is not None:
        try:
            validate_netns_name(a.netns, "--netns")
        except InvalidArgument as exc:
            p.error(str(exc))
    return Options(a.config, a.state_dir, a.netns, a.teardown, a.check_config, a.log_level)


class Daemon:
    def __init__(self, opts: Options, lab: Lab, notifier: Notifier) -> None:
        self.opts = opts
        self.lab = lab
        self.notifier = notifier
        self.plane = NetworkPlane(lab, StateStore(opts.state_dir))
        self.healer = Healer(self.plane.reconcile)
        self.monitors: list[monitor.NetlinkMonitor] = []
        self.stopping = asyncio.Event()

    def is_ours(self, name: str) -> bool:
        lab = self.lab
        return name in (lab.bridge, lab.services.bridge_port, lab.services.interface) or (
            self.plane.is_lab_tap_name(name)
        )

    async def start(self) -> None:
        self.notifier.notify(STATUS="bringing the lab up")
        changes = await self.plane.reconcile()
        log.info("lab %s up (%d change(s), adopted the rest)", self.lab.bridge, len(changes))
        self._start_monitors()
        self.healer.start()
        self.notifier.notify(READY="1", STATUS=f"lab {self.lab.bridge} up")

    def _start_monitors(self) -> None:
        main = monitor.NetlinkMonitor(
            monitor.open_event_socket(), self.is_ours, self.healer.wake, "host"
        )
        main.start()
        self.monitors.append(main)
        if self.plane.svc is not None:
            sock = self.plane.svc.run_sync(lambda _ipr: monitor.open_event_socket())
            svc = monitor.NetlinkMonitor(
                sock, self.is_ours, self.healer.wake, self.lab.services.netns
            )
            svc.start()
            self.monitors.append(svc)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        watchdog = None
        if self.notifier.watchdog_interval:
            watchdog = asyncio.create_task(self._watchdog(self.notifier.watchdog_interval))
        await self.stopping.wait()
        log.info("stopping (the lab stays up; use --teardown to remove it)")
        self.notifier.notify(STOPPING="1", STATUS="stopping")
        if watchdog is not None:
            watchdog.cancel()
        await asyncio.wait_for(self.stop(), STOP_TIMEOUT)

    async def _watchdog(self, interval: float) -> None:
        # Pinging from the event loop proves the loop itself is alive.
        while True:
            self.notifier.notify(WATCHDOG="1")
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        await self.healer.stop()
        for m in self.monitors:
            m.stop()
        self.monitors.clear()


async def _amain(opts: Options, lab: Lab, owns_sandbox: bool) -> int:
    notifier = Notifier()
    daemon = Daemon(opts, lab, notifier)
    try:
        routes = await daemon.plane.main.run(main_routes)
        check_subnet_free(lab, routes)
        if opts.teardown:
            for change in await daemon.plane.teardown():
                print(change)
            return 0
        await daemon.run()
        if owns_sandbox:
            # The sandbox goes away with us; its services namespace must too.
            await daemon.plane.teardown()
        return 0
    finally:
        daemon.plane.close()


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    setup_logging(opts.log_level)
    try:
        lab = load_config(opts.config, DEFAULT_CONFIG_PATH, opts.netns).lab
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return EXIT_CONFIG
    if opts.check_config:
        print("config OK")
        return 0
    if os.geteuid() != 0:
        log.error("qvmd must run as root (it creates interfaces and namespaces)")
        return 1
    created_ns = False
    if opts.netns:
        if opts.teardown and not nsutil.exists(opts.netns):
            return 0  # nothing of ours can exist in a namespace that does not
        created_ns = nsutil.create(opts.netns)
        # Enter before any thread exists: every thread started later inherits it.
        nsutil.enter(opts.netns)
    try:
        return asyncio.run(_amain(opts, lab, created_ns))
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return EXIT_CONFIG
    except QvmError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if created_ns and opts.netns:
            # Unmounting the name is enough: the namespace itself dies when
            # the last process in it (this one) exits.
            nsutil.remove(opts.netns)


if __name__ == "__main__":
    sys.exit(main())
