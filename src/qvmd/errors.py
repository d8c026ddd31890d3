"""One error hierarchy for the whole daemon.

Every error a caller may see derives from QvmError; the bus adapter maps each
class to exactly one D-Bus error name, and anything else becomes a generic
internal error (logged locally, never sent with details).
"""

from __future__ import annotations


class QvmError(Exception):
    """Base of all errors whose message is safe to show to a caller."""

    dbus_name = "org.qvm.Net.Error.Failed"


class InvalidArgument(QvmError):
    dbus_name = "org.qvm.Net.Error.InvalidArgument"


class NotFound(QvmError):
    dbus_name = "org.qvm.Net.Error.NotFound"


class PermissionDenied(QvmError):
    dbus_name = "org.qvm.Net.Error.PermissionDenied"


class Busy(QvmError):
    dbus_name = "org.qvm.Net.Error.Busy"


class Failed(QvmError):
    dbus_name = "org.qvm.Net.Error.Failed"


class ConfigError(InvalidArgument):
    """A configuration value is wrong; `key` is its dotted path in the file."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason
