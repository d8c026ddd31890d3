"""polkit client: may this bus sender perform this action?

One CheckAuthorization call per request, subject = ("system-bus-name",
{"name": <sender>}).  polkitd resolves that unique name to the process, its
uid and its session itself (through the bus daemon), so the answer is about
the real caller and nothing the caller sent can influence it.  Nothing is
cached: each request asks again (polkit has its own auth_admin_keep memory,
bound to the subject's process and session).

Failure is never permission: a timeout, a missing polkitd or an error reply
raises `qvmd.errors.Failed("authorization service unavailable")`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

from qvmd.bus.busdaemon import DEFAULT_TIMEOUT, call

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"

# CheckAuthorizationFlags
ALLOW_USER_INTERACTION = 0x1

UNAVAILABLE = "authorization service unavailable"


@dataclass(frozen=True, slots=True)
class AuthorizationResult:
    """polkit's answer.  `challenge`: not authorized now, but would be after
    authentication (only meaningful when interaction was not allowed)."""

    authorized: bool
    challenge: bool
    details: dict[str, str]


class Authority:
    """Client for org.freedesktop.PolicyKit1.Authority on `bus`.

    `timeout` bounds each call (seconds).  With allow_interaction=True polkit
    may wait for the user to type a password in an agent: pass a larger
    timeout in that case, interactive checks are not used by qvmd today.
    """

    def __init__(self, bus: MessageBus, timeout: float = DEFAULT_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._bus = bus
        self._timeout = timeout

    async def check_result(
        self, sender: str, action_id: str, allow_interaction: bool = False
    ) -> AuthorizationResult:
        """Ask polkit about `sender` (a unique bus name, ":1.42") and `action_id`."""
        if not sender.startswith(":"):
            # The adapter passes Message.sender, which the bus daemon always
            # sets to the unique name; anything else is a programming error.
            raise ValueError(f"sender must be a unique bus name, got {sender!r}")
        if not action_id:
            raise ValueError("empty action id")
        msg = Message(
            destination=POLKIT_NAME,
            path=POLKIT_PATH,
            interface=POLKIT_INTERFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[
                ["system-bus-name", {"name": Variant("s", sender)}],
                action_id,
                {},
                ALLOW_USER_INTERACTION if allow_interaction else 0,
                "",
            ],
        )
        body = await call(self._bus, msg, self._timeout, UNAVAILABLE, "(bba{ss})")
        authorized, challenge, details = body[0]
        return AuthorizationResult(bool(authorized), bool(challenge), dict(details))

    async def check(self, sender: str, action_id: str, allow_interaction: bool = False) -> bool:
        """True if polkit authorizes `sender` for `action_id`; raises Failed if it cannot say."""
        result = await self.check_result(sender, action_id, allow_interaction)
        return result.authorized
