"""The org.qvm.Net interface: a table of methods bound to the core.

Thin by design: unpack and validate argument *shapes*, call the core, pack
the result. Names, ownership and every other rule live in the core.
"""

from __future__ import annotations

from typing import Any

from qvmd import __version__
from qvmd.bus.service import PUBLIC, CallContext, Interface, Method, Property, Signal
from qvmd.bus.variants import read_options, to_vardict
from qvmd.core import Core
from qvmd.errors import InvalidArgument
from qvmd.guestsetup import guest_qemu_args, nmcli_setup
from qvmd.model import Lab
from qvmd.plane import TapStatus
from qvmd.taps import Caller

BUS_NAME = "org.qvm.Net"
OBJECT_PATH = "/org/qvm/Net"
INTERFACE = "org.qvm.Net"

MANAGE_TAPS = "org.qvm.Net.manage-taps"
MANAGE_LAB = "org.qvm.Net.manage-lab"
ISSUE_CERTIFICATES = "org.qvm.Net.issue-certificates"
MANAGE_FORWARDS = "org.qvm.Net.manage-forwards"
ADMIN_ACTION = MANAGE_LAB

UINT32_MAX = 2**32 - 1


def tap_dict(t: TapStatus) -> dict[str, Any]:
    return {
        "name": t.name,
        "uid": -1 if t.uid is None else t.uid,
        "gid": -1 if t.gid is None else t.gid,
        "multi_queue": t.multi_queue,
        "in_use": t.carrier,
        "up": t.up,
        "on_bridge": t.enslaved,
        "guest": t.guest or "",
    }


def build_interface(core: Core) -> Interface:
    def caller(ctx: CallContext) -> Caller:
        return Caller(ctx.uid, ctx.is_admin)

    async def create_tap(ctx: CallContext, name: str, options: dict[str, Any]) -> dict[str, Any]:
        opts = read_options(options, {"multi_queue": ("b",), "owner": ("u",), "group": ("u",)})
        for key in ("owner", "group"):
            if key in opts and opts[key] >= UINT32_MAX:
                raise InvalidArgument(f"option {key!r}: {opts[key]} is not a valid id")
        result = await core.create_tap(
            caller(ctx),
            name,
            multi_queue=opts.get("multi_queue"),
            owner_uid=opts.get("owner"),
            owner_gid=opts.get("group"),
        )
        spec = result.spec
        return to_vardict(
            {
                "name": spec.name,
                "uid": spec.uid,
                "gid": -1 if spec.gid is None else spec.gid,
                "multi_queue": spec.multi_queue,
                "created": result.created,
                "guest": result.guest or "",
                "qemu_netdev": f"tap,id=net0,ifname={spec.name},script=no,downscript=no"
                + (",queues=2" if spec.multi_queue else ""),
            }
        )

    async def delete_tap(ctx: CallContext, name: str) -> None:
        await core.delete_tap(caller(ctx), name)

    async def list_taps(ctx: CallContext) -> list[dict[str, Any]]:
        return [to_vardict(tap_dict(t)) for t in await core.list_taps()]

    async def status(ctx: CallContext) -> dict[str, Any]:
        snap = await core.status()
        snap["taps"] = [tap_dict(t) for t in snap["taps"]]
        return to_vardict(snap)

    async def up(ctx: CallContext) -> list[str]:
        return await core.up()

    async def down(ctx: CallContext) -> list[str]:
        return await core.down()

    async def reload(ctx: CallContext) -> list[str]:
        return await core.reload()

    async def get_ca_certificate(ctx: CallContext) -> str:
        return core.certs.ca_pem()

    async def get_ca_info(ctx: CallContext) -> dict[str, Any]:
        return to_vardict(core.certs.ca_info())

    async def list_certificates(ctx: CallContext) -> list[dict[str, Any]]:
        return [to_vardict(c) for c in await core.certs.list()]

    async def issue_certificate(
        ctx: CallContext, hostname: str, options: dict[str, Any]
    ) -> dict[str, Any]:
        opts = read_options(options, {"force": ("b",)})
        return to_vardict(await core.certs.issue(caller(ctx), hostname, opts))

    async def add_forward(
        ctx: CallContext, proto: str, host_port: int, guest: str, guest_port: int
    ) -> dict[str, Any]:
        return to_vardict(await core.add_forward(caller(ctx), proto, host_port, guest, guest_port))

    async def remove_forward(ctx: CallContext, proto: str, host_port: int) -> None:
        await core.remove_forward(caller(ctx), proto, host_port)

    async def list_forwards(ctx: CallContext) -> list[dict[str, Any]]:
        return [to_vardict(f) for f in core.list_forwards()]

    async def doctor(ctx: CallContext) -> list[dict[str, Any]]:
        return [to_vardict(f) for f in await core.doctor()]

    async def list_guests(ctx: CallContext) -> list[dict[str, Any]]:
        return [to_vardict(g) for g in await core.guests()]

    async def qemu_args(ctx: CallContext, guest: str) -> list[str]:
        return guest_qemu_args(core.lab, guest)

    async def guest_setup(ctx: CallContext, guest: str) -> str:
        return nmcli_setup(core.lab, guest)

    async def list_leases(ctx: CallContext) -> list[dict[str, Any]]:
        return [to_vardict(lease) for lease in core.services.leases()]

    def lab() -> Lab:  # properties follow reloads
        return core.lab

    return Interface(
        name=INTERFACE,
        methods=[
            Method(
                "CreateTap",
                (("name", "s"), ("options", "a{sv}")),
                (("tap", "a{sv}"),),
                MANAGE_TAPS,
                create_tap,
            ),
            Method("DeleteTap", (("name", "s"),), (), MANAGE_TAPS, delete_tap),
            Method("ListTaps", (), (("taps", "aa{sv}"),), PUBLIC, list_taps),
            Method("Status", (), (("status", "a{sv}"),), PUBLIC, status),
            Method("Up", (), (("changes", "as"),), MANAGE_LAB, up),
            Method("Down", (), (("changes", "as"),), MANAGE_LAB, down),
            Method("Reload", (), (("changes", "as"),), MANAGE_LAB, reload),
            Method("GetCaCertificate", (), (("pem", "s"),), PUBLIC, get_ca_certificate),
            Method("GetCaInfo", (), (("ca", "a{sv}"),), PUBLIC, get_ca_info),
            Method(
                "ListCertificates", (), (("certificates", "aa{sv}"),), PUBLIC, list_certificates
            ),
            Method(
                "IssueCertificate",
                (("hostname", "s"), ("options", "a{sv}")),
                (("certificate", "a{sv}"),),
                ISSUE_CERTIFICATES,
                issue_certificate,
            ),
            Method("ListLeases", (), (("leases", "aa{sv}"),), PUBLIC, list_leases),
            Method(
                "AddForward",
                (("proto", "s"), ("host_port", "q"), ("guest", "s"), ("guest_port", "q")),
                (("forward", "a{sv}"),),
                MANAGE_FORWARDS,
                add_forward,
            ),
            Method(
                "RemoveForward",
                (("proto", "s"), ("host_port", "q")),
                (),
                MANAGE_FORWARDS,
                remove_forward,
            ),
            Method("ListForwards", (), (("forwards", "aa{sv}"),), PUBLIC, list_forwards),
            Method("Doctor", (), (("findings", "aa{sv}"),), PUBLIC, doctor),
            Method("ListGuests", (), (("guests", "aa{sv}"),), PUBLIC, list_guests),
            Method("QemuArgs", (("guest", "s"),), (("args", "as"),), PUBLIC, qemu_args),
            Method("GuestSetup", (("guest", "s"),), (("script", "s"),), PUBLIC, guest_setup),
        ],
        signals=[
            Signal("TapAdded", (("name", "s"), ("uid", "u"))),
            Signal("TapRemoved", (("name", "s"),)),
            Signal("Healed", (("what", "s"), ("detail", "s"))),
            Signal("LeaseChanged", (("change", "s"), ("mac", "s"), ("ip", "s"), ("hostname", "s"))),
        ],
        properties=[
            Property("Version", "s", lambda: __version__),
            Property("Bridge", "s", lambda: lab().bridge),
            Property("Gateway", "s", lambda: str(lab().gateway)),
            Property("Domain", "s", lambda: lab().domain),
            Property("LabUp", "b", lambda: core.lab_up),
        ],
    )
