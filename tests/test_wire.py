"""qvmd.bus.wire, qvmctl's small blocking D-Bus client.

The wire format is checked both ways against dbus-fast (byte-identical
little-endian output; each side parses the other's messages in both byte
orders), malformed input must only ever raise ValueError, and the
connection is exercised against a scripted fake bus (partial reads,
signals, errors, timeouts) and, as root, the private dbus-daemon.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import dbus_fast
import pytest
from dbus_fast import Message as FastMessage
from dbus_fast import MessageType
from dbus_fast._private.marshaller import Marshaller
from dbus_fast._private.unmarshaller import Unmarshaller
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvmd.bus import wire
from qvmd.bus.wire import DBusError, Variant, decode_message, encode_message, marshal, unmarshal

ROOT = Path(__file__).resolve().parent.parent
BUS_DAEMON = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")

# --------------------------------------------------------------------------
# strategies: random valid signatures and matching values

INT_RANGES = {
    "y": (0, 2**8 - 1),
    "n": (-(2**15), 2**15 - 1),
    "q": (0, 2**16 - 1),
    "i": (-(2**31), 2**31 - 1),
    "u": (0, 2**32 - 1),
    "x": (-(2**63), 2**63 - 1),
    "t": (0, 2**64 - 1),
}
BASIC = "ybnqiuxtdsog"
basic_types = st.sampled_from(BASIC)
texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=8)
paths = st.lists(st.from_regex(r"[A-Za-z0-9_]{1,4}", fullmatch=True), max_size=3).map(
    lambda segs: "/" + "/".join(segs)
)


def complete_types(depth: int) -> st.SearchStrategy[str]:
    """One complete type nesting at most `depth` containers (no variants at depth 0)."""
    if depth == 0:
        return basic_types
    sub = complete_types(depth - 1)
    return st.one_of(
        basic_types,
        st.just("v"),
        sub.map(lambda t: "a" + t),
        st.tuples(basic_types, sub).map(lambda kv: "a{" + kv[0] + kv[1] + "}"),
        st.lists(sub, min_size=1, max_size=3).map(lambda ts: "(" + "".join(ts) + ")"),
    )


signatures = st.lists(complete_types(3), max_size=4).map("".join).filter(lambda s: len(s) < 200)


def values(t: str, budget: int = 2) -> st.SearchStrategy[Any]:
    """Values for complete type t; `budget` bounds variants inside variants."""
    c = t[0]
    if c in INT_RANGES:
        return st.integers(*INT_RANGES[c])
    if c == "b":
        return st.booleans()
    if c == "d":
        return st.floats(allow_nan=False)
    if c == "s":
        return texts
    if c == "o":
        return paths
    if c == "g":
        return st.lists(complete_types(2), max_size=3).map("".join)
    if c == "v":
        inner = complete_types(min(budget, 2))
        return inner.flatmap(lambda it: values(it, budget - 1).map(lambda v: Variant(it, v)))
    if c == "(":
        fields = [values(f, budget) for f in wire.split_signature(t[1:-1])]
        return st.tuples(*fields).flatmap(lambda v: st.sampled_from([list(v), v]))
    if t.startswith("a{"):
        return st.dictionaries(values(t[2], budget), values(t[3:-1], budget), max_size=3)
    return st.lists(values(t[1:], budget), max_size=3)


def sig_and_values() -> st.SearchStrategy[tuple[str, list[Any]]]:
    return signatures.flatmap(
        lambda s: st.tuples(
            st.just(s), st.tuples(*(values(t) for t in wire.split_signature(s))).map(list)
        )
    )


def plain(v: Any) -> Any:
    """What unmarshal returns for a value: variants unwrapped, structs as lists."""
    if isinstance(v, Variant | dbus_fast.Variant):
        return plain(v.value)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple | bytes):
        return [plain(x) for x in v]
    return v


def to_fast(t: str, v: Any) -> Any:
    """The same value of type t as dbus-fast wants it (its Variant, bytes for ay)."""
    if t == "v":
        return dbus_fast.Variant(v.signature, to_fast(v.signature, v.value))
    if t == "ay":
        return bytes(v)
    if t.startswith("a{"):
        return {k: to_fast(t[3:-1], x) for k, x in v.items()}
    if t[0] == "a":
        return [to_fast(t[1:], x) for x in v]
    if t[0] == "(":
        return [to_fast(ft, x) for ft, x in zip(wire.split_signature(t[1:-1]), v, strict=True)]
    return v


def to_fast_body(sig: str, vals: list[Any]) -> list[Any]:
    return [to_fast(t, v) for t, v in zip(wire.split_signature(sig), vals, strict=True)]


def fast_parse(data: bytes) -> FastMessage:
    msg = Unmarshaller(io.BytesIO(data)).unmarshall()  # type: ignore[arg-type]
    assert msg is not None
    return msg


HYPO = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------
# wire format


@HYPO
@given(sig_and_values())
def test_roundtrip_and_bytes_identical_to_dbus_fast(case: tuple[str, list[Any]]) -> None:
    sig, vals = case
    ours = marshal(sig, vals)
    assert ours == bytes(Marshaller(sig, to_fast_body(sig, vals)).marshall())
    assert unmarshal(sig, ours) == plain(vals)
    assert unmarshal(sig, marshal(sig, vals, little=False), little=False) == plain(vals)


@HYPO
@given(sig_and_values(), st.booleans(), st.integers(1, 2**32 - 1))
def test_messages_cross_parse_with_dbus_fast(
    case: tuple[str, list[Any]], little: bool, serial: int
) -> None:
    sig, vals = case
    fields = {
        wire.PATH: Variant("o", "/org/qvm/Net"),
        wire.INTERFACE: Variant("s", "org.qvm.Net"),
        wire.MEMBER: Variant("s", "CreateTap"),
        wire.DESTINATION: Variant("s", "org.qvm.Net"),
    }
    ours = encode_message(wire.METHOD_CALL, serial, fields, sig, vals, little=little)
    theirs = fast_parse(ours)
    assert (theirs.message_type, theirs.serial, theirs.signature) == (
        MessageType.METHOD_CALL,
        serial,
        sig,
    )
    assert (theirs.path, theirs.interface, theirs.member, theirs.destination) == (
        "/org/qvm/Net",
        "org.qvm.Net",
        "CreateTap",
        "org.qvm.Net",
    )
    assert plain(theirs.body) == plain(vals)
    # dbus-fast only writes little-endian; its reply parsed by us.
    reply = FastMessage(
        message_type=MessageType.METHOD_RETURN,
        reply_serial=serial,
        destination=":1.7",
        sender="org.qvm.Net",
        signature=sig,
        body=to_fast_body(sig, vals),
        serial=serial,
    )
    msg = decode_message(bytes(reply._marshall(False)))
    assert (msg.type, msg.serial, msg.fields[wire.REPLY_SERIAL]) == (2, serial, serial)
    assert msg.fields[wire.DESTINATION] == ":1.7"
    assert msg.body == plain(vals)


def test_alignment_by_hand() -> None:
    # An empty array of 8-aligned elements still pads to its element alignment.
    assert marshal("ax", [[]]) == bytes(8)
    assert marshal("yax", [1, []]) == b"\x01" + bytes(7)
    assert marshal("yat", [1, [2]]) == b"\x01\0\0\0\x08\0\0\0" + b"\x02" + bytes(7)
    assert marshal("ya(y)", [1, []]) == b"\x01" + bytes(7)
    assert marshal("ynb", [1, -2, True], little=False) == b"\x01\0\xff\xfe\0\0\0\x01"
    assert marshal("gs", ["ai", "ab"]) == b"\x02ai\0" + b"\x02\0\0\0ab\0"
    assert marshal("v", [Variant("q", 3)]) == b"\x01q\0\0\x03\0"
    # Offsets count from the start of the data: a value at offset 4 starting an 8-aligned type.
    assert unmarshal("x", bytes(4) + bytes(4) + b"\x05" + bytes(7), offset=4) == [5]
    assert unmarshal("a{sv}", marshal("a{sv}", [{"k": Variant("ay", b"\x01\x02")}])) == [
        {"k": [1, 2]}
    ]


@pytest.mark.parametrize(
    ("sig", "problem"),
    [
        ("a", "ends inside"),
        ("(", "ends inside"),
        ("(i", "ends inside"),
        ("()", "empty struct"),
        (")", "unexpected"),
        ("{sv}", "unexpected"),
        ("a{vs}", "basic type"),
        ("a{s}", "unexpected '}'"),
        ("a{sss}", "two types"),
        ("a{(i)s}", "basic type"),
        ("h", "unix fds"),
        ("z", "unexpected"),
        ("a" * 33 + "y", "arrays deeper"),
        ("(" * 33 + "y" + ")" * 33, "structs deeper"),
        ("a{sa{sa{s" * 11 + "y" + "}" * 33, "deeper"),
        ("y" * 256, "255"),
    ],
)
def test_invalid_signatures(sig: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        marshal(sig, [])
    with pytest.raises(ValueError, match=problem):
        unmarshal(sig, b"")


def test_deepest_valid_signatures() -> None:
    sig = "a" * 32 + "y"
    assert unmarshal(sig, marshal(sig, [[]])) == [[]]
    sig = "(" * 32 + "y" + ")" * 32
    value: Any = 7
    for _ in range(32):
        value = [value]
    assert unmarshal(sig, marshal(sig, [value])) == [value]


@pytest.mark.parametrize(
    ("sig", "vals", "exc", "names"),
    [
        ("y", [256], ValueError, "256"),
        ("n", [-(2**15) - 1], ValueError, "-32769"),
        ("u", [-1], ValueError, "-1"),
        ("t", ["1"], ValueError, "'1'"),
        ("b", [1], TypeError, "1"),
        ("d", ["x"], TypeError, "'x'"),
        ("s", [b"x"], TypeError, "b'x'"),
        ("s", ["a\0b"], ValueError, "NUL"),
        ("s", ["\udc80"], ValueError, "UTF-8"),
        ("o", ["a/b"], ValueError, "'a/b'"),
        ("o", ["/a/"], ValueError, "'/a/'"),
        ("o", ["/a-b"], ValueError, "'/a-b'"),
        ("g", ["a"], ValueError, "'a'"),
        ("v", [1], TypeError, "Variant"),
        ("v", [Variant("ii", 1)], ValueError, "single complete type"),
        ("(ii)", [[1]], TypeError, r"\[1\]"),
        ("a{sv}", [[1]], TypeError, "dict"),
        ("ai", [{1: 2}], TypeError, "list"),
        ("ai", [[1, "x"]], ValueError, "'x'"),
        ("ss", ["only one"], TypeError, "2 values"),
    ],
)
def test_values_must_match(sig: str, vals: list[Any], exc: type[Exception], names: str) -> None:
    with pytest.raises(exc, match=names):
        marshal(sig, vals)


def test_cyclic_value_is_a_value_error() -> None:
    cyclic: list[Any] = []
    cyclic.append(Variant("av", cyclic))
    with pytest.raises(ValueError, match="nest deeper"):
        marshal("av", [cyclic])


# --------------------------------------------------------------------------
# malformed input: ValueError only, never another exception, never a hang


def sample_messages() -> list[bytes]:
    body = ["qvm0tap1", {"multi_queue": Variant("b", True), "owner": Variant("u", 1000)}]
    fields = {wire.PATH: Variant("o", "/org/qvm/Net"), wire.MEMBER: Variant("s", "CreateTap")}
    reply = FastMessage(
        message_type=MessageType.ERROR,
        error_name="org.qvm.Net.Error.NotFound",
        reply_serial=3,
        signature="sa(yv)ad",
        body=["no such TAP", [[1, dbus_fast.Variant("as", ["a", "b"])]], [1.5]],
        serial=9,
    )
    return [
        encode_message(wire.METHOD_CALL, 3, fields, "sa{sv}", body),
        encode_message(wire.METHOD_CALL, 3, fields, "sa{sv}", body, little=False),
        encode_message(wire.SIGNAL, 1, fields),
        bytes(reply._marshall(False)),
    ]


def test_truncations_at_every_byte() -> None:
    for data in sample_messages():
        decode_message(data)
        for n in range(len(data)):
            with pytest.raises(ValueError):
                decode_message(data[:n])
            # A wrong length in the header itself, not just missing bytes.
            for cut in (n, len(data) - 8):
                cut_data = bytearray(data[:n])
                if n >= 8:
                    cut_data[4:8] = (max(0, cut - 16)).to_bytes(4, "little")
                with pytest.raises(ValueError):
                    decode_message(bytes(cut_data))


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(sample_messages()), st.data())
def test_byte_flips_raise_only_value_error(data: bytes, draw: st.DataObject) -> None:
    mutated = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        at = draw.draw(st.integers(0, len(data) - 1))
        mutated[at] = draw.draw(st.integers(0, 255))
    with contextlib.suppress(ValueError):
        decode_message(bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(sig_and_values(), st.data())
def test_random_body_corruption(case: tuple[str, list[Any]], draw: st.DataObject) -> None:
    sig, vals = case
    data = bytearray(marshal(sig, vals))
    if data:
        data[draw.draw(st.integers(0, len(data) - 1))] ^= draw.draw(st.integers(1, 255))
    data = data[: draw.draw(st.integers(0, len(data)))]
    with contextlib.suppress(ValueError):
        unmarshal(sig, bytes(data))


@pytest.mark.parametrize(
    ("sig", "data", "problem"),
    [
        ("ay", b"\xff\xff\xff\x7f", "exceeds"),
        ("ay", b"\x00\x00\x00\x04\x01", "past the end"),
        ("ai", b"\x03\x00\x00\x00\x01\x00\x00\x00", "past the end|crosses"),
        ("ai", b"\x02\x00\x00\x00\x01\x00\x00\x00", "crosses"),
        ("b", b"\x02\x00\x00\x00", "boolean"),
        ("s", b"\x01\x00\x00\x00a\x01", "NUL"),
        ("s", b"\x02\x00\x00\x00a\x00\x00", "NUL"),
        ("s", b"\x01\x00\x00\x00\xff\x00", "UTF-8"),
        ("o", b"\x01\x00\x00\x00a\x00", "object path"),
        ("g", b"\x01(\x00", "ends inside"),
        ("v", b"\x02ii\x00", "single complete type"),
        ("yu", b"\x01\x01\x00\x00\x00\x00\x00\x00", "padding"),
        ("y", b"\x01\x02", "left over"),
        ("x", b"\x01", "truncated"),
    ],
)
def test_malformed_values(sig: str, data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        unmarshal(sig, data)


def test_variant_bombs_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Variants nest without limit in the signature: the data-level bound stops them.
    with pytest.raises(ValueError, match="nests deeper"):
        unmarshal("v", b"\x01v\x00" * 100 + b"\x01y\x00\x07")
    # 32 arrays, a variant, 32 more arrays: each signature is valid, the whole is too deep.
    value: Any = [7]
    for _ in range(31):
        value = [value]
    deep: Any = [[Variant("a" * 32 + "y", value)]]
    for _ in range(30):
        deep = [deep]
    sig = "a" * 32 + "v"
    with pytest.raises(ValueError, match="nest deeper"):
        marshal(sig, [deep])
    monkeypatch.setattr(wire, "MAX_NESTING", 1000)
    data = marshal(sig, [deep])
    monkeypatch.undo()
    with pytest.raises(ValueError, match="nests deeper"):
        unmarshal(sig, data)
    # One array less: 64 containers is just within the bound.
    assert unmarshal(sig[1:], marshal(sig[1:], deep)) == plain(deep)


def test_bad_headers() -> None:
    good = sample_messages()[0]
    for at, byte, problem in [(0, b"x", "not a D-Bus message"), (3, b"\x02", "version")]:
        bad = good[:at] + byte + good[at + 1 :]
        with pytest.raises(ValueError, match=problem):
            decode_message(bad)
    huge = bytearray(good)
    huge[4:8] = (200 << 20).to_bytes(4, "little")
    with pytest.raises(ValueError, match="exceeds"):
        decode_message(bytes(huge))
    # Header field with the wrong type: REPLY_SERIAL as a string.
    wrong = encode_message(wire.ERROR, 1, {wire.REPLY_SERIAL: Variant("s", "1")})
    with pytest.raises(ValueError, match="header field 5"):
        decode_message(wrong)


# --------------------------------------------------------------------------
# addresses


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        (
            "unix:path=/run/dbus/system_bus_socket",
            [("unix", {"path": "/run/dbus/system_bus_socket"})],
        ),
        (
            "unix:path=/tmp/a%20b%2cc,guid=0123",
            [("unix", {"path": "/tmp/a b,c", "guid": "0123"})],
        ),
        ("unix:abstract=/tmp/dbus-X", [("unix", {"abstract": "/tmp/dbus-X"})]),
        (
            "tcp:host=localhost,port=1;unix:path=/x;",
            [("tcp", {"host": "localhost", "port": "1"}), ("unix", {"path": "/x"})],
        ),
        ("unix:path=%C3%A9", [("unix", {"path": "é"})]),
        ("unix:", [("unix", {})]),
    ],
)
def test_parse_address(address: str, parsed: list[tuple[str, dict[str, str]]]) -> None:
    assert wire.parse_address(address) == parsed


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("", "empty"),
        (";", "empty"),
        ("/run/dbus/system_bus_socket", "no transport"),
        ("unix:path", "key=value"),
        ("unix:path=%2", "escape"),
        ("unix:path=%zz", "escape"),
    ],
)
def test_bad_addresses(address: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        wire.parse_address(address)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("tcp:host=localhost,port=1", "transport 'tcp' is not supported"),
        ("unix:path=/nonexistent/qvmt-wire", "No such file"),
        ("unix:tmpdir=/tmp", "exactly one of path= or abstract="),
        ("unix:path=/a,abstract=b", "exactly one of path= or abstract="),
    ],
)
def test_unusable_addresses(address: str, problem: str) -> None:
    with pytest.raises((ConnectionError, ValueError), match=problem):
        wire.Connection(address, timeout=2)


def test_system_bus_address_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS", raising=False)
    assert wire.system_bus_address() == "unix:path=/run/dbus/system_bus_socket"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "")
    assert wire.system_bus_address() == "unix:path=/run/dbus/system_bus_socket"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/x")
    assert wire.system_bus_address() == "unix:path=/x"


# --------------------------------------------------------------------------
# the connection against a scripted fake bus


class FakeBus:
    """A one-connection server on a unix socket, run by `script(conn, reader)`."""

    def __init__(self, path: Path | None, script: Callable[[socket.socket, FakeBus], None]) -> None:
        """Listen on `path`, or on an abstract socket if None."""
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if path is None:
            name = f"qvmt-wire-{os.getpid()}-{id(self)}"
            self.listener.bind("\0" + name)
            self.address = f"unix:abstract={name}"
        else:
            self.listener.bind(str(path))
            # A space and a comma in the path: they must travel %-escaped.
            escaped = str(path).replace("%", "%25").replace(" ", "%20").replace(",", "%2c")
            self.address = f"unix:path={escaped},guid=0123456789abcdef0123456789abcdef"
        self.listener.settimeout(10)
        self.listener.listen(1)
        self.buf = b""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script: Callable[[socket.socket, FakeBus], None]) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                script(conn, self)
        except BaseException as exc:
            self.error = exc

    def line(self, conn: socket.socket) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = conn.recv(4096)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def message(self, conn: socket.socket) -> wire.Message:
        while (n := wire.message_length(self.buf)) is None or len(self.buf) < n:
            chunk = conn.recv(4096)
            if not chunk:
                raise EOFError
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return decode_message(data)

    def handshake(self, conn: socket.socket, expect_hello: bool = True) -> None:
        uid_hex = str(os.geteuid()).encode().hex()
        assert self.line(conn) == b"\0AUTH EXTERNAL " + uid_hex.encode()
        conn.sendall(b"OK 1234deadbeef1234deadbeef1234dead\r\n")
        assert self.line(conn) == b"BEGIN"
        if expect_hello:
            hello = self.message(conn)
            assert hello.fields[wire.MEMBER] == "Hello"
            conn.sendall(reply(hello.serial, "s", [":1.42"]))

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        if self.error is not None:
            raise self.error


def reply(serial: int, sig: str = "", body: list[Any] | None = None, little: bool = True) -> bytes:
    fields = {wire.REPLY_SERIAL: Variant("u", serial), wire.SENDER: Variant("s", "org.qvm.Net")}
    return encode_message(wire.METHOD_RETURN, 100 + serial, fields, sig, body or [], little=little)


def error(serial: int, name: str, sig: str = "", body: list[Any] | None = None) -> bytes:
    fields = {wire.REPLY_SERIAL: Variant("u", serial), wire.ERROR_NAME: Variant("s", name)}
    return encode_message(wire.ERROR, 200 + serial, fields, sig, body or [])


def signal(serial: int) -> bytes:
    fields = {
        wire.PATH: Variant("o", "/org/freedesktop/DBus"),
        wire.INTERFACE: Variant("s", "org.freedesktop.DBus"),
        wire.MEMBER: Variant("s", "NameAcquired"),
    }
    return encode_message(wire.SIGNAL, serial, fields, "s", [":1.42"])


class StartBus(Protocol):
    def __call__(
        self, script: Callable[[socket.socket, FakeBus], None], abstract: bool = False
    ) -> str: ...


@pytest.fixture
def fake_bus(tmp_path: Path) -> Iterator[StartBus]:
    buses: list[FakeBus] = []

    def start(script: Callable[[socket.socket, FakeBus], None], abstract: bool = False) -> str:
        buses.append(FakeBus(None if abstract else tmp_path / f"bus {len(buses)},x", script))
        return buses[-1].address

    yield start
    for bus in buses:
        bus.close()


def test_call_skips_signals_and_reads_partial_and_batched_messages(
    fake_bus: StartBus,
) -> None:
    def script(conn: socket.socket, bus: FakeBus) -> None:
        bus.handshake(conn)
        call = bus.message(conn)
        assert (call.fields[wire.DESTINATION], call.fields[wire.PATH]) == ("org.qvm.Net", "/a")
        assert (call.fields[wire.INTERFACE], call.fields[wire.MEMBER]) == ("org.qvm.Net", "M")
        assert call.fields[wire.SIGNATURE] == "sa{sv}"
        assert call.body == ["x", {"owner": 5}]
        assert call.serial == 2
        # Byte by byte: a signal, a reply to another serial, then ours (big-endian).
        for b in signal(1) + reply(99, "s", ["no"]):
            conn.sendall(bytes([b]))
        conn.sendall(reply(call.serial, "a{sv}i", [{"k": Variant("as", ["v"])}, 3], little=False))
        second = bus.message(conn)
        assert second.serial == 3 and wire.SIGNATURE not in second.fields
        # Several messages in one send, ours last.
        conn.sendall(signal(2) + signal(3) + reply(second.serial))

    address = fake_bus(script)
    with wire.Connection(address, timeout=10) as conn:
        assert conn.unique_name == ":1.42"
        body = {"owner": Variant("u", 5)}
        out = conn.call("org.qvm.Net", "/a", "org.qvm.Net", "M", "sa{sv}", ["x", body], 10)
        assert out == [{"k": ["v"]}, 3]
        assert conn.call("org.qvm.Net", "/a", "org.qvm.Net", "N", timeout=10) == []


def test_error_replies(fake_bus: StartBus) -> None:
    def script(conn: socket.socket, bus: FakeBus) -> None:
        bus.handshake(conn)
        first = bus.message(conn)
        conn.sendall(error(first.serial, "org.qvm.Net.Error.NotFound", "s", ["no such TAP"]))
        second = bus.message(conn)
        conn.sendall(error(second.serial, "org.qvm.Net.Error.Failed"))

    with wire.Connection(fake_bus(script), timeout=10) as conn:
        with pytest.raises(DBusError) as exc:
            conn.call("org.qvm.Net", "/", "org.qvm.Net", "A", timeout=10)
        assert (exc.value.name, exc.value.message) == ("org.qvm.Net.Error.NotFound", "no such TAP")
        with pytest.raises(DBusError) as exc:
            conn.call("org.qvm.Net", "/", "org.qvm.Net", "B", timeout=10)
        assert exc.value.message == "org.qvm.Net.Error.Failed"


def test_timeout_and_closed_connection(
    fake_bus: StartBus,
) -> None:
    done = threading.Event()

    def script(conn: socket.socket, bus: FakeBus) -> None:
        bus.handshake(conn)
        bus.message(conn)
        # Keep sending signals: the deadline must still hold.
        serial = 10
        while not done.wait(0.05):
            conn.sendall(signal(serial))
            serial += 1
        bus.message(conn)  # the second call: answer by hanging up

    with wire.Connection(fake_bus(script), timeout=10) as conn:
        with pytest.raises(TimeoutError):
            conn.call("org.qvm.Net", "/", "org.qvm.Net", "Slow", timeout=0.5)
        done.set()
        with pytest.raises(ConnectionError, match="closed the connection"):
            conn.call("org.qvm.Net", "/", "org.qvm.Net", "Again", timeout=10)


def test_rejected_auth(fake_bus: StartBus) -> None:
    def script(conn: socket.socket, bus: FakeBus) -> None:
        bus.line(conn)
        conn.sendall(b"REJECTED EXTERNAL\r\n")

    with pytest.raises(ConnectionError, match="REJECTED EXTERNAL"):
        wire.Connection(fake_bus(script), timeout=10)


def test_abstract_socket(fake_bus: StartBus) -> None:
    with wire.Connection(fake_bus(lambda conn, bus: bus.handshake(conn), abstract=True)) as conn:
        assert conn.unique_name == ":1.42"


def test_fallback_to_next_address(
    fake_bus: StartBus,
) -> None:
    address = fake_bus(lambda conn, bus: bus.handshake(conn))
    fallback = f"tcp:host=x,port=1;unix:path=/nonexistent/qvmt;{address}"
    with wire.Connection(fallback, timeout=10) as conn:
        assert conn.unique_name == ":1.42"


def test_garbage_from_the_bus_is_a_value_error(
    fake_bus: StartBus,
) -> None:
    def script(conn: socket.socket, bus: FakeBus) -> None:
        bus.handshake(conn, expect_hello=False)
        bus.message(conn)
        conn.sendall(b"G" * 64)

    with pytest.raises(ValueError, match="not a D-Bus message"):
        wire.Connection(fake_bus(script), timeout=10)


# --------------------------------------------------------------------------
# qvmctl stays fast


def test_qvmctl_imports_neither_dbus_fast_nor_asyncio() -> None:
    code = (
        "import sys, qvmd.cli, qvmd.bus.wire; "
        "assert 'dbus_fast' not in sys.modules and 'asyncio' not in sys.modules, "
        "sorted(m for m in sys.modules if 'dbus' in m or 'asyncio' in m)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr


def test_qvmctl_command_imports_neither(tmp_path: Path) -> None:
    # A whole command (failing to connect) must not pull them in either.
    code = (
        "import sys, qvmd.cli\n"
        f"rc = qvmd.cli.main(['--bus', 'unix:path={tmp_path}/none', 'tap', 'list'])\n"
        "assert rc == 1, rc\n"
        "assert 'dbus_fast' not in sys.modules and 'asyncio' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "qvmctl: cannot connect to the system bus:" in out.stderr


# --------------------------------------------------------------------------
# the real (private) bus daemon


def busctl(address: str, *args: str) -> str:
    out = subprocess.run(
        ["busctl", f"--address={address}", "--json=short", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


@pytest.mark.root
def test_against_the_bus_daemon(system_bus: str) -> None:
    import json

    with wire.Connection(system_bus, timeout=10) as conn:
        assert conn.unique_name.startswith(":1.")
        bus_id = conn.call(*BUS_DAEMON, "GetId", timeout=10)
        assert bus_id == json.loads(busctl(system_bus, "call", *BUS_DAEMON, "GetId"))["data"]
        names = conn.call(*BUS_DAEMON, "ListNames", timeout=10)[0]
        assert conn.unique_name in names and "org.freedesktop.DBus" in names
        theirs = json.loads(busctl(system_bus, "call", *BUS_DAEMON, "ListNames"))["data"][0]
        # Clients come and go; the well-known names must agree.
        assert {n for n in names if not n.startswith(":")} == {
            n for n in theirs if not n.startswith(":")
        }
        uid = conn.call(*BUS_DAEMON, "GetConnectionUnixUser", "s", [conn.unique_name], 10)
        assert uid == [os.geteuid()]
        busctl_uid = json.loads(
            busctl(system_bus, "call", *BUS_DAEMON, "GetConnectionUnixUser", "s", conn.unique_name)
        )["data"]
        assert uid == busctl_uid
        with pytest.raises(DBusError) as exc:
            conn.call("org.qvm.NoSuchName", "/", "org.qvm.Net", "Status", timeout=10)
        assert exc.value.name == "org.freedesktop.DBus.Error.ServiceUnknown"
        with pytest.raises(DBusError) as exc:
            conn.call(*BUS_DAEMON, "GetNameOwner", "s", ["org.qvm.NoSuchName"], 10)
        assert exc.value.name == "org.freedesktop.DBus.Error.NameHasNoOwner"
        assert "org.qvm.NoSuchName" in exc.value.message


@pytest.mark.root
def test_qvmctl_without_qvmd_says_not_running(system_bus: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-m", "qvmd.cli", "--bus", system_bus, "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 1
    assert out.stderr == "qvmctl: qvmd is not running (no org.qvm.Net on the system bus)\n"
