"""Hypothesis-generated bad arguments over the real bus: every one is
refused with InvalidArgument (or NotFound for a well-formed name of no
guest), nothing outside the lab's names appears, and the daemon serves on.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import busenv
from tests.netns import nsrun
from tests.qvmd_proc import Qvmd, qvmd_sandbox

pytestmark = pytest.mark.root

LAB_TAP = "qvm0tap"


@pytest.fixture(scope="module")
def lab(system_bus: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qvmd]:
    with qvmd_sandbox(tmp_path_factory.mktemp("fuzz"), bus=system_bus) as q:
        q.start(env=busenv.clean_env(system_bus))
        q.wait_ready()
        yield q


@pytest.fixture(scope="module")
def client(lab: Qvmd, system_bus: str) -> Iterator[tuple[asyncio.AbstractEventLoop, MessageBus]]:
    loop = asyncio.new_event_loop()

    async def connect() -> MessageBus:
        return await MessageBus(bus_address=system_bus, bus_type=BusType.SYSTEM).connect()

    bus = loop.run_until_complete(connect())
    try:
        yield loop, bus
    finally:
        bus.disconnect()
        loop.close()


def call(
    client: tuple[asyncio.AbstractEventLoop, MessageBus], member: str, sig: str, body: list[Any]
) -> Message:
    loop, bus = client
    msg = Message(
        destination="org.qvm.Net",
        path="/org/qvm/Net",
        interface="org.qvm.Net",
        member=member,
        signature=sig,
        body=body,
    )
    reply = loop.run_until_complete(asyncio.wait_for(bus.call(msg), 30))
    assert reply is not None
    return reply


def links(q: Qvmd) -> set[str]:
    return {link["ifname"] for link in json.loads(nsrun(q.netns, "ip", "-j", "link").stdout)}


def is_valid_lab_tap(name: str) -> bool:
    rest = name[len(LAB_TAP) :] if name.startswith(LAB_TAP) else ""
    return (
        rest.isdigit()
        and rest.isascii()
        and (rest == "0" or not rest.startswith("0"))
        and len(name.encode()) <= 15
    )


bad_names = st.one_of(
    st.sampled_from(
        [
            "eth0",
            "lo",
            "../x",
            "",
            "qvm0",
            "qvm0-svc",
            "veth0",
            "qvm0tap",
            "qvm0tap01",
            "qvm0tap-1",
            "qvm0tap1 ",
            "qvm0tap\u0661",  # an Arabic-Indic digit one
            "QVM0TAP1",
            "x" * 16,
        ]
    ),
    st.text(
        alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]),
        max_size=40,
    ),
    st.text(alphabet=string.ascii_letters + string.digits + "/:.-_ \t", max_size=20),
)

# D-Bus strings cannot hold NUL (the marshaller and the bus daemon both
# refuse them), so NUL never reaches qvmd; the strategies leave it out.
text = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]))
option_values = st.one_of(
    st.builds(lambda s: Variant("s", s), text.filter(lambda t: len(t) <= 8)),
    st.builds(lambda i: Variant("i", i), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda i: Variant("x", i), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda b: Variant("as", b), st.lists(text.filter(lambda t: len(t) <= 4), max_size=3)),
)
bad_options = st.one_of(
    st.dictionaries(
        text.filter(lambda k: len(k) <= 12 and k not in ("multi_queue", "owner", "group")),
        option_values,
        min_size=1,
        max_size=40,
    ),
    st.fixed_dictionaries({"multi_queue": option_values}),
    st.fixed_dictionaries({"owner": option_values}),
    st.dictionaries(
        text.filter(lambda k: 1 <= len(k) <= 8), option_values, min_size=17, max_size=60
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=bad_names)
def test_bad_tap_names(lab: Qvmd, client: Any, name: str) -> None:
    if is_valid_lab_tap(name):
        return
    before = links(lab)
    for member, sig, body in (("CreateTap", "sa{sv}", [name, {}]), ("DeleteTap", "s", [name])):
        reply = call(client, member, sig, body)
        assert reply.message_type is MessageType.ERROR, (member, name)
        assert reply.error_name == "org.qvm.Net.Error.InvalidArgument", (member, name, reply.body)
    assert links(lab) == before


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(options=bad_options)
def test_bad_options(lab: Qvmd, client: Any, options: dict[str, Variant]) -> None:
    before = links(lab)
    reply = call(client, "CreateTap", "sa{sv}", ["qvm0tap77", options])
    assert reply.message_type is MessageType.ERROR, options
    assert reply.error_name == "org.qvm.Net.Error.InvalidArgument", (options, reply.body)
    assert links(lab) == before


def test_still_serving_after_the_fuzz(lab: Qvmd, client: Any) -> None:
    reply = call(client, "Status", "", [])
    assert reply.message_type is MessageType.METHOD_RETURN
    assert lab.proc is not None and lab.proc.poll() is None
    assert "Traceback" not in lab.output()
