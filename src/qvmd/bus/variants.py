"""Python values -> D-Bus variants for our results; checking a{sv} options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dbus_fast import Variant

from qvmd.errors import InvalidArgument


def to_variant(value: Any) -> Variant:
    """Plain data (bool, int, str, float, lists, dicts) to a Variant.

    Integers travel as 'x' (int64): uids and counters fit, and a client
    never has to guess a width. None is not representable in D-Bus and is
    sent as an empty string.
    """
    if isinstance(value, Variant):
        return value
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if value is None:
        return Variant("s", "")
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, Mapping):
        return Variant("a{sv}", to_vardict(value))
    if isinstance(value, list | tuple):
        if all(isinstance(v, str) for v in value):
            return Variant("as", list(value))
        return Variant("av", [to_variant(v) for v in value])
    raise TypeError(f"cannot send {type(value).__name__} over D-Bus")


def to_vardict(values: Mapping[str, Any]) -> dict[str, Variant]:
    return {str(k): to_variant(v) for k, v in values.items()}


MAX_OPTIONS = 16


def read_options(options: object, schema: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """Validate an a{sv} options argument against {key: allowed signatures}."""
    if not isinstance(options, dict):
        raise InvalidArgument("options must be a dictionary a{sv}")
    if len(options) > MAX_OPTIONS:
        raise InvalidArgument(f"too many options ({len(options)}; at most {MAX_OPTIONS})")
    out: dict[str, Any] = {}
    for key, var in options.items():
        if key not in schema:
            known = ", ".join(sorted(schema)) or "none"
            raise InvalidArgument(f"unknown option {key[:40]!r} (known: {known})")
        if not isinstance(var, Variant) or var.signature not in schema[key]:
            want = " or ".join(schema[key])
            got = var.signature if isinstance(var, Variant) else type(var).__name__
            raise InvalidArgument(f"option {key!r} must have type {want}, not {got}")
        out[key] = var.value
    return out
