"""Which names the lab CA will certify: validation for IssueCertificate.

Only two kinds of name pass: a DNS name inside the lab domain (a bare
label is taken relative to it: `registry` means `registry.qvm0.lan`), or a
host address of the lab subnet. Everything else is refused with
InvalidArgument before anything is written: other domains, the bare domain
itself, wildcards, IPv6, the subnet's network and broadcast addresses,
empty or over-long names and labels, and any byte outside [A-Za-z0-9.-].
The CA's name constraints would make a certificate for a foreign name
useless anyway; refusing it here gives the caller a clear message instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address

from qvmd.errors import InvalidArgument
from qvmd.names import validate_label

MAX_NAME = 253  # RFC 1035: 255 octets on the wire = 253 characters of text
_SHOWN = 80  # how much of a refused name goes into the message
_CHARS = re.compile(r"[A-Za-z0-9.-]+")
_DOTTED_QUAD = re.compile(r"[0-9]+(\.[0-9]+){3}")

ISSUE_OPTIONS = {"force": bool}


def _show(name: str) -> str:
    return repr(name if len(name) <= _SHOWN else name[:_SHOWN] + "...")


def validate_cert_name(name: object, domain: str, subnet: IPv4Network) -> str | IPv4Address:
    """Return the normalised FQDN (lower case, no trailing dot) or address.

    `domain` must already be normalised (model/config do that).
    """
    if not isinstance(name, str):
        raise InvalidArgument(f"host name must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidArgument("host name is empty")
    if len(name) > MAX_NAME + 1:  # +1: a trailing dot
        raise InvalidArgument(f"host name {_show(name)} is longer than {MAX_NAME} characters")
    if "*" in name:
        raise InvalidArgument(f"host name {_show(name)}: wildcard certificates are refused")
    if ":" in name:
        try:
            IPv6Address(name.split("%", 1)[0])
        except ValueError:
            pass
        else:
            raise InvalidArgument(f"{_show(name)}: only IPv4 addresses of {subnet} are certified")
    if not _CHARS.fullmatch(name):
        raise InvalidArgument(f"host name {_show(name)} may hold only letters, digits, '-' and '.'")
    norm = name.lower()
    if norm.endswith("."):
        norm = norm[:-1]
    if _DOTTED_QUAD.fullmatch(norm):
        return _lab_address(norm, subnet)
    labels = norm.split(".")
    for label in labels:
        if not label:
            raise InvalidArgument(f"host name {_show(name)} has an empty label")
        validate_label(label, f"label {label[:_SHOWN]!r} of {_show(name)}")
    if len(labels) == 1:
        norm = f"{norm}.{domain}"
    elif norm == domain:
        raise InvalidArgument(f"{_show(name)} is the lab domain itself; name a host in it")
    elif not norm.endswith("." + domain):
        raise InvalidArgument(f"host name {_show(name)} is outside the lab domain {domain}")
    if len(norm) > MAX_NAME:
        raise InvalidArgument(f"host name {_show(norm)} is longer than {MAX_NAME} characters")
    return norm


def _lab_address(text: str, subnet: IPv4Network) -> IPv4Address:
    try:
        ip = IPv4Address(text)  # refuses octets over 255 and leading zeros
    except ValueError:
        raise InvalidArgument(f"{text!r} is not a valid IPv4 address") from None
    if ip not in subnet:
        raise InvalidArgument(f"address {ip} is outside the lab subnet {subnet}")
    if subnet.prefixlen < 31 and ip in (subnet.network_address, subnet.broadcast_address):
        raise InvalidArgument(f"address {ip} is not a host address of {subnet}")
    return ip


def validate_issue_options(options: Mapping[str, object] | None) -> bool:
    """The a{sv} options of IssueCertificate, unpacked to plain values.

    Known: `force` (bool) reissues even when the current certificate is
    still good. Unknown keys and wrong types are refused.
    Returns `force`.
    """
    if options is None:
        return False
    if not isinstance(options, Mapping):
        raise InvalidArgument(f"options must be a dictionary, not {type(options).__name__}")
    for key, value in options.items():
        typ = ISSUE_OPTIONS.get(key) if isinstance(key, str) else None
        if typ is None:
            raise InvalidArgument(
                f"unknown option {str(key)[:_SHOWN]!r}; known: {', '.join(sorted(ISSUE_OPTIONS))}"
            )
        if not isinstance(value, typ):
            raise InvalidArgument(
                f"option {key!r} must be {typ.__name__}, not {type(value).__name__}"
            )
    return bool(options.get("force", False))
