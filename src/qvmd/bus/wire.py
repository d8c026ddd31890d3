"""A small blocking D-Bus client: wire format, EXTERNAL auth, method calls.

qvmctl makes one call per run; dbus-fast plus asyncio cost ~70 ms of imports
for that, several times the work itself.  This module uses only socket,
struct and os, and implements just what a client needs: marshalling of all
types except unix fds (h), and call/reply on a unix socket.

Incoming data is untrusted: every malformation raises ValueError (never
IndexError or struct.error), nesting and lengths are bounded as in the spec.
"""

from __future__ import annotations

import _socket as socket  # the C module: socket.py spends ~3 ms building IntEnums
import os
import struct
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
MAX_ARRAY = 64 << 20
MAX_MESSAGE = 128 << 20
MAX_DEPTH = 32  # arrays, and separately structs/dict entries, per signature
MAX_NESTING = 64  # all containers including variants, across variant signatures

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
PATH, INTERFACE, MEMBER, ERROR_NAME, REPLY_SERIAL, DESTINATION, SENDER, SIGNATURE = range(1, 9)

_ALIGN = {c: n for n, cs in ((1, "ygv"), (2, "nq"), (4, "biusoa"), (8, "xtd({")) for c in cs}
_FIXED = dict(zip("ynqiuxtd", "BhHiIqQd", strict=True))
_RANGES = {"y": (0, 2**8), "n": (-(2**15), 2**15), "q": (0, 2**16), "i": (-(2**31), 2**31),
           "u": (0, 2**32), "x": (-(2**63), 2**63), "t": (0, 2**64)}  # fmt: skip
_BASIC = frozenset("ybnqiuxtdsog")
_PATH_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


class Variant(NamedTuple):
    signature: str
    value: Any


class DBusError(Exception):
    """An ERROR reply: `name` is the D-Bus error name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


class Message(NamedTuple):
    type: int
    flags: int
    serial: int
    fields: dict[int, Any]
    body: list[Any]


# --------------------------------------------------------------------------
# signatures


@lru_cache(maxsize=512)
def split_signature(sig: str) -> tuple[str, ...]:
    """The complete types of `sig`; ValueError if it is not a valid signature."""
    if len(sig.encode()) > 255:
        raise ValueError(f"signature longer than 255 bytes: {sig[:40]!r}...")
    types, i = [], 0
    while i < len(sig):
        end = _skip_type(sig, i, 0, 0)
        types.append(sig[i:end])
        i = end
    return tuple(types)


def _skip_type(sig: str, i: int, arrays: int, structs: int) -> int:
    """Index after the complete type starting at sig[i]."""
    if i >= len(sig):
        raise ValueError(f"signature {sig!r} ends inside a container")
    c = sig[i]
    if c in _BASIC or c == "v":
        return i + 1
    if c == "a":
        if arrays >= MAX_DEPTH:
            raise ValueError(f"signature {sig!r} nests arrays deeper than {MAX_DEPTH}")
        if sig[i + 1 : i + 2] != "{":
            return _skip_type(sig, i + 1, arrays + 1, structs)
        if structs >= MAX_DEPTH:
            raise ValueError(f"signature {sig!r} nests structs deeper than {MAX_DEPTH}")
        if sig[i + 2 : i + 3] not in _BASIC:
            raise ValueError(f"signature {sig!r}: a dict key must be a basic type")
        end = _skip_type(sig, i + 3, arrays + 1, structs + 1)
        if sig[end : end + 1] != "}":
            raise ValueError(f"signature {sig!r}: a dict entry holds exactly two types")
        return end + 1
    if c == "(":
        if structs >= MAX_DEPTH:
            raise ValueError(f"signature {sig!r} nests structs deeper than {MAX_DEPTH}")
        if sig[i + 1 : i + 2] == ")":
            raise ValueError(f"signature {sig!r} has an empty struct")
        i += 1
        while sig[i : i + 1] != ")":
            i = _skip_type(sig, i, arrays, structs + 1)
        return i + 1
    what = "unix fds (h) are not supported" if c == "h" else f"unexpected {c!r}"
    raise ValueError(f"signature {sig!r}: {what} at position {i}")


def _single_type(sig: str) -> str:
    types = split_signature(sig)
    if len(types) != 1:
        raise ValueError(f"variant signature {sig!r} is not a single complete type")
    return types[0]


def _check_path(path: str) -> None:
    # The bus drops the connection on a bad path: say what is wrong instead.
    if path != "/" and not (
        path.startswith("/")
        and all(seg and _PATH_CHARS.issuperset(seg) for seg in path[1:].split("/"))
    ):
        raise ValueError(f"invalid object path {path!r}")


# --------------------------------------------------------------------------
# marshalling


def marshal(signature: str, values: Sequence[Any], little: bool = True) -> bytes:
    """Encode `values` as if they started at an 8-aligned message offset."""
    types = split_signature(signature)
    if not isinstance(values, list | tuple) or len(values) != len(types):
        raise TypeError(f"signature {signature!r} needs {len(types)} values, got {values!r}")
    buf = bytearray()
    for t, v in zip(types, values, strict=True):
        _write(buf, t, v, "<" if little else ">", 0)
    return bytes(buf)


def _pad(buf: bytearray, n: int) -> None:
    buf += bytes(-len(buf) % n)


def _write(buf: bytearray, t: str, v: Any, e: str, depth: int) -> None:
    c = t[0]
    if c in "av(" and depth >= MAX_NESTING:  # depth: the containers around this value
        raise ValueError(f"values nest deeper than {MAX_NESTING} containers")
    if c in _RANGES:
        lo, hi = _RANGES[c]
        if not isinstance(v, int) or not lo <= v < hi:
            raise ValueError(f"{v!r} is not a valid {t!r} (integer in [{lo}, {hi}))")
        _pad(buf, _ALIGN[c])
        buf += struct.pack(e + _FIXED[c], v)
    elif c == "b":
        if not isinstance(v, bool):
            raise TypeError(f"{v!r} is not a bool for 'b'")
        _pad(buf, 4)
        buf += struct.pack(e + "I", v)
    elif c == "d":
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise TypeError(f"{v!r} is not a float for 'd'")
        _pad(buf, 8)
        buf += struct.pack(e + "d", v)
    elif c in "sog":
        if not isinstance(v, str):
            raise TypeError(f"{v!r} is not a str for {c!r}")
        try:
            raw = v.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{v!r} is not encodable as UTF-8") from None
        if b"\0" in raw:
            raise ValueError(f"{v!r} contains a NUL character")
        if c == "o":
            _check_path(v)
        if c == "g":
            split_signature(v)
            buf.append(len(raw))
        else:
            _pad(buf, 4)
            buf += struct.pack(e + "I", len(raw))
        buf += raw + b"\0"
    elif c == "v":
        if not isinstance(v, Variant):
            raise TypeError(f"{v!r} is not a Variant for 'v'")
        _write(buf, "g", v.signature, e, depth)  # checks it is a str first
        _write(buf, _single_type(v.signature), v.value, e, depth + 1)
    elif c == "(":
        fields = split_signature(t[1:-1])
        if not isinstance(v, list | tuple) or len(v) != len(fields):
            raise TypeError(f"{v!r} is not a {len(fields)}-item list or tuple for {t!r}")
        _pad(buf, 8)
        for ft, fv in zip(fields, v, strict=True):
            _write(buf, ft, fv, e, depth + 1)
    else:  # array
        _pad(buf, 4)
        at = len(buf)
        buf += bytes(4)
        _pad(buf, _ALIGN[t[1]])  # even when empty
        start = len(buf)
        if t[1] == "{":
            if not isinstance(v, Mapping):
                raise TypeError(f"{v!r} is not a dict for {t!r}")
            key, val = t[2], t[3:-1]
            for k, x in v.items():
                _pad(buf, 8)
                _write(buf, key, k, e, depth + 1)
                _write(buf, val, x, e, depth + 1)
        else:
            if not isinstance(v, list | tuple | bytes | bytearray):
                raise TypeError(f"{v!r} is not a list or tuple for {t!r}")
            for x in v:
                _write(buf, t[1:], x, e, depth + 1)
        if len(buf) - start > MAX_ARRAY:
            raise ValueError(f"array {t!r} is longer than {MAX_ARRAY} bytes")
        struct.pack_into(e + "I", buf, at, len(buf) - start)


# --------------------------------------------------------------------------
# unmarshalling


def unmarshal(
    signature: str, data: bytes | bytearray, offset: int = 0, little: bool = True
) -> list[Any]:
    """Decode values from data[offset:] to its end (alignment counts from data[0])."""
    r = _Reader(data, offset, len(data), little)
    values = [r.read(t, 0) for t in split_signature(signature)]
    if r.pos != len(data):
        raise ValueError(f"{len(data) - r.pos} bytes left over after {signature!r}")
    return values


class _Reader:
    def __init__(self, data: bytes | bytearray, pos: int, end: int, little: bool) -> None:
        self.data, self.pos, self.end, self.e = data, pos, end, "<" if little else ">"

    def take(self, n: int, align: int = 1) -> int:
        """Skip padding to `align`, claim n bytes, return where they start."""
        start = self.pos + (-self.pos % align)
        if start + n > self.end:
            raise ValueError(f"data truncated at offset {self.pos} (needs {start + n - self.pos})")
        if any(self.data[self.pos : start]):
            raise ValueError(f"non-zero padding at offset {self.pos}")
        self.pos = start + n
        return start

    def uint(self, size: int, code: str) -> int:
        v: int = struct.unpack_from(self.e + code, self.data, self.take(size, size))[0]
        return v

    def read(self, t: str, depth: int) -> Any:
        c = t[0]
        if c in "av(" and depth >= MAX_NESTING:
            raise ValueError(f"data nests deeper than {MAX_NESTING} containers")
        if c in _FIXED:
            size = struct.calcsize(_FIXED[c])
            return struct.unpack_from(self.e + _FIXED[c], self.data, self.take(size, size))[0]
        if c == "b":
            v = self.uint(4, "I")
            if v > 1:
                raise ValueError(f"boolean value {v} at offset {self.pos - 4}")
            return v == 1
        if c in "sog":
            n = self.data[self.take(1)] if c == "g" else self.uint(4, "I")
            at = self.take(n + 1)
            raw = bytes(self.data[at : at + n + 1])
            if raw[-1] != 0 or b"\0" in raw[:-1]:
                raise ValueError(f"string at offset {at} is not NUL-terminated exactly once")
            try:
                s = raw[:-1].decode()
            except UnicodeDecodeError:
                raise ValueError(f"string at offset {at} is not UTF-8") from None
            if c == "o":
                _check_path(s)
            elif c == "g":
                split_signature(s)
            return s
        if c == "v":
            inner = _single_type(self.read("g", depth))
            return self.read(inner, depth + 1)
        if c == "(":
            self.take(0, 8)
            return [self.read(ft, depth + 1) for ft in split_signature(t[1:-1])]
        n = self.uint(4, "I")
        if n > MAX_ARRAY:
            raise ValueError(f"array length {n} exceeds {MAX_ARRAY}")
        end = self.take(0, _ALIGN[t[1]]) + n
        if end > self.end:
            raise ValueError(f"array at offset {self.pos} runs past the end of the data")
        if t == "ay":  # bulk data: one slice, not a Python loop per byte
            out: Any = list(self.data[self.pos : end])
            self.pos = end
        elif t[1] == "{":
            d = {}
            while self.pos < end:
                self.take(0, 8)
                k = self.read(t[2], depth + 1)
                d[k] = self.read(t[3:-1], depth + 1)
            out = d
        else:
            out = []
            while self.pos < end:
                out.append(self.read(t[1:], depth + 1))
        if self.pos != end:
            raise ValueError(f"array element crosses the array end at offset {end}")
        return out


# --------------------------------------------------------------------------
# messages

_HEADER = "yyyyuua(yv)"


def encode_message(
    type_: int, serial: int, fields: Mapping[int, Variant], signature: str = "",
    body: Sequence[Any] = (), flags: int = 0, little: bool = True,
) -> bytes:  # fmt: skip
    body_bytes = marshal(signature, body, little)
    if signature:
        fields = {**fields, SIGNATURE: Variant("g", signature)}
    endian = ord("l" if little else "B")
    header = [endian, type_, flags, 1, len(body_bytes), serial, sorted(fields.items())]
    head = bytearray(marshal(_HEADER, header, little))
    _pad(head, 8)  # the body starts 8-aligned
    if len(head) + len(body_bytes) > MAX_MESSAGE:
        raise ValueError(f"message longer than {MAX_MESSAGE} bytes")
    return bytes(head + body_bytes)


def message_length(buf: bytes | bytearray) -> int | None:
    """Total length of the message starting buf, or None if fewer than 16 bytes are there."""
    if len(buf) < 16:
        return None
    if buf[0] not in b"lB" or buf[3] != 1:
        raise ValueError(f"not a D-Bus message (endian {buf[0]:#x}, version {buf[3]})")
    body_len, _, fields_len = struct.unpack_from("<III" if buf[0] == 108 else ">III", buf, 4)
    if fields_len > MAX_ARRAY:
        raise ValueError(f"header fields length {fields_len} exceeds {MAX_ARRAY}")
    total: int = 16 + fields_len + (-fields_len % 8) + body_len
    if total > MAX_MESSAGE:
        raise ValueError(f"message length {total} exceeds {MAX_MESSAGE}")
    return total


def decode_message(data: bytes | bytearray) -> Message:
    """Parse exactly one complete message (either endianness)."""
    total = message_length(data)
    if total is None or total != len(data):
        raise ValueError(f"message is {len(data)} bytes, its header says {total}")
    little = data[0] == 108
    fields_end = 16 + struct.unpack_from("<I" if little else ">I", data, 12)[0]
    _, type_, flags, _, _, serial, fields = unmarshal(_HEADER, data[:fields_end], 0, little)
    if type_ == 0 or serial == 0:
        raise ValueError(f"invalid message type {type_} or serial {serial}")
    r = _Reader(data, fields_end, len(data), little)
    r.take(0, 8)
    fd = dict(fields)
    # Variants are unwrapped: check the types of the fields we act on.
    for code, kind in ((REPLY_SERIAL, int), (ERROR_NAME, str), (SIGNATURE, str)):
        if code in fd and not isinstance(fd[code], kind):
            raise ValueError(f"header field {code} is {fd[code]!r}, not {kind.__name__}")
    body = unmarshal(fd.get(SIGNATURE, ""), data, r.pos, little)
    return Message(type_, flags, serial, fd, body)


# --------------------------------------------------------------------------
# addresses and the connection


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS


def parse_address(address: str) -> list[tuple[str, dict[str, str]]]:
    """`transport:key=value,...;...` as (transport, {key: unescaped value}) pairs."""
    out = []
    for entry in address.split(";"):
        if not entry:
            continue
        transport, colon, rest = entry.partition(":")
        if not colon or not transport:
            raise ValueError(f"bus address {entry!r} has no transport (like unix:)")
        params = {}
        for pair in rest.split(",") if rest else []:
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise ValueError(f"bus address {entry!r}: {pair!r} is not key=value")
            params[key] = _unescape(value)
        out.append((transport, params))
    if not out:
        raise ValueError("empty bus address")
    return out


def _unescape(value: str) -> str:
    raw, i = bytearray(), 0
    while i < len(value):
        if value[i] == "%":
            hexpair = value[i + 1 : i + 3]
            if len(hexpair) != 2 or not all(h in "0123456789abcdefABCDEF" for h in hexpair):
                raise ValueError(f"bad %-escape in bus address value {value!r}")
            raw.append(int(hexpair, 16))
            i += 3
        else:
            raw += value[i].encode()
            i += 1
    return os.fsdecode(bytes(raw))


def _unix_target(params: dict[str, str]) -> bytes:
    if ("path" in params) == ("abstract" in params):
        raise ValueError("a unix: address needs exactly one of path= or abstract=")
    if "path" in params:
        return os.fsencode(params["path"])
    return b"\0" + os.fsencode(params["abstract"])


class Connection:
    """A blocking connection to a message bus; one call at a time."""

    def __init__(self, address: str | None = None, timeout: float = 25.0) -> None:
        """Connect to the first reachable entry of `address`, authenticate, say Hello."""
        address = address or system_bus_address()
        deadline = time.monotonic() + timeout
        errors = []
        self._sock: socket.socket | None = None
        for transport, params in parse_address(address):
            if transport != "unix":
                errors.append(f"transport {transport!r} is not supported (only unix:)")
                continue
            target = _unix_target(params)
            shown = params.get("path") or "@" + params["abstract"]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.connect(target)
            except OSError as exc:
                sock.close()
                errors.append(f"{shown}: {exc.strerror or exc}")
                continue
            self._sock = sock
            break
        if self._sock is None:
            raise ConnectionError("; ".join(errors))
        self._buf = bytearray()
        self._serial = 0
        try:
            self._authenticate(deadline)
            hello = self.call(
                "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                "Hello", timeout=max(deadline - time.monotonic(), 0.001),
            )  # fmt: skip
            if not hello or not isinstance(hello[0], str):
                raise ValueError(f"the bus answered Hello with {hello!r}")
            self.unique_name: str = hello[0]
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _authenticate(self, deadline: float) -> None:
        # EXTERNAL: the server checks our uid from SO_PEERCRED against this one.
        uid = str(os.geteuid()).encode().hex().encode()
        self._send(b"\0AUTH EXTERNAL " + uid + b"\r\n", deadline)
        while b"\r\n" not in self._buf:
            if len(self._buf) > 4096:
                raise ConnectionError("the bus sent an over-long authentication line")
            self._recv(deadline)
        line, _, rest = bytes(self._buf).partition(b"\r\n")
        if not line.startswith(b"OK "):
            said = line.decode(errors="replace")
            raise ConnectionError(f"the bus refused EXTERNAL authentication: {said!r}")
        self._buf[:] = rest
        self._send(b"BEGIN\r\n", deadline)

    def _send(self, data: bytes, deadline: float) -> None:
        sock = self._socket()
        sock.settimeout(self._remaining(deadline))
        sock.sendall(data)

    def _recv(self, deadline: float) -> None:
        sock = self._socket()
        sock.settimeout(self._remaining(deadline))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the bus closed the connection")
        self._buf += chunk

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionError("the bus connection is closed")
        return self._sock

    @staticmethod
    def _remaining(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def read_message(self, deadline: float) -> Message:
        """The next message, reading as much as it takes (partial or several per recv)."""
        while (total := message_length(self._buf)) is None or len(self._buf) < total:
            self._recv(deadline)
        data = bytes(self._buf[:total])
        del self._buf[:total]
        return decode_message(data)

    def call(
        self, destination: str, path: str, interface: str, member: str,
        signature: str = "", body: Sequence[Any] = (), timeout: float = 25.0,
    ) -> list[Any]:  # fmt: skip
        """Call a method and return its reply body; DBusError for an error reply."""
        deadline = time.monotonic() + timeout
        self._serial += 1
        serial = self._serial
        fields = {PATH: Variant("o", path), INTERFACE: Variant("s", interface),
                  MEMBER: Variant("s", member), DESTINATION: Variant("s", destination)}  # fmt: skip
        self._send(encode_message(METHOD_CALL, serial, fields, signature, body), deadline)
        while True:
            msg = self.read_message(deadline)
            # Signals (NameAcquired) and anything else are not ours: skip them.
            if msg.type in (METHOD_RETURN, ERROR) and msg.fields.get(REPLY_SERIAL) == serial:
                break
        if msg.type == ERROR:
            name = msg.fields.get(ERROR_NAME, "org.freedesktop.DBus.Error.Failed")
            sig = msg.fields.get(SIGNATURE, "")
            raise DBusError(name, msg.body[0] if sig.startswith("s") else name)
        return msg.body
