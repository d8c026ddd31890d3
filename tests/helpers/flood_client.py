"""One flooding client: N concurrent CreateTap calls with 1 KB names.

Prints one JSON line: counts of replies by error name (or "ok"), and how
many calls got no answer at all (which must be zero).
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from qvmd.bus.service import install_backpressure


async def main(calls: int) -> None:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    # Without this the *client* dies first: 400 KB of calls fill its socket
    # and dbus-fast takes EAGAIN for a dead connection (the bug qvmd guards).
    install_backpressure(bus)
    name = "qvm0tap" + "9" * 1017  # 1 KB: far over the kernel's 15 bytes

    async def one() -> str:
        msg = Message(
            destination="org.qvm.Net",
            path="/org/qvm/Net",
            interface="org.qvm.Net",
            member="CreateTap",
            signature="sa{sv}",
            body=[name, {}],
        )
        try:
            reply = await asyncio.wait_for(bus.call(msg), 60)
        except TimeoutError:
            return "timeout"
        assert reply is not None
        return "ok" if reply.message_type is MessageType.METHOD_RETURN else str(reply.error_name)

    results = await asyncio.gather(*(one() for _ in range(calls)))
    print(json.dumps(collections.Counter(results)), flush=True)
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
