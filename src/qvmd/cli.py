"""qvmctl: the unprivileged user's client for org.qvm.Net.

Starts fast: only argparse at import; dbus-fast is imported when a command
actually talks to the bus. Exit codes: 0 ok, 1 other error (also Busy),
2 usage or invalid argument, 3 permission denied, 4 not found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

BUS_NAME = "org.qvm.Net"
OBJECT_PATH = "/org/qvm/Net"
INTERFACE = "org.qvm.Net"
CALL_TIMEOUT = 60.0  # Up/Reload may rebuild the lab

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DENIED, EXIT_NOT_FOUND = 0, 1, 2, 3, 4
EXIT_BY_ERROR = {
    "org.qvm.Net.Error.InvalidArgument": EXIT_USAGE,
    "org.qvm.Net.Error.PermissionDenied": EXIT_DENIED,
    "org.qvm.Net.Error.NotFound": EXIT_NOT_FOUND,
    "org.freedesktop.DBus.Error.AccessDenied": EXIT_DENIED,
}


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvmctl", description="Control the qvmd lab network.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--bus", metavar="ADDRESS", help="D-Bus address (default: the system bus)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="the lab: bridge, TAPs, services, repairs")
    sub.add_parser("up", help="bring the lab up (admin)")
    sub.add_parser("down", help="remove the lab, keep qvmd running (admin)")
    sub.add_parser("reload", help="re-read the config; applied only if valid (admin)")
    tap = sub.add_parser("tap", help="TAP devices for QEMU")
    tsub = tap.add_subparsers(dest="tap_command", required=True, metavar="ACTION")
    create = tsub.add_parser("create", help="get a TAP owned by you (idempotent)")
    create.add_argument("name", help="TAP name, <prefix><N>, e.g. qvm0tap1")
    create.add_argument("--multi-queue", action="store_true", help="for QEMU queues=N")
    create.add_argument("--owner", type=int, metavar="UID", help="another owner (admin only)")
    delete = tsub.add_parser("delete", help="delete your TAP (a guest TAP is handed back)")
    delete.add_argument("name")
    tsub.add_parser("list", help="all lab TAPs with owner and state")
    return p


async def call(
    address: str | None, member: str, signature: str = "", body: list[Any] | None = None
) -> Any:
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    from qvmd.bus.variants import from_variant

    try:
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    except Exception as exc:  # every transport failure means the same to a user
        raise CliError(f"cannot connect to the system bus: {exc}") from None
    try:
        msg = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=INTERFACE,
            member=member,
            signature=signature,
            body=body or [],
        )
        try:
            reply = await asyncio.wait_for(bus.call(msg), CALL_TIMEOUT)
        except TimeoutError:
            raise CliError(f"qvmd did not answer {member} within {CALL_TIMEOUT:g} s") from None
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            if reply.error_name == "org.freedesktop.DBus.Error.ServiceUnknown":
                text = "qvmd is not running (no org.qvm.Net on the system bus)"
            raise CliError(str(text), EXIT_BY_ERROR.get(reply.error_name or "", EXIT_ERROR))
        body_out = [from_variant(v) for v in reply.body]
        return body_out[0] if len(body_out) == 1 else body_out
    finally:
        bus.disconnect()


def render_taps(taps: list[dict[str, Any]]) -> str:
    from qvmd.table import render

    rows = [
        [
            t["name"],
            t["guest"] or "-",
            _id(t["uid"]),
            _id(t["gid"]),
            "in use" if t["in_use"] else "idle",
            "yes" if t["on_bridge"] else "NO",
            "yes" if t["multi_queue"] else "no",
        ]
        for t in taps
    ]
    return render(["TAP", "GUEST", "OWNER", "GROUP", "STATE", "ON BRIDGE", "MULTIQUEUE"], rows)


def _id(value: int) -> str:
    if value < 0:
        return "-"
    try:
        import pwd

        return f"{pwd.getpwuid(value).pw_name}({value})"
    except KeyError:
        return str(value)


def render_status(st: dict[str, Any]) -> str:
    from qvmd.table import render

    br, svc, heal = st["bridge"], st["services"], st["heal"]
    out = [
        render(
            ["BRIDGE", "STATE", "ADDRESSES", "MAC", "FORWARDING", "LAB"],
            [
                [
                    br["name"],
                    "up" if br["up"] else ("DOWN" if br["present"] else "MISSING"),
                    ", ".join(br["addresses"]) or "-",
                    br["mac"] or "-",
                    "on" if st["forwarding"] else "OFF",
                    "up" if st["lab_up"] else "down",
                ]
            ],
        ),
        "",
        render_taps(st["taps"]),
        "",
        render(
            ["SERVICES NETNS", "INTERFACE", "ADDRESSES", "STATE", "DEFAULT VIA"],
            [
                [
                    svc["netns"] if svc["present"] else f"{svc['netns']} (MISSING)",
                    svc["interface"],
                    ", ".join(svc["addresses"]) or "-",
                    "up" if svc["up"] else "DOWN",
                    svc["gateway"] or "-",
                ]
            ],
        ),
        "",
        f"self-heal: {heal['passes']} passes, {heal['repairs']} repairs, {heal['errors']} errors",
    ]
    out += [f"  {line}" for line in heal["last"][-5:]]
    return "\n".join(out)


async def run(args: argparse.Namespace) -> str:
    addr = args.bus or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or None
    cmd = args.command
    if cmd == "status":
        st = await call(addr, "Status")
        return json.dumps(st, indent=2) if args.json else render_status(st)
    if cmd in ("up", "down", "reload"):
        changes = await call(addr, cmd.capitalize())
        if args.json:
            return json.dumps(changes, indent=2)
        return "\n".join(changes) if changes else "nothing to change"
    if args.tap_command == "list":
        taps = await call(addr, "ListTaps")
        return json.dumps(taps, indent=2) if args.json else render_taps(taps)
    if args.tap_command == "create":
        from dbus_fast import Variant

        opts: dict[str, Any] = {}
        if args.multi_queue:
            opts["multi_queue"] = Variant("b", True)
        if args.owner is not None:
            if not 0 <= args.owner < 2**32 - 1:
                raise CliError(f"--owner {args.owner} is not a valid uid", EXIT_USAGE)
            opts["owner"] = Variant("u", args.owner)
        tap = await call(addr, "CreateTap", "sa{sv}", [args.name, opts])
        if args.json:
            return json.dumps(tap, indent=2)
        verb = "created" if tap["created"] else "already yours:"
        return f"{verb} {tap['name']} (owner uid {tap['uid']})\nQEMU: -netdev {tap['qemu_netdev']}"
    await call(addr, "DeleteTap", "s", [args.name])
    return "" if args.json else f"released {args.name}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = asyncio.run(run(args))
    except CliError as exc:
        print(f"qvmctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    if out:
        print(out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
