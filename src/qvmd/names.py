"""Validation of names and addresses that reach the kernel or other programs.

Pure functions: each returns the normalised value or raises InvalidArgument
with a message that says what is wrong. Nothing here touches the system.
"""

from __future__ import annotations

import re

from qvmd.errors import InvalidArgument

IFNAMSIZ = 16  # the kernel's buffer, NUL included: names hold at most 15 bytes

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# RFC 1123 host label: letters, digits, hyphen; no leading/trailing hyphen.
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def validate_ifname(name: object, what: str = "interface name") -> str:
    """Check a name the way the kernel's dev_valid_name() does, and stricter.

    The kernel refuses empty names, '.', '..', names of 16 bytes or more and
    names containing '/', ':' or whitespace. We also refuse control and
    non-ASCII characters: they pass the kernel but break every tool that
    prints or parses interface names.
    """
    if not isinstance(name, str):
        raise InvalidArgument(f"{what} must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidArgument(f"{what} is empty")
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) >= IFNAMSIZ:
        raise InvalidArgument(
            f"{what} {name!r} is {len(raw)} bytes; the kernel allows at most {IFNAMSIZ - 1}"
        )
    if name in (".", ".."):
        raise InvalidArgument(f"{what} {name!r} is reserved by the kernel")
    for ch in name:
        if ch in "/:" or ch.isspace():
            raise InvalidArgument(f"{what} {name!r} contains {ch!r}, which the kernel refuses")
        if not (ch.isascii() and ch.isprintable()):
            raise InvalidArgument(
                f"{what} {name!r} contains a non-printable or non-ASCII character"
            )
    return name


def validate_mac(mac: object, what: str = "MAC address") -> str:
    """Return the MAC in lower-case colon form; refuse multicast and zero."""
    if not isinstance(mac, str):
        raise InvalidArgument(f"{what} must be a string, not {type(mac).__name__}")
    norm = mac.strip().lower().replace("-", ":")
    if not _MAC_RE.match(norm):
        raise InvalidArgument(f"{what} {mac!r} is not of the form xx:xx:xx:xx:xx:xx")
    first = int(norm[:2], 16)
    if first & 0x01:
        raise InvalidArgument(f"{what} {mac!r} is a multicast address")
    if norm == "00:00:00:00:00:00":
        raise InvalidArgument(f"{what} {mac!r} is the zero address")
    return norm


def validate_label(label: object, what: str = "host name") -> str:
    """A single DNS label (RFC 1123), lower-cased."""
    if not isinstance(label, str):
        raise InvalidArgument(f"{what} must be a string, not {type(label).__name__}")
    norm = label.lower()
    if not _LABEL_RE.match(norm):
        raise InvalidArgument(
            f"{what} {label!r} is not a valid DNS label "
            "(1-63 letters, digits or '-', not starting or ending with '-')"
        )
    return norm


def validate_domain(domain: object, what: str = "domain") -> str:
    """A DNS domain of one or more labels, lower-cased, without trailing dot."""
    if not isinstance(domain, str):
        raise InvalidArgument(f"{what} must be a string, not {type(domain).__name__}")
    norm = domain.lower().rstrip(".")
    if not norm or len(norm) > 253:
        raise InvalidArgument(f"{what} {domain!r} must be 1-253 characters")
    for label in norm.split("."):
        validate_label(label, f"label {label!r} of {what} {domain!r}")
    return norm
