"""qvmd's entry point and composition root.

Start-up order: parse flags → read and validate the config (a bad one exits
78 before anything changes) → enter the sandbox namespace if asked → check
the subnet against the host's routes → connect to the system bus and take
the name org.qvm.Net (another qvmd running = exit 1 before touching
anything) → reconcile (adopting what exists) → READY=1 → serve until
SIGTERM/SIGINT → stop within a bounded time. A plain stop leaves the lab up
(guests keep running); `--teardown` removes it. SIGHUP reloads the config.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qvmd import nsutil
from qvmd.config import check_state_dependent, load_config, validate_netns_name
from qvmd.core import Core
from qvmd.errors import ConfigError, InvalidArgument, QvmError
from qvmd.logsetup import setup_logging
from qvmd.model import DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR, Lab
from qvmd.sdnotify import Notifier

if TYPE_CHECKING:  # the bus stack is imported only when a bus is used
    from qvmd.bus.server import BusServer

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
    prepare_netns: bool
    log_level: str
    bus: str | None  # None: no D-Bus API at all (debugging, plane-only tests)


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
    p.add_argument(
        "--prepare-netns",
        action="store_true",
        help="only create the namespaces (for ExecStartPre=+ outside the unit's sandbox)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--bus",
        metavar="ADDRESS",
        help="D-Bus address to serve on (default $DBUS_SYSTEM_BUS_ADDRESS, else the system bus)",
    )
    p.add_argument("--no-bus", action="store_true", help="run without the D-Bus API")
    a = p.parse_args(argv)
    if a.netns is not None:
        try:
            validate_netns_name(a.netns, "--netns")
        except InvalidArgument as exc:
            p.error(str(exc))
    if a.no_bus and a.bus:
        p.error("--bus and --no-bus exclude each other")
    bus = None
    if not a.no_bus:
        bus = (
            a.bus
            or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
            or ("unix:path=/run/dbus/system_bus_socket")
        )
    return Options(
        a.config,
        a.state_dir,
        a.netns,
        a.teardown,
        a.check_config,
        a.prepare_netns,
        a.log_level,
        bus,
    )


class Daemon:
    def __init__(self, opts: Options, lab: Lab, notifier: Notifier) -> None:
        self.opts = opts
        self.notifier = notifier
        self.core = Core(lab, opts.state_dir, opts.config, DEFAULT_CONFIG_PATH, opts.netns)
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self.bus_api: BusServer | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload()))
        bus_task = None
        if self.opts.bus is not None:
            from qvmd.bus.server import BusServer  # the bus stack only when used

            server = BusServer(self.core, self.opts.bus)
            await server.start()
            self.bus_api = server
            bus_task = asyncio.create_task(self._watch_bus(server))
        watchdog = None
        try:
            self.notifier.notify(STATUS="bringing the lab up")
            changes = await self.core.start()
            bridge = self.core.lab.bridge
            log.info("lab %s up (%d change(s), adopted the rest)", bridge, len(changes))
            self.notifier.notify(READY="1", STATUS=f"lab {self.core.lab.bridge} up")
            if self.notifier.watchdog_interval:
                watchdog = asyncio.create_task(self._watchdog(self.notifier.watchdog_interval))
            await self.stopping.wait()
            log.info("stopping (the lab stays up; use --teardown to remove it)")
            self.notifier.notify(STOPPING="1", STATUS="stopping")
        finally:
            for task in (watchdog, bus_task):
                if task is not None:
                    task.cancel()
            # Also after a failed start: children and monitors must not leak.
            await asyncio.wait_for(self._stop(), STOP_TIMEOUT)

    async def _watch_bus(self, server: BusServer) -> None:
        await server.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        if not self.stopping.is_set():
            # Without the bus nobody can reach us: exit non-zero so systemd
            # restarts the service with a fresh connection.
            log.error("lost the D-Bus connection; exiting so the service can be restarted")
            self.exit_code = 1
            self.stopping.set()

    async def _reload(self) -> None:
        try:
            changes = await self.core.reload()
        except QvmError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        log.info("reloaded the config (%d change(s))", len(changes))

    async def _watchdog(self, interval: float) -> None:
        # Pinging from the event loop proves the loop itself is alive.
        while True:
            self.notifier.notify(WATCHDOG="1")
            await asyncio.sleep(interval)

    async def _stop(self) -> None:
        await self.core.stop()
        if self.bus_api is not None:
            await self.bus_api.stop()


async def _amain(opts: Options, lab: Lab, owns_sandbox: bool) -> int:
    daemon = Daemon(opts, lab, Notifier())
    try:
        await daemon.core.check_host()
        if opts.teardown:
            for change in await daemon.core.teardown():
                print(change)
            return 0
        try:
            await daemon.run()
        finally:
            if owns_sandbox:
                # The sandbox goes away with us; its services namespace must too.
                await daemon.core.teardown()
        return daemon.exit_code
    finally:
        daemon.core.close()


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    setup_logging(opts.log_level)
    try:
        lab = load_config(opts.config, DEFAULT_CONFIG_PATH, opts.netns).lab
        check_state_dependent(lab, opts.state_dir)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return EXIT_CONFIG
    if opts.check_config:
        print("config OK")
        return 0
    if os.geteuid() != 0:
        log.error("qvmd must run as root (it creates interfaces and namespaces)")
        return 1
    if opts.prepare_netns:
        # Run by systemd outside the unit's private mount namespace: a
        # /run/netns mount made there is seen by the host (`ip netns exec`)
        # and outlives a restart of the service, so the services namespace,
        # veth0 and its address stay while qvmd restarts.
        if nsutil.join_init_mount_ns():
            log.info("joined the host's mount namespace (PID 1's)")
        for name in filter(None, (opts.netns, lab.services.netns)):
            if nsutil.exists(name) and not nsutil.is_netns(name):
                # The placeholder of a creation whose mount was lost.
                os.unlink(nsutil.netns_path(name))
                log.warning("removed %s: not a namespace", nsutil.netns_path(name))
            if nsutil.create(name):
                log.info("created namespace %s", name)
        return 0
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
