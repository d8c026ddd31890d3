"""Back-pressure: floods of calls, and a send buffer that fills up.

dbus-fast (like dbus-next, issue #153) treated EAGAIN on a full socket as a
dead connection; qvmd wraps the socket (bus/service.py) and bounds the work
in flight per caller. These tests fail without either.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from qvmd.bus.service import install_backpressure
from tests import busenv
from tests.qvmd_proc import Qvmd, qvmd_sandbox

pytestmark = pytest.mark.root

FLOOD_CLIENT = str(Path(__file__).parent / "helpers" / "flood_client.py")


@pytest.fixture(scope="module")
def lab(
    system_bus: str,
    polkitd_running: busenv.Polkitd,
    bus_users: busenv.TestUsers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Qvmd]:
    with qvmd_sandbox(tmp_path_factory.mktemp("flood"), bus=system_bus) as q:
        q.start(env=busenv.clean_env(system_bus))
        q.wait_ready()
        yield q
        print(q.output()[-5000:])


def test_flood_from_unprivileged_clients(
    lab: Qvmd, system_bus: str, bus_users: busenv.TestUsers
) -> None:
    clients = [
        busenv.spawn_as(bus_users.member, [sys.executable, FLOOD_CLIENT, "400"], system_bus)
        for _ in range(8)
    ]
    totals: dict[str, int] = {}
    try:
        for proc in clients:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err.decode()[-2000:]
            for key, n in json.loads(out.decode()).items():
                totals[key] = totals.get(key, 0) + n
    finally:
        for proc in clients:
            busenv.stop_process(proc)
    print("flood results:", totals)
    assert sum(totals.values()) == 8 * 400
    # Every call got an answer: refused as invalid, as busy (over qvmd's
    # per-connection bound), or by the bus daemon itself (its limit of
    # pending replies per connection, 128 on a system bus). Nothing timed
    # out, nothing was created.
    allowed = {
        "org.qvm.Net.Error.InvalidArgument",
        "org.qvm.Net.Error.Busy",
        "org.freedesktop.DBus.Error.LimitsExceeded",
    }
    assert set(totals) <= allowed, totals
    assert totals.get("org.qvm.Net.Error.InvalidArgument", 0) > 0
    # The daemon is alive, still owns its name and serves.
    assert lab.proc is not None and lab.proc.poll() is None
    assert busenv.name_has_owner(system_bus, "org.qvm.Net")
    status = subprocess.run(
        [sys.executable, "-m", "qvmd.cli", "status"],
        env=busenv.clean_env(system_bus),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr


def test_full_send_buffer_waits_instead_of_disconnecting(system_bus: str) -> None:
    """Many large signals through a tiny send buffer all arrive."""

    async def scenario() -> int:
        sender = await MessageBus(bus_address=system_bus, bus_type=BusType.SYSTEM).connect()
        receiver = await MessageBus(bus_address=system_bus, bus_type=BusType.SYSTEM).connect()
        install_backpressure(sender)
        sender._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[union-attr]
        got = 0
        done = asyncio.Event()
        count = 300

        def on_msg(msg: Message) -> bool:
            nonlocal got
            if msg.message_type is MessageType.SIGNAL and msg.member == "Blob":
                got += 1
                if got == count:
                    done.set()
            return False

        receiver.add_message_handler(on_msg)
        await receiver.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[f"type='signal',sender='{sender.unique_name}',member='Blob'"],
            )
        )
        payload = "x" * 60000
        for _ in range(count):
            sender.send(Message.new_signal("/t", "org.qvmtest.Flood", "Blob", "s", [payload]))
        await asyncio.wait_for(done.wait(), 60)
        assert sender.connected
        sender.disconnect()
        receiver.disconnect()
        return got

    assert asyncio.run(scenario()) == 300
