"""The bus-contract harness and the polkit/bus-daemon clients, on real components.

A private dbus-daemon with the project's bus policy, the real polkitd with the
project's actions and rules, and real users (a member of group qvm and an
outsider).  Each user's subject is that user's own bus connection: a small
client runs as the user, prints its unique name and keeps the connection open.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, RequestNameReply
from dbus_fast.aio import MessageBus

from qvmd.bus.busdaemon import connection_unix_user
from qvmd.bus.polkit import Authority
from qvmd.errors import Failed, QvmError
from tests import busenv

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (users, polkit files)"),
]

PY = sys.executable
POLKIT = "org.freedesktop.PolicyKit1"

# Runs as a test user: connect to "the system bus" (which must resolve to the
# private one through DBUS_SYSTEM_BUS_ADDRESS), print the unique name, keep
# the connection until stdin closes.
CLIENT = """
import asyncio, sys
from dbus_fast import BusType
from dbus_fast.aio import MessageBus
async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    print(bus.unique_name, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""

# Runs as a test user: try to own org.qvm.Net; print the reply or the error name.
OWN_NAME = """
import asyncio
from dbus_fast import BusType
from dbus_fast.aio import MessageBus
async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        print("reply", int(await bus.request_name("org.qvm.Net")))
    except Exception as e:
        print("error", getattr(e, "type", type(e).__name__))
asyncio.run(main())
"""

ACTIONS = [
    "org.qvm.Net.manage-taps",
    "org.qvm.Net.manage-forwards",
    "org.qvm.Net.issue-certificates",
    "org.qvm.Net.manage-lab",
]
USER_ACTIONS = {
    "org.qvm.Net.manage-taps",
    "org.qvm.Net.manage-forwards",
    "org.qvm.Net.issue-certificates",
}
# Reading is open without polkit (the daemon's PUBLIC methods): no action.
OPEN_ACTIONS: set[str] = set()

# The documented policy (docs/polkit.md).  root: polkitd itself authorizes
# uid 0 for every action (it special-cases root before looking at rules or
# defaults); the daemon's adapter treats uid 0 as admin explicitly anyway.
EXPECTED = {
    "root": set(ACTIONS),
    "member": USER_ACTIONS | OPEN_ACTIONS,
    "outsider": OPEN_ACTIONS,
}


@dataclass(frozen=True)
class Client:
    role: str
    uid: int
    pid: int
    unique_name: str


@pytest.fixture(scope="module")
def bus_address() -> Iterator[str]:
    with busenv.private_system_bus() as address:
        yield address


@pytest.fixture(scope="module")
def polkitd(bus_address: str) -> Iterator[busenv.Polkitd]:
    with busenv.polkitd_on(bus_address) as pk:
        yield pk


@pytest.fixture(scope="module")
def users() -> Iterator[busenv.TestUsers]:
    with busenv.test_users() as u:
        yield u


@pytest.fixture(scope="module")
def clients(bus_address: str, users: busenv.TestUsers) -> Iterator[dict[str, Client]]:
    procs = []
    try:
        out = {}
        for role, user in (("root", None), ("member", users.member), ("outsider", users.outsider)):
            proc = busenv.spawn_as(user, [PY, "-c", CLIENT], bus_address)
            procs.append(proc)
            name = busenv.first_line(proc)
            out[role] = Client(role, 0 if user is None else user.uid, proc.pid, name)
        yield out
    finally:
        for proc in procs:
            busenv.stop_process(proc)


async def _connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address).connect()


# ---------------------------------------------------------------------------
# the harness itself


def test_harness_undoes_everything_even_on_failure() -> None:
    """Runs first, before the module fixtures hold anything."""
    installed = [
        busenv.POLKIT_ACTIONS_DIR / busenv.OUR_POLKIT_POLICY.name,
        busenv.POLKIT_RULES_DIR / busenv.OUR_POLKIT_RULES.name,
    ]
    # Present before and not put there by the harness (a crashed run's
    # leftovers are the harness's and must go too).
    ours = set(busenv.shared_undo("polkit-files"))
    pre_existing = {p for p in installed if p.exists() and str(p) not in ours}
    qvm_pre_existing = _group_exists("qvm") and "created" not in busenv.shared_undo("group-qvm")
    made: list[tuple[Path, int, Path, list[str]]] = []
    with (
        pytest.raises(RuntimeError, match="boom"),
        busenv.private_system_bus() as address,
        busenv.polkitd_on(address) as pk,
        busenv.test_users() as users,
    ):
        sock = Path(address.removeprefix("unix:path=").split(",")[0])
        made.append((sock, pk.pid, pk.log_path, [users.member.name, users.outsider.name]))
        assert sock.exists()
        assert all(p.exists() for p in installed)
        assert _group_exists("qvm")
        raise RuntimeError("boom")
    ((sock, polkitd_pid, log_path, names),) = made
    assert not sock.parent.exists()
    assert not log_path.parent.exists()
    assert not Path(f"/proc/{polkitd_pid}").exists()
    for name in names:
        with pytest.raises(KeyError):
            pwd.getpwnam(name)
        assert not _group_exists(name)
    # Shared host files go only when no concurrent run still holds them.
    if not busenv.shared_holders("polkit-files"):
        for p in installed:
            assert p.exists() == (p in pre_existing)
    if not busenv.shared_holders("group-qvm"):
        assert _group_exists("qvm") == qvm_pre_existing


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_private_bus_is_separate_and_system_like(bus_address: str) -> None:
    """Our bus is not the host's, and it denies method calls by default."""
    assert f"/qvmt-bus-{os.getpid()}-" in bus_address
    assert "/run/dbus/system_bus_socket" not in bus_address

    async def main() -> None:
        bus = await _connect(bus_address)
        peer = await _connect(bus_address)
        try:
            # A method call to a connection no policy file opened is refused
            # by the bus (deny send_type="method_call"), even from root; a
            # permissive (session-like) bus would deliver it.
            reply = await asyncio.wait_for(
                bus.call(
                    Message(
                        destination=peer.unique_name,
                        path="/",
                        interface="org.example.I",
                        member="M",
                    )
                ),
                5,
            )
            assert reply.message_type is MessageType.ERROR
            assert reply.error_name == "org.freedesktop.DBus.Error.AccessDenied"
        finally:
            bus.disconnect()
            peer.disconnect()

    asyncio.run(main())


def test_polkitd_loaded_our_files_without_errors(polkitd: busenv.Polkitd, bus_address: str) -> None:
    assert polkitd.alive()
    assert (
        busenv.POLKIT_ACTIONS_DIR / "org.qvm.Net.policy"
    ).read_bytes() == busenv.OUR_POLKIT_POLICY.read_bytes()
    assert (
        busenv.POLKIT_RULES_DIR / "50-org.qvm.Net.rules"
    ).read_bytes() == busenv.OUR_POLKIT_RULES.read_bytes()
    # polkitd reports JS compile errors in rules in its (debug) output.
    log = polkitd.log()
    assert "Finished loading, compiling and executing" in log, log
    assert polkitd.errors() == [], log
    # pkaction talks to polkitd over "the system bus": the private one.
    out = subprocess.run(
        ["pkaction"],
        env=busenv.clean_env(bus_address),
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split()
    assert set(ACTIONS) <= set(out)


def test_users_are_real(users: busenv.TestUsers) -> None:
    assert pwd.getpwnam(users.member.name).pw_uid == users.member.uid
    assert pwd.getpwnam(users.outsider.name).pw_uid == users.outsider.uid
    members = grp.getgrnam("qvm").gr_mem
    assert users.member.name in members
    assert users.outsider.name not in members
    assert users.member.uid != 0 and users.outsider.uid != 0


def test_run_as_changes_identity(users: busenv.TestUsers, bus_address: str) -> None:
    r = busenv.run_as(users.member, ["id", "-u"], bus_address)
    assert r.returncode == 0 and int(r.stdout) == users.member.uid
    r = busenv.run_as(users.member, ["id", "-G"], bus_address)
    assert users.qvm_gid in {int(g) for g in r.stdout.split()}
    r = busenv.run_as(
        users.outsider,
        ["sh", "-c", "echo $DBUS_SYSTEM_BUS_ADDRESS; cat /proc/self/status"],
        bus_address,
    )
    first, status = r.stdout.split("\n", 1)
    assert first == bus_address
    # No capabilities left after the uid change.
    cap_eff = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    assert int(cap_eff.split()[1], 16) == 0


# ---------------------------------------------------------------------------
# the shipped bus policy


def test_root_may_own_org_qvm_net(bus_address: str) -> None:
    async def main() -> None:
        bus = await _connect(bus_address)
        try:
            reply = await bus.request_name("org.qvm.Net")
            assert reply is RequestNameReply.PRIMARY_OWNER
            await bus.release_name("org.qvm.Net")
        finally:
            bus.disconnect()

    asyncio.run(main())


@pytest.mark.parametrize("role", ["member", "outsider"])
def test_users_may_not_own_org_qvm_net(
    role: str, users: busenv.TestUsers, bus_address: str
) -> None:
    user = users.member if role == "member" else users.outsider
    r = busenv.run_as(user, [PY, "-c", OWN_NAME], bus_address)
    assert r.stdout.strip() == "error org.freedesktop.DBus.Error.AccessDenied", r.stderr


def _serve_check(bus: MessageBus, authority: Authority, tasks: set[asyncio.Task[None]]) -> None:
    """A tiny stand-in for qvmd: org.qvm.Net.Check(s action) -> (u uid, b authorized).

    Answers from the real sender's identity, the way the daemon's adapter must.
    """

    async def answer(msg: Message) -> None:
        assert msg.sender is not None
        try:
            uid = await connection_unix_user(bus, msg.sender)
            ok = await authority.check(msg.sender, msg.body[0])
            await bus.send(Message.new_method_return(msg, "ub", [uid, ok]))
        except QvmError as e:
            await bus.send(Message.new_error(msg, e.dbus_name, str(e)))

    def handler(msg: Message) -> bool | None:
        if (
            msg.message_type is MessageType.METHOD_CALL
            and msg.path == "/org/qvm/Net"
            and msg.interface == "org.qvm.Net"
            and msg.member == "Check"
            and msg.signature == "s"
        ):
            task = asyncio.get_running_loop().create_task(answer(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return True
        return None

    bus.add_message_handler(handler)


def test_anyone_may_call_the_service_and_polkit_sees_the_real_caller(
    bus_address: str, polkitd: busenv.Polkitd, users: busenv.TestUsers
) -> None:
    """busctl as each user -> test service -> polkit subject = that busctl's connection."""

    async def main() -> None:
        bus = await _connect(bus_address)
        tasks: set[asyncio.Task[None]] = set()
        try:
            _serve_check(bus, Authority(bus), tasks)
            assert await bus.request_name("org.qvm.Net") is RequestNameReply.PRIMARY_OWNER
            for role, user in (("member", users.member), ("outsider", users.outsider)):
                for action in ("org.qvm.Net.manage-taps", "org.qvm.Net.manage-lab"):
                    proc = await asyncio.create_subprocess_exec(
                        *busenv.as_user_argv(
                            user,
                            [
                                "busctl",
                                "--system",
                                "call",
                                "org.qvm.Net",
                                "/org/qvm/Net",
                                "org.qvm.Net",
                                "Check",
                                "s",
                                action,
                            ],
                        ),
                        env=busenv.clean_env(bus_address),
                        cwd="/",
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                    )
                    out, err = await asyncio.wait_for(proc.communicate(), 20)
                    assert proc.returncode == 0, err
                    allowed = action in EXPECTED[role]
                    assert out.decode().split() == ["ub", str(user.uid), str(allowed).lower()]
            # An interface the policy does not open is refused by the bus itself.
            proc = await asyncio.create_subprocess_exec(
                *busenv.as_user_argv(
                    users.outsider,
                    [
                        "busctl",
                        "--system",
                        "call",
                        "org.qvm.Net",
                        "/org/qvm/Net",
                        "org.qvm.Other",
                        "Check",
                        "s",
                        "x",
                    ],
                ),
                env=busenv.clean_env(bus_address),
                cwd="/",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode != 0
            assert b"Access denied" in err or b"AccessDenied" in err, err
        finally:
            bus.disconnect()
            for t in tasks:
                t.cancel()

    asyncio.run(main())


# ---------------------------------------------------------------------------
# polkit client: the matrix


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("role", ["root", "member", "outsider"])
def test_check_matrix(
    role: str, action: str, bus_address: str, polkitd: busenv.Polkitd, clients: dict[str, Client]
) -> None:
    client = clients[role]

    async def main() -> None:
        bus = await _connect(bus_address)
        try:
            authority = Authority(bus)
            result = await authority.check_result(client.unique_name, action)
            assert result.authorized == (action in EXPECTED[role])
            assert await authority.check(client.unique_name, action) == result.authorized
            if not result.authorized:
                # Denied only because nobody can authenticate: no session and
                # no agent here, so auth_admin (allow_any) is a challenge.
                assert result.challenge
        finally:
            bus.disconnect()

    asyncio.run(main())


def test_group_membership_comes_from_the_group_database(
    bus_address: str, polkitd: busenv.Polkitd, users: busenv.TestUsers
) -> None:
    """A member whose process lacks the qvm gid (added to the group after
    logging in) is still granted: polkit reads /etc/group at check time, so no
    new login is needed for the D-Bus API.  Interaction without an agent is a
    quick "no", never a hang."""
    m = users.member
    argv = ["setpriv", f"--reuid={m.uid}", f"--regid={m.gid}", "--clear-groups", PY, "-c", CLIENT]
    proc = subprocess.Popen(
        argv,
        env=busenv.clean_env(bus_address),
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        name = busenv.first_line(proc)
        groups = Path(f"/proc/{proc.pid}/status").read_text().split("Groups:")[1].split("\n")[0]
        assert str(users.qvm_gid) not in groups.split()

        async def main() -> None:
            bus = await _connect(bus_address)
            try:
                authority = Authority(bus)
                assert await authority.check(name, "org.qvm.Net.manage-taps")
                t0 = time.monotonic()
                result = await authority.check_result(name, "org.qvm.Net.manage-lab", True)
                assert not result.authorized and result.challenge
                assert time.monotonic() - t0 < 2
            finally:
                bus.disconnect()

        asyncio.run(main())
    finally:
        busenv.stop_process(proc)


def test_connection_identity(bus_address: str, clients: dict[str, Client]) -> None:
    async def main() -> None:
        bus = await _connect(bus_address)
        try:
            for client in clients.values():
                assert await connection_unix_user(bus, client.unique_name) == client.uid
            with pytest.raises(Failed):
                await connection_unix_user(bus, ":1.999999")  # nobody
        finally:
            bus.disconnect()

    asyncio.run(main())


def test_subject_gone_is_not_authorized(bus_address: str, polkitd: busenv.Polkitd) -> None:
    """A sender that disconnected before the check can never be authorized."""

    async def main() -> None:
        bus = await _connect(bus_address)
        try:
            with pytest.raises(Failed):
                await Authority(bus).check(":1.999999", "org.qvm.Net.manage-taps")
        finally:
            bus.disconnect()

    asyncio.run(main())


def test_unknown_action_is_failed_not_denied_nor_allowed(
    bus_address: str, polkitd: busenv.Polkitd, clients: dict[str, Client]
) -> None:
    """polkit answers an unregistered action (policy file not installed) with an
    error: that is a deployment fault, reported as Failed, never a yes."""

    async def main() -> None:
        bus = await _connect(bus_address)
        try:
            authority = Authority(bus)
            for role in ("root", "member"):
                with pytest.raises(Failed) as info:
                    await authority.check(clients[role].unique_name, "org.qvm.Net.no-such-action")
                assert "not registered" in getattr(info.value, "detail", "")
        finally:
            bus.disconnect()

    asyncio.run(main())


def test_check_latency(
    bus_address: str, polkitd: busenv.Polkitd, clients: dict[str, Client]
) -> None:
    """Median CheckAuthorization round trip (member, manage-taps: runs the JS rule)."""

    async def main() -> list[float]:
        bus = await _connect(bus_address)
        try:
            authority = Authority(bus)
            times = []
            for _ in range(60):
                t0 = time.perf_counter()
                assert await authority.check(
                    clients["member"].unique_name, "org.qvm.Net.manage-taps"
                )
                times.append(time.perf_counter() - t0)
            return times
        finally:
            bus.disconnect()

    times = asyncio.run(main())
    median = statistics.median(times)
    print(
        f"\nCheckAuthorization median {median * 1e3:.2f} ms,"
        f" max {max(times) * 1e3:.2f} ms (n={len(times)})"
    )
    assert median < 0.5  # generous: it is a local round trip


def test_polkitd_logged_no_errors(polkitd: busenv.Polkitd) -> None:
    """After the matrix ran: no rule raised a JS error at check time."""
    assert polkitd.alive()
    # The unknown-action test provokes exactly these; anything else is a fault.
    errors = [e for e in polkitd.errors() if "'org.qvm.Net.no-such-action'" not in e]
    assert errors == [], polkitd.log()


# ---------------------------------------------------------------------------
# failure is never permission


def test_no_polkitd_means_failed() -> None:
    with busenv.private_system_bus() as address:

        async def main() -> None:
            bus = await _connect(address)
            try:
                t0 = time.monotonic()
                with pytest.raises(Failed, match="authorization service unavailable"):
                    await Authority(bus, timeout=5).check(
                        bus.unique_name or "", "org.qvm.Net.manage-taps"
                    )
                assert time.monotonic() - t0 < 2  # an error reply, not a timeout
            finally:
                bus.disconnect()

        asyncio.run(main())


def test_hung_polkitd_times_out(tmp_path: Path) -> None:
    """A "polkitd" that never answers: Failed after the timeout, and no reply handler kept."""
    squat = tmp_path / "squat-polkit.conf"
    squat.write_text(
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"\n'
        ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
        '<busconfig><policy user="root">'
        '<allow own="org.freedesktop.PolicyKit1"/>'
        '<allow send_destination="org.freedesktop.PolicyKit1"/>'
        "</policy></busconfig>\n"
    )
    with busenv.private_system_bus([busenv.OUR_BUS_POLICY, squat]) as address:

        async def main() -> None:
            hung = await _connect(address)
            client = await _connect(address)
            try:
                seen: list[Message] = []

                def swallow(msg: Message) -> bool | None:
                    if (
                        msg.message_type is MessageType.METHOD_CALL
                        and msg.member == "CheckAuthorization"
                    ):
                        seen.append(msg)
                        return True  # handled, never answered
                    return None

                hung.add_message_handler(swallow)
                assert await hung.request_name(POLKIT) is RequestNameReply.PRIMARY_OWNER
                before = len(client._method_return_handlers)
                t0 = time.monotonic()
                with pytest.raises(Failed, match="authorization service unavailable"):
                    await Authority(client, timeout=0.3).check(
                        client.unique_name or "", "org.qvm.Net.manage-lab"
                    )
                elapsed = time.monotonic() - t0
                assert 0.25 < elapsed < 2
                assert len(seen) == 1
                assert len(client._method_return_handlers) == before
            finally:
                hung.disconnect()
                client.disconnect()

        asyncio.run(main())
