"""A long-lived org.qvm.Net client for the bench, run as the user being measured.

Prints "ready" once connected, then answers one command per stdin line with
one JSON line (times in ms, measured around the method call alone):
  cycle NAME N IDLEPID N x (CreateTap NAME timed, DeleteTap NAME untimed); with
                       IDLEPID > 0, waits before each create until that process
                       (qvmd) is idle, so each create is isolated, as a user's is
  bulk PREFIX FIRST COUNT OWNER SECONDS
                       CreateTap PREFIX<FIRST..> for uid OWNER; stops after SECONDS
  cycles NAME N SECONDS MIN IDLEPID  like cycle, but stops after SECONDS
                       (at least MIN cycles)
  delete NAME          DeleteTap NAME (timed)
  polkit ACTION N      N x polkit CheckAuthorization of ACTION for this very
                       connection (what qvmd asks before a guarded method)
Errors come back as {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus


class CallFailed(Exception):
    pass


async def call(bus: MessageBus, member: str, signature: str, body: list[Any]) -> float:
    msg = Message(
        destination="org.qvm.Net",
        path="/org/qvm/Net",
        interface="org.qvm.Net",
        member=member,
        signature=signature,
        body=body,
    )
    t0 = time.perf_counter()
    reply = await asyncio.wait_for(bus.call(msg), 60)
    elapsed = (time.perf_counter() - t0) * 1000
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise CallFailed(f"{member} {body[:1]}: {reply.error_name}: {reply.body}")
    return elapsed


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def wait_idle(pid: int, quiet: float = 0.06, limit: float = 10.0) -> None:
    """Until `pid` used no CPU for `quiet` seconds (the healer's passes after
    the previous delete are over); at most `limit` seconds."""
    if pid <= 0:
        return
    deadline = time.monotonic() + limit
    last, since = cpu_ticks(pid), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        now = cpu_ticks(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


async def handle(bus: MessageBus, words: list[str]) -> Any:
    cmd = words[0]
    if cmd == "cycle":
        name, n, idle = words[1], int(words[2]), int(words[3])
        creates, deletes = [], []
        for _ in range(n):
            await wait_idle(idle)
            creates.append(await call(bus, "CreateTap", "sa{sv}", [name, {}]))
            deletes.append(await call(bus, "DeleteTap", "s", [name]))
        return {"create": creates, "delete": deletes}
    if cmd == "cycles":
        name, n, seconds, least = words[1], int(words[2]), float(words[3]), int(words[4])
        idle = int(words[5])
        deadline = time.monotonic() + seconds
        creates, deletes = [], []
        while len(creates) < n and (len(creates) < least or time.monotonic() < deadline):
            await wait_idle(idle)
            creates.append(await call(bus, "CreateTap", "sa{sv}", [name, {}]))
            deletes.append(await call(bus, "DeleteTap", "s", [name]))
        return {"create": creates, "delete": deletes}
    if cmd == "bulk":
        prefix, first, count, owner = words[1], int(words[2]), int(words[3]), int(words[4])
        deadline = time.monotonic() + float(words[5])
        opts = {"owner": Variant("u", owner)}
        out = []
        for i in range(first, first + count):
            if time.monotonic() > deadline:
                break
            out.append(await call(bus, "CreateTap", "sa{sv}", [f"{prefix}{i}", opts]))
        return out
    if cmd == "polkit":
        # The same client qvmd uses, asking about this very connection.
        from qvmd.bus.polkit import Authority

        authority, action, n = Authority(bus), words[1], int(words[2])
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            allowed = await authority.check(bus.unique_name or "", action)
            times.append((time.perf_counter() - t0) * 1000)
            if not allowed:
                raise CallFailed(f"polkit says no to {action}")
        return times
    if cmd == "delete":
        return await call(bus, "DeleteTap", "s", [words[1]])
    raise CallFailed(f"unknown command {cmd!r}")


async def main() -> None:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        words = line.split()
        if not words:
            continue
        try:
            result = await handle(bus, words)
        except (CallFailed, TimeoutError) as exc:
            result = {"error": str(exc) or type(exc).__name__}
        print(json.dumps(result), flush=True)
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
