"""Our own D-Bus dispatch: authorize every call before any code runs.

dbus-fast's ServiceInterface hands a method its arguments but not the
message, so it cannot know who is calling. Instead this module installs one
message handler that claims every call to our object path and:

1. finds the method in a declarative table (unknown → UnknownMethod);
2. checks the body's signature (wrong → InvalidArgument);
3. bounds concurrent calls per connection (a flood gets Busy, not memory);
4. asks the bus daemon for the caller's uid (never trusting the body);
5. authorizes: every `Method` must name a polkit action or the explicit
   `PUBLIC` marker — a method without one cannot even be constructed; uid 0
   is an administrator; anyone else gets polkit's CheckAuthorization with
   subject system-bus-name = the real sender; nothing is cached;
6. runs the handler and replies; `QvmError`s map to their D-Bus names, any
   other exception is logged in full and answered with a generic message.

It also serves Introspectable (XML generated from the same table, so it
cannot drift from what is dispatched), Properties and Peer for that path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from qvmd.bus.busdaemon import connection_unix_user
from qvmd.bus.polkit import Authority
from qvmd.errors import Busy, InvalidArgument, PermissionDenied, QvmError

log = logging.getLogger(__name__)

PUBLIC = "public"  # explicit marker: anyone may call (read-only methods)
INTERNAL_ERROR = "org.qvm.Net.Error.Failed"
MAX_IN_FLIGHT_PER_SENDER = 16
CALL_TIMEOUT = 5.0


@dataclass
class CallContext:
    sender: str
    uid: int
    _authority: Authority
    admin_action: str
    _admin: bool | None = None

    async def is_admin(self) -> bool:
        """uid 0, or authorized for the admin action — asked at most once a call."""
        if self._admin is None:
            self._admin = self.uid == 0 or await self._authority.check(
                self.sender, self.admin_action
            )
        return self._admin


Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    name: str
    in_args: tuple[tuple[str, str], ...]
    out_args: tuple[tuple[str, str], ...]
    action: str
    handler: Handler
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.action:
            raise ValueError(f"method {self.name} declares no polkit action")

    @property
    def in_sig(self) -> str:
        return "".join(sig for _, sig in self.in_args)

    @property
    def out_sig(self) -> str:
        return "".join(sig for _, sig in self.out_args)


@dataclass(frozen=True)
class Signal:
    name: str
    args: tuple[tuple[str, str], ...]

    @property
    def sig(self) -> str:
        return "".join(sig for _, sig in self.args)


@dataclass(frozen=True)
class Property:
    name: str
    sig: str
    getter: Callable[[], Any]


@dataclass
class Interface:
    name: str
    methods: list[Method] = field(default_factory=list)
    signals: list[Signal] = field(default_factory=list)
    properties: list[Property] = field(default_factory=list)


_STANDARD_XML = """  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg name="xml_data" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId">
      <arg name="machine_uuid" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="out"/>
    </method>
    <method name="GetAll">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="props" type="a{sv}" direction="out"/>
    </method>
    <method name="Set">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <signal name="PropertiesChanged">
      <arg name="interface_name" type="s"/>
      <arg name="changed_properties" type="a{sv}"/>
      <arg name="invalidated_properties" type="as"/>
    </signal>
  </interface>
"""


def introspection_xml(iface: Interface) -> str:
    out = [
        '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"',
        ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">',
        "<node>",
        _STANDARD_XML.rstrip("\n"),
        f"  <interface name={quoteattr(iface.name)}>",
    ]
    for m in iface.methods:
        args = [(n, s, "in") for n, s in m.in_args] + [(n, s, "out") for n, s in m.out_args]
        if not args:
            out.append(f"    <method name={quoteattr(m.name)}/>")
            continue
        out.append(f"    <method name={quoteattr(m.name)}>")
        out += [f'      <arg name="{n}" type="{s}" direction="{d}"/>' for n, s, d in args]
        out.append("    </method>")
    for sig in iface.signals:
        out.append(f"    <signal name={quoteattr(sig.name)}>")
        out += [f'      <arg name="{n}" type="{s}"/>' for n, s in sig.args]
        out.append("    </signal>")
    for p in iface.properties:
        out.append(f'    <property name="{p.name}" type="{p.sig}" access="read"/>')
    out += ["  </interface>", "</node>", ""]
    return "\n".join(out)


class EagainSafeSocket:
    """Wraps the bus socket so a full send buffer means "wait", not "die".

    dbus-fast's writer treats any exception from send() — including EAGAIN
    on a full socket buffer — as a dead connection and tears it down
    (python-dbus-next #153, same code in dbus-fast). Returning 0 bytes sent
    makes the writer keep the message and wait for the socket to be writable.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0

    def sendmsg(self, buffers: Any, ancdata: Any = ()) -> int:
        try:
            return self._sock.sendmsg(buffers, ancdata)
        except BlockingIOError:
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def install_backpressure(bus: MessageBus) -> None:
    writer = getattr(bus, "_writer", None)
    if writer is None or not hasattr(writer, "sock"):
        raise RuntimeError("unsupported dbus-fast version: no message writer to guard")
    writer.sock = EagainSafeSocket(writer.sock)


class BusService:
    def __init__(
        self,
        bus: MessageBus,
        path: str,
        iface: Interface,
        authority: Authority,
        admin_action: str,
    ) -> None:
        self.bus = bus
        self.path = path
        self.iface = iface
        self.authority = authority
        self.admin_action = admin_action
        self.methods = {m.name: m for m in iface.methods}
        self.properties = {p.name: p for p in iface.properties}
        self.xml = introspection_xml(iface)
        self.in_flight: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def export(self) -> None:
        self.bus.add_message_handler(self._on_message)

    # -- incoming ------------------------------------------------------

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.METHOD_CALL or msg.path != self.path:
            return False
        reply = self._standard(msg)
        if reply is not None:
            self.bus.send(reply)
            return True
        if msg.interface not in (self.iface.name, None):
            self.bus.send(
                Message.new_error(
                    msg,
                    "org.freedesktop.DBus.Error.UnknownInterface",
                    f"no interface {msg.interface}",
                )
            )
            return True
        method = self.methods.get(msg.member or "")
        if method is None:
            self.bus.send(
                Message.new_error(
                    msg, "org.freedesktop.DBus.Error.UnknownMethod", f"no method {msg.member}"
                )
            )
            return True
        sender = msg.sender or ""
        if self.in_flight.get(sender, 0) >= MAX_IN_FLIGHT_PER_SENDER:
            self.bus.send(
                Message.new_error(
                    msg, Busy.dbus_name, "too many concurrent requests from this connection"
                )
            )
            return True
        self.in_flight[sender] = self.in_flight.get(sender, 0) + 1
        task = asyncio.create_task(self._dispatch(method, msg, sender))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    def _standard(self, msg: Message) -> Message | None:
        iface, member = msg.interface, msg.member
        if iface == "org.freedesktop.DBus.Introspectable" and member == "Introspect":
            return Message.new_method_return(msg, "s", [self.xml])
        if iface == "org.freedesktop.DBus.Peer":
            if member == "Ping":
                return Message.new_method_return(msg)
            if member == "GetMachineId":
                return Message.new_method_return(msg, "s", [_machine_id()])
        if iface == "org.freedesktop.DBus.Properties":
            return self._properties(msg)
        return None

    def _properties(self, msg: Message) -> Message:
        member, body = msg.member, msg.body
        if member == "GetAll" and msg.signature == "s":
            if body[0] not in (self.iface.name, ""):
                return Message.new_method_return(msg, "a{sv}", [{}])
            values = {p.name: Variant(p.sig, p.getter()) for p in self.iface.properties}
            return Message.new_method_return(msg, "a{sv}", [values])
        if member == "Get" and msg.signature == "ss":
            prop = self.properties.get(body[1])
            if body[0] != self.iface.name or prop is None:
                return Message.new_error(
                    msg, "org.freedesktop.DBus.Error.UnknownProperty", f"no property {body[1]}"
                )
            return Message.new_method_return(msg, "v", [Variant(prop.sig, prop.getter())])
        if member == "Set":
            return Message.new_error(
                msg, "org.freedesktop.DBus.Error.PropertyReadOnly", "all properties are read-only"
            )
        return Message.new_error(
            msg, "org.freedesktop.DBus.Error.UnknownMethod", f"no method {member}"
        )

    async def _dispatch(self, method: Method, msg: Message, sender: str) -> None:
        try:
            reply = await self._call(method, msg, sender)
        except QvmError as exc:
            reply = Message.new_error(msg, exc.dbus_name, str(exc))
        except Exception:
            log.exception("internal error in %s (caller %s)", method.name, sender)
            reply = Message.new_error(
                msg, INTERNAL_ERROR, "internal error; details are in the qvmd log"
            )
        finally:
            left = self.in_flight.get(sender, 1) - 1
            if left:
                self.in_flight[sender] = left
            else:
                self.in_flight.pop(sender, None)
        if not msg.flags & 0x1:  # NO_REPLY_EXPECTED
            self.bus.send(reply)

    async def _call(self, method: Method, msg: Message, sender: str) -> Message:
        if msg.signature != method.in_sig:
            raise InvalidArgument(
                f"{method.name} takes arguments of type '{method.in_sig}', not '{msg.signature}'"
            )
        uid = await connection_unix_user(self.bus, sender, CALL_TIMEOUT)
        ctx = CallContext(sender, uid, self.authority, self.admin_action)
        needs_check = method.action != PUBLIC and uid != 0
        if needs_check and not await self.authority.check(sender, method.action):
            raise PermissionDenied(
                f"not authorized for {method.action} (ask an administrator to add you to group qvm)"
            )
        log.debug(
            "%s by uid %d", method.name, uid, extra={"QVM_ACTION": method.action, "QVM_UID": uid}
        )
        result = await method.handler(ctx, *msg.body)
        if not method.out_args:
            return Message.new_method_return(msg)
        body = list(result) if len(method.out_args) > 1 else [result]
        return Message.new_method_return(msg, method.out_sig, body)

    # -- outgoing ------------------------------------------------------

    def emit(self, signal: str, *args: Any) -> None:
        sig = next(s for s in self.iface.signals if s.name == signal)
        self.bus.send(Message.new_signal(self.path, self.iface.name, signal, sig.sig, list(args)))

    def properties_changed(self, *names: str) -> None:
        changed = {n: Variant(self.properties[n].sig, self.properties[n].getter()) for n in names}
        self.bus.send(
            Message.new_signal(
                self.path,
                "org.freedesktop.DBus.Properties",
                "PropertiesChanged",
                "sa{sv}as",
                [self.iface.name, changed, []],
            )
        )


def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            continue
    return os.urandom(16).hex()
