"""Questions to the bus daemon itself (org.freedesktop.DBus), with timeouts.

The caller's identity comes only from here: the bus daemon knows the uid and
pid of every connection from SO_PEERCRED, so nothing a caller sends can fake
it.  `call()` is the shared low-level helper (also used by `qvmd.bus.polkit`)
that puts a timeout on a method call and turns every failure into one typed
error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from qvmd.errors import Failed

log = logging.getLogger(__name__)

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_INTERFACE = "org.freedesktop.DBus"

DEFAULT_TIMEOUT = 5.0


class CallFailed(Failed):
    """A bus call failed, timed out or got an unexpected answer.

    The message is safe for callers (it names the service, not the details);
    `detail` keeps the technical reason for the log.
    """

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def _failed(message: str, detail: str) -> CallFailed:
    # Logged here so that no caller can forget it: callers only ever see
    # `message`, the log gets the reason.
    log.warning("%s (%s)", message, detail)
    return CallFailed(message, detail)


def _forget_reply(bus: MessageBus, serial: int) -> None:
    # dbus-fast keeps a reply handler per serial until the reply arrives; a
    # call we gave up on would keep one forever if the peer never answers.
    handlers = getattr(bus, "_method_return_handlers", None)
    if isinstance(handlers, dict):
        handlers.pop(serial, None)


async def call(
    bus: MessageBus,
    msg: Message,
    timeout: float,
    unavailable: str,
    reply_signature: str,
) -> list[Any]:
    """Send method call `msg`, wait at most `timeout` s, return the reply body.

    Any failure -- timeout, lost connection, an error reply, a reply of the
    wrong signature -- raises `CallFailed(unavailable)`.  Cancellation of the
    awaiting task propagates unchanged.
    """
    what = f"{msg.destination} {msg.interface}.{msg.member}"
    try:
        reply = await asyncio.wait_for(bus.call(msg), timeout)
    except TimeoutError:
        _forget_reply(bus, msg.serial)
        raise _failed(unavailable, f"{what}: no reply within {timeout:g} s") from None
    except Exception as e:  # a dead connection raises various types
        _forget_reply(bus, msg.serial)
        raise _failed(unavailable, f"{what}: {type(e).__name__}: {e}") from e
    if reply is None:
        raise _failed(unavailable, f"{what}: no reply")
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise _failed(unavailable, f"{what}: {reply.error_name}: {text}")
    if reply.signature != reply_signature:
        raise _failed(
            unavailable,
            f"{what}: reply signature {reply.signature!r}, expected {reply_signature!r}",
        )
    return list(reply.body)


async def connection_unix_user(
    bus: MessageBus, sender: str, timeout: float = DEFAULT_TIMEOUT
) -> int:
    """The uid of the process that owns bus connection `sender` (GetConnectionUnixUser)."""
    body = await call(
        bus,
        Message(
            destination=DBUS_NAME,
            path=DBUS_PATH,
            interface=DBUS_INTERFACE,
            member="GetConnectionUnixUser",
            signature="s",
            body=[sender],
        ),
        timeout,
        "cannot identify the caller (bus daemon did not answer)",
        "u",
    )
    uid = body[0]
    assert isinstance(uid, int)
    return uid
