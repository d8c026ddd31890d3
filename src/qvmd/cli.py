"""qvmctl: the unprivileged user's client for org.qvm.Net.

Starts fast: only argparse at import, and the bus is spoken by the small
blocking client in qvmd.bus.wire (stdlib only): dbus-fast and asyncio would
cost ~70 ms of imports for the one call a command makes.
Exit codes: 0 ok, 1 other error (also Busy), 2 usage or invalid argument,
3 permission denied, 4 not found.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
    cert = sub.add_parser("cert", help="lab certificates")
    csub = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    csub.add_parser("list", help="every certificate with SANs and days left")
    issue = csub.add_parser("issue", help="get the certificate for a lab name")
    issue.add_argument("host", help="a guest (cp), an FQDN in the lab domain, or a lab IP")
    issue.add_argument("--force", action="store_true", help="reissue even if still valid")
    issue.add_argument("--out", metavar="DIR", help="write cert.pem, fullchain.pem (and key.pem)")
    ca = sub.add_parser("ca", help="the lab CA")
    casub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    casub.add_parser("show", help="subject, fingerprint, constraints, expiry")
    export = casub.add_parser("export", help="copy the public CA with hash links into DIR")
    export.add_argument("dir", help="e.g. $QVM_DIR/ca-cert in a toolbox")
    fwd = sub.add_parser("forward", help="port forwards from the host into guests")
    fsub = fwd.add_subparsers(dest="forward_command", required=True, metavar="ACTION")
    fadd = fsub.add_parser("add", help="forward PROTO HOST_PORT to GUEST:GUEST_PORT")
    fadd.add_argument("proto", choices=["tcp", "udp"])
    fadd.add_argument("host_port", type=port_number)
    fadd.add_argument("guest")
    fadd.add_argument("guest_port", type=port_number)
    frm = fsub.add_parser("remove", help="remove the forward of PROTO HOST_PORT")
    frm.add_argument("proto", choices=["tcp", "udp"])
    frm.add_argument("host_port", type=port_number)
    fsub.add_parser("list", help="all forwards")
    sub.add_parser("doctor", help="check what stops the lab from working, and say how to fix it")
    guest = sub.add_parser("guest", help="the lab's guests")
    gsub = guest.add_subparsers(dest="guest_command", required=True, metavar="ACTION")
    gsub.add_parser("list", help="name, FQDN, IP, MAC, TAP, lease, certificate")
    qa = sub.add_parser("qemu-args", help="the QEMU network arguments for a guest")
    qa.add_argument("guest")
    gs = sub.add_parser("guest-setup", help="nmcli commands for a guest without cloud-init")
    gs.add_argument("guest")
    lease = sub.add_parser("lease", help="DHCP leases")
    lsub = lease.add_subparsers(dest="lease_command", required=True, metavar="ACTION")
    lsub.add_parser("list", help="MAC, IP, hostname, expiry, guest")
    return p


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 1-65535")
    return port


def call(
    address: str | None, member: str, signature: str = "", body: list[Any] | None = None
) -> Any:
    from qvmd.bus import wire

    try:
        conn = wire.Connection(address, timeout=CALL_TIMEOUT)
    except (OSError, ValueError, wire.DBusError) as exc:  # all mean the same to a user
        raise CliError(f"cannot connect to the system bus: {exc}") from None
    try:
        reply = conn.call(
            BUS_NAME, OBJECT_PATH, INTERFACE, member, signature, body or [], CALL_TIMEOUT
        )
    except TimeoutError:
        raise CliError(f"qvmd did not answer {member} within {CALL_TIMEOUT:g} s") from None
    except wire.DBusError as exc:
        text = exc.message
        if exc.name == "org.freedesktop.DBus.Error.ServiceUnknown":
            text = "qvmd is not running (no org.qvm.Net on the system bus)"
        raise CliError(text, EXIT_BY_ERROR.get(exc.name, EXIT_ERROR)) from None
    except (OSError, ValueError) as exc:
        raise CliError(f"system bus failure during {member}: {exc}") from None
    finally:
        conn.close()
    return reply[0] if len(reply) == 1 else reply


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
        render(
            ["SERVICE", "STATE", "PID", "RESTARTS", "ADDRESS", "PORTS", "NOTE"],
            [
                [
                    s["name"],
                    s["state"],
                    s["pid"] or "-",
                    s["restarts"],
                    s["address"],
                    s["ports"],
                    s["last_error"] or s["note"],
                ]
                for s in st["host_services"]
            ],
        ),
        "",
        f"self-heal: {heal['passes']} passes, {heal['repairs']} repairs, {heal['errors']} errors",
    ]
    out += [f"  {line}" for line in heal["last"][-5:]]
    out.append("drift: none" if not st["drift"] else "drift:")
    out += [f"  {line}" for line in st["drift"]]
    return "\n".join(out)


def run(args: argparse.Namespace) -> str:
    addr = args.bus or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or None
    cmd = args.command
    if cmd == "status":
        st = call(addr, "Status")
        return json.dumps(st, indent=2) if args.json else render_status(st)
    if cmd in ("up", "down", "reload"):
        changes = call(addr, cmd.capitalize())
        if args.json:
            return json.dumps(changes, indent=2)
        return "\n".join(changes) if changes else "nothing to change"
    if cmd == "tap":
        return run_tap(args, addr)
    if cmd == "cert":
        return run_cert(args, addr)
    if cmd == "ca":
        return run_ca(args, addr)
    if cmd == "forward":
        return run_forward(args, addr)
    if cmd == "qemu-args":
        argv = call(addr, "QemuArgs", "s", [args.guest])
        # One line a shell can take as is: the SMBIOS serial holds a ';'.
        return json.dumps(argv) if args.json else shlex.join(argv)
    if cmd == "guest-setup":
        script = call(addr, "GuestSetup", "s", [args.guest])
        return json.dumps(script) if args.json else str(script).rstrip("\n")
    if cmd == "guest":
        return run_guests(args, addr)
    if cmd == "doctor":
        findings = call(addr, "Doctor")
        if args.json:
            return json.dumps(findings, indent=2)
        if not findings:
            return "no problems found"
        lines = []
        for f in findings:
            lines += [f"{f['severity'].upper()}: {f['summary']}", f"  fix: {f['fix']}"]
        return "\n".join(lines)
    leases = call(addr, "ListLeases")
    return json.dumps(leases, indent=2) if args.json else render_leases(leases)


def run_guests(args: argparse.Namespace, addr: str | None) -> str:
    from qvmd.table import render

    guests = call(addr, "ListGuests")
    if args.json:
        return json.dumps(guests, indent=2)
    rows = [
        [
            g["name"],
            g["fqdn"],
            g["ip"],
            g["mac"],
            g["tap"],
            _id(g["tap_owner"]),
            g["tap_state"],
            g["lease_ip"] or "-",
            g["cert_days_left"] if g["cert_days_left"] >= 0 else "-",
        ]
        for g in guests
    ]
    return render(
        ["GUEST", "FQDN", "IP", "MAC", "TAP", "OWNER", "TAP STATE", "LEASE", "CERT DAYS"], rows
    )


def run_forward(args: argparse.Namespace, addr: str | None) -> str:
    from qvmd.table import render

    if args.forward_command == "list":
        fwds = call(addr, "ListForwards")
        if args.json:
            return json.dumps(fwds, indent=2)
        rows = [
            [f["proto"], f["host_port"], f"{f['guest']}:{f['guest_port']}", _id(f["owner_uid"])]
            for f in fwds
        ]
        return render(["PROTO", "HOST PORT", "TO", "OWNER"], rows)
    if args.forward_command == "add":
        fwd = call(
            addr, "AddForward", "sqsq", [args.proto, args.host_port, args.guest, args.guest_port]
        )
        if args.json:
            return json.dumps(fwd, indent=2)
        return f"forwarding {fwd['proto']} {fwd['host_port']} -> {fwd['guest']}:{fwd['guest_port']}"
    call(addr, "RemoveForward", "sq", [args.proto, args.host_port])
    return "" if args.json else f"removed {args.proto} {args.host_port}"


def run_tap(args: argparse.Namespace, addr: str | None) -> str:
    if args.tap_command == "list":
        taps = call(addr, "ListTaps")
        return json.dumps(taps, indent=2) if args.json else render_taps(taps)
    if args.tap_command == "delete":
        call(addr, "DeleteTap", "s", [args.name])
        return "" if args.json else f"released {args.name}"
    from qvmd.bus.wire import Variant

    opts: dict[str, Any] = {}
    if args.multi_queue:
        opts["multi_queue"] = Variant("b", True)
    if args.owner is not None:
        if not 0 <= args.owner < 2**32 - 1:
            raise CliError(f"--owner {args.owner} is not a valid uid", EXIT_USAGE)
        opts["owner"] = Variant("u", args.owner)
    tap = call(addr, "CreateTap", "sa{sv}", [args.name, opts])
    if args.json:
        return json.dumps(tap, indent=2)
    verb = "created" if tap["created"] else "already yours:"
    return f"{verb} {tap['name']} (owner uid {tap['uid']})\nQEMU: -netdev {tap['qemu_netdev']}"


def run_cert(args: argparse.Namespace, addr: str | None) -> str:
    from qvmd.table import render

    if args.cert_command == "list":
        certs = call(addr, "ListCertificates")
        if args.json:
            return json.dumps(certs, indent=2)
        rows = [
            [
                c["name"],
                c["guest"] or "-",
                " ".join(c["sans"]),
                c["not_after"][:10],
                c["days_left"],
                c["key_type"],
            ]
            for c in certs
        ]
        return render(["NAME", "GUEST", "SANS", "NOT AFTER", "DAYS LEFT", "KEY"], rows)
    from qvmd.bus.wire import Variant

    opts = {"force": Variant("b", True)} if args.force else {}
    cert = call(addr, "IssueCertificate", "sa{sv}", [args.host, opts])
    try:
        written = write_cert_files(cert, args.out) if args.out else []
    except OSError as exc:
        raise CliError(f"cannot write to {args.out}: {exc.strerror}") from None
    if args.json:
        return json.dumps({k: v for k, v in cert.items() if k != "key_pem"}, indent=2)
    lines = [
        f"{cert['name']}: {' '.join(cert['sans'])}, valid until {cert['not_after'][:10]}"
        f" ({cert['days_left']} days)",
        f"certificate: {cert['cert_path']}",
    ]
    if "key_pem" not in cert:
        lines.append("key: kept by qvmd (a guest's key goes only to that guest or an admin)")
    lines += [f"wrote {path}" for path in written]
    return "\n".join(lines)


def write_cert_files(cert: dict[str, Any], out: str) -> list[str]:
    """Write what we were given into the caller's own directory (as the caller)."""
    from pathlib import Path

    from qvmd.fsutil import atomic_write

    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    files = [("cert.pem", "cert_pem", 0o644), ("fullchain.pem", "fullchain_pem", 0o644)]
    if "key_pem" in cert:
        files.append(("key.pem", "key_pem", 0o600))
    for name, key, mode in files:
        atomic_write(dest / name, cert[key].encode(), mode)
        written.append(str(dest / name))
    return written


def run_ca(args: argparse.Namespace, addr: str | None) -> str:
    if args.ca_command == "show":
        ca = call(addr, "GetCaInfo")
        if args.json:
            return json.dumps(ca, indent=2)
        return "\n".join(
            [
                f"subject:      {ca['subject']}",
                f"fingerprint:  SHA256 {ca['fingerprint_sha256']}",
                f"key:          {ca['key_type']}",
                f"valid:        {ca['not_before'][:10]} .. {ca['not_after'][:10]}",
                f"constraints:  permitted {', '.join(ca['permitted'])}"
                + (" (critical)" if ca["constraints_critical"] else " (NOT critical)"),
                f"public copy:  {ca['public_path']} (hash link {ca['subject_hash']}.0)",
            ]
        )
    from qvmd.pki import export_public

    pem = call(addr, "GetCaCertificate")
    try:
        written = export_public(pem.encode(), args.dir)
    except OSError as exc:
        raise CliError(f"cannot write to {args.dir}: {exc.strerror}") from None
    return json.dumps(written) if args.json else "\n".join(f"wrote {p}" for p in written)


def render_leases(leases: list[dict[str, Any]]) -> str:
    import time

    from qvmd.table import render

    rows = [
        [
            le["mac"],
            le["ip"],
            le["hostname"] or "-",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(le["expiry"]))
            if le["expiry"]
            else "never",
            le["guest"] or "-",
        ]
        for le in leases
    ]
    return render(["MAC", "IP", "HOSTNAME", "EXPIRES", "GUEST"], rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except CliError as exc:
        print(f"qvmctl: {exc}", file=sys.stderr)
        return exc.code
    except Exception as exc:  # a QvmError from local work (ca export)
        from qvmd.errors import QvmError

        if not isinstance(exc, QvmError):
            raise
        print(f"qvmctl: {exc}", file=sys.stderr)
        return EXIT_BY_ERROR.get(exc.dbus_name, EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    if out:
        print(out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
