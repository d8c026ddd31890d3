"""The metadata server in real namespaces, asked by curl from "guests".

Topology (all namespaces made here, removed even on failure):

    host ns:  bridge br0 ── s0 ═ veth0 (services ns, 10.42.0.2/24)
                        └─ g<N> ═ eth0 (one ns per guest: its MAC and IP)

The server opens its socket inside the services namespace itself (a thread
does setns) and runs on an event loop in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Coroutine, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import yaml

from qvmd.errors import Failed
from qvmd.metadata.documents import UserDataOptions
from qvmd.metadata.server import Limits, MetadataServer, PkiDocumentSource, parse_arp
from qvmd.model import Lab, default_lab
from qvmd.pki.store import LabPki
from tests.netns import delete_netns, netns, nsrun, run, unique_name

pytestmark = pytest.mark.root

BASE = "http://10.42.0.2/nocloud/"


class LabNet:
    """A bridge in a host namespace, the services end, and guest namespaces."""

    def __init__(self, host: str, services: str) -> None:
        self.host = host
        self.services = services
        self.guests: list[str] = []
        self._ports = 0

    def add_guest(self, mac: str, ip: str) -> str:
        name = unique_name("g")
        run(["ip", "netns", "add", name])
        self.guests.append(name)
        port = f"g{self._ports}"
        self._ports += 1
        run(["ip", "-n", self.host, "link", "add", port, "type", "veth", "peer", "name", "eth0"])
        run(["ip", "-n", self.host, "link", "set", "eth0", "netns", name])
        run(["ip", "-n", self.host, "link", "set", port, "master", "br0", "up"])
        nsrun(name, "ip", "link", "set", "lo", "up")
        nsrun(name, "ip", "link", "set", "eth0", "address", mac)
        nsrun(name, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        nsrun(name, "ip", "link", "set", "eth0", "up")
        return name

    def close(self) -> None:
        for name in self.guests:
            delete_netns(name)


@contextlib.contextmanager
def lab_net() -> Iterator[LabNet]:
    with netns("h") as host, netns("s") as services:
        nsrun(host, "ip", "link", "add", "br0", "type", "bridge")
        nsrun(host, "ip", "link", "set", "br0", "up")
        run(["ip", "-n", host, "link", "add", "s0", "type", "veth", "peer", "name", "veth0"])
        run(["ip", "-n", host, "link", "set", "veth0", "netns", services])
        nsrun(host, "ip", "link", "set", "s0", "master", "br0", "up")
        nsrun(services, "ip", "addr", "add", "10.42.0.2/24", "dev", "veth0")
        nsrun(services, "ip", "link", "set", "veth0", "up")
        net = LabNet(host, services)
        try:
            yield net
        finally:
            net.close()


def lab_in(services_ns: str) -> Lab:
    lab = default_lab()
    return dataclasses.replace(lab, services=dataclasses.replace(lab.services, netns=services_ns))


class ServerThread:
    """Runs a MetadataServer on an event loop of its own thread."""

    def __init__(self, server: MetadataServer) -> None:
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        await self._stop.wait()
        await self.server.stop()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._started.wait(10), "metadata server did not start"
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine on the server's loop and wait for it."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "metadata server thread did not stop"


def curl(ns: str, path: str, *extra: str) -> tuple[int, str]:
    """(HTTP status, body) of a request from namespace `ns`."""
    out = nsrun(
        ns,
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        *extra,
        BASE + path,
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with lab_net() as net:
        lab = lab_in(net.services)
        pki = LabPki(tmp_path / "state", lab)
        pki.ensure()
        source = PkiDocumentSource(pki, UserDataOptions(disable_firewalld=True))
        server = MetadataServer(lab, source, limits=Limits(head_timeout=1.0, max_headers=8))
        with ServerThread(server) as thread:
            yield net, server, pki, thread


Served = tuple[LabNet, MetadataServer, LabPki, ServerThread]


def files_of(user_data: str) -> dict[str, str]:
    assert user_data.startswith("#cloud-config\n")
    config: dict[str, Any] = yaml.safe_load(user_data)
    return {f["path"]: f["content"] for f in config["write_files"]}


def test_a_guest_gets_its_own_documents(
    served: Served,
) -> None:
    net, server, pki, _ = served
    cp = net.add_guest("52:54:0a:2a:00:0a", "10.42.0.10")
    status, body = curl(cp, "meta-data")
    assert status == 200, body
    assert yaml.safe_load(body) == {"instance-id": "qvm-cp.qvm0.lan", "local-hostname": "cp"}
    status, body = curl(cp, "user-data")
    assert status == 200
    files = files_of(body)
    issued = pki.issue("cp")
    assert files["/root/cert/cert.pem"].encode() == issued.cert_pem
    assert files["/root/cert/key.pem"].encode() == issued.key_pem
    assert files["/root/cert/qvm-ca.pem"].encode() == pki.ca_pem()
    status, body = curl(cp, "network-config")
    assert status == 200 and "52:54:0a:2a:00:0a" in body and "10.42.0.10/24" in body
    status, body = curl(cp, "vendor-data")
    assert (status, body) == (200, "#cloud-config\n{}\n")
    assert server.stats.served == 4 and server.stats.refused == 0


def test_wk1_cannot_get_cp_documents_only_its_own(
    served: Served,
) -> None:
    net, server, pki, _ = served
    wk1 = net.add_guest("52:54:0a:2a:00:0b", "10.42.0.11")
    # There is no way to name another guest: the same URL gives wk-1's.
    status, body = curl(wk1, "user-data")
    assert status == 200
    files = files_of(body)
    assert files["/root/cert/key.pem"].encode() == pki.issue("wk-1").key_pem
    assert files["/root/cert/key.pem"].encode() != pki.issue("cp").key_pem
    assert yaml.safe_load(body)["fqdn"] == "wk-1.qvm0.lan"
    for path in ("cp/user-data", "user-data?guest=cp", "../cp/user-data", "user-data/cp"):
        assert curl(wk1, path)[0] == 404, path
    assert server.stats.not_found == 4


def test_spoofed_source_address_is_refused(
    served: Served,
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, server, _, _ = served
    # wk-1's machine (its own MAC) claims cp's address.
    spoof = net.add_guest("52:54:0a:2a:00:0b", "10.42.0.10")
    caplog.set_level(logging.INFO, logger="qvmd.metadata.server")
    for doc in ("user-data", "meta-data"):
        status, body = curl(spoof, doc)
        assert (status, body) == (403, "")
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert "10.42.0.10" in refusals[0] and "52:54:0a:2a:00:0b" in refusals[0]
    assert not any("PRIVATE KEY" in r.getMessage() for r in caplog.records)
    # An address no guest has is refused too.
    stranger = net.add_guest("52:54:00:12:34:56", "10.42.0.99")
    assert curl(stranger, "user-data")[0] == 403
    assert server.stats.refused == 3 and server.stats.served == 0


def test_methods_head_and_limits(served: Served) -> None:
    net, server, _, _ = served
    cp = net.add_guest("52:54:0a:2a:00:0a", "10.42.0.10")
    assert curl(cp, "meta-data", "-X", "POST")[0] == 405
    assert curl(cp, "meta-data", "-X", "DELETE")[0] == 405
    head = nsrun(cp, "curl", "-sS", "-I", BASE + "meta-data").stdout
    assert head.startswith("HTTP/1.1 200 OK")
    assert "Cache-Control: no-store" in head and "Content-Length: " in head
    many = [arg for i in range(9) for arg in ("-H", f"X-H{i}: v")]
    assert curl(cp, "meta-data", *many)[0] == 431
    assert curl(cp, "meta-data", "-H", "X-Big: " + "a" * 9000)[0] == 431
    assert server.stats.bad_requests == 4 and server.stats.served == 1


def test_slow_client_is_dropped(served: Served) -> None:
    net, server, _, _ = served
    cp = net.add_guest("52:54:0a:2a:00:0a", "10.42.0.10")
    script = (
        "import socket, time\n"
        "s = socket.create_connection(('10.42.0.2', 80), timeout=10)\n"
        "s.sendall(b'GET /nocloud/meta-data HTTP/1.1\\r\\nHost: x\\r\\n')\n"
        "t = time.monotonic()\n"
        "data = s.recv(100)\n"
        "print(repr(data), round(time.monotonic() - t, 2))\n"
    )
    start = time.monotonic()
    out = nsrun(cp, "/usr/bin/python3", "-c", script).stdout.split()
    assert out[0] == "b''", out  # closed without an answer
    assert 0.8 <= float(out[1]) < 5, out  # after the 1 s head timeout
    assert time.monotonic() - start < 8
    # The server still serves afterwards.
    assert curl(cp, "meta-data")[0] == 200
    assert server.stats.bad_requests == 1


def test_parse_arp_needs_a_complete_entry_on_our_interface() -> None:
    text = (
        "IP address       HW type     Flags       HW address            Mask     Device\n"
        "10.42.0.10       0x1         0x0         00:00:00:00:00:00     *        veth0\n"
        "10.42.0.11       0x1         0x2         52:54:0A:2A:00:0B     *        veth0\n"
        "10.42.0.12       0x1         0x2         52:54:0a:2a:00:0c     *        other\n"
    )
    assert parse_arp(text, IPv4Address("10.42.0.10"), "veth0") is None
    assert parse_arp(text, IPv4Address("10.42.0.11"), "veth0") == "52:54:0a:2a:00:0b"
    assert parse_arp(text, IPv4Address("10.42.0.12"), "veth0") is None


def test_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    with lab_net() as net:
        lab = lab_in(net.services)
        pki = LabPki(tmp_path, lab)
        first = MetadataServer(lab, PkiDocumentSource(pki, UserDataOptions()))
        second = MetadataServer(lab, PkiDocumentSource(pki, UserDataOptions()))
        with (
            ServerThread(first),
            pytest.raises(Failed, match="port is taken"),
            ServerThread(second),
        ):
            pass


def test_services_namespace_missing_is_a_clear_error(tmp_path: Path) -> None:
    lab = lab_in(unique_name("absent"))
    server = MetadataServer(lab, PkiDocumentSource(LabPki(tmp_path, lab), UserDataOptions()))
    with pytest.raises(Failed, match=lab.services.netns), ServerThread(server):
        pass


def test_lab_update_takes_effect_and_a_removed_guest_is_refused(served: Served) -> None:
    net, server, _, thread = served
    wk1 = net.add_guest("52:54:0a:2a:00:0b", "10.42.0.11")
    assert curl(wk1, "meta-data")[0] == 200
    lab = server.lab
    without_wk1 = dataclasses.replace(lab, guests=tuple(g for g in lab.guests if g.name != "wk-1"))
    thread.call(server.update(without_wk1))
    assert curl(wk1, "meta-data")[0] == 403
    thread.call(server.update(lab))
    assert curl(wk1, "meta-data")[0] == 200


def test_connections_beyond_the_limit_are_reset(tmp_path: Path) -> None:
    with lab_net() as net:
        lab = lab_in(net.services)
        pki = LabPki(tmp_path, lab)
        limits = Limits(head_timeout=2.0, max_connections=1)
        server = MetadataServer(lab, PkiDocumentSource(pki, UserDataOptions()), limits=limits)
        with ServerThread(server):
            cp = net.add_guest("52:54:0a:2a:00:0a", "10.42.0.10")
            # One client holds the only slot by never finishing its request.
            script = (
                "import socket, subprocess\n"
                "s = socket.create_connection(('10.42.0.2', 80), timeout=10)\n"
                "s.sendall(b'GET /nocloud/meta-data HTTP/1.1\\r\\n')\n"
                "r = subprocess.run(['curl', '-sS', '-o', '/dev/null', '-w', '%{http_code}',\n"
                "                    'http://10.42.0.2/nocloud/meta-data'],\n"
                "                   capture_output=True, text=True)\n"
                "print(r.returncode, r.stdout or '-')\n"
            )
            out = nsrun(cp, "/usr/bin/python3", "-c", script).stdout.split()
            assert out[0] != "0" and out[1] == "000", out  # no HTTP answer at all
            assert curl(cp, "meta-data")[0] == 200  # the slot is free again
            assert server.stats.bad_requests == 2  # the reset one and the slow one
