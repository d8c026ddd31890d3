"""The NoCloud metadata service: HTTP on the services address, per guest.

    GET http://10.42.0.2/nocloud/{meta-data,user-data,vendor-data,network-config}

The URL is the same for every guest; the server tells guests apart by the
request's source address, and believes it only when the MAC that the
services namespace's neighbour (ARP) table holds for that address is the
guest's MAC. So a guest can only ever get its own documents; anything else
gets 403 and one log line. The MAC check is as strong as the bridge's
per-TAP anti-spoofing (firewall): without it a guest could forge both.

Where it runs: in qvmd's own event loop, no extra process. The listening
socket and a file descriptor on the namespace's /proc/net/arp are opened by
a short-lived thread that has entered the services namespace (setns(2) acts
on the calling thread only) and are then served from the main loop; a
socket and a /proc/net file stay bound to the namespace they were opened
in. If the services namespace is recreated, the server must be restarted
(`restart()`), since both belong to the old one.

The HTTP/1.1 subset: GET and HEAD only (405 otherwise), exact paths (404
otherwise), one request per connection (`Connection: close`), the request
head bounded in size and header count (431) and in time (slow clients are
dropped), a bounded number of connections at once. Key material is never
logged: the documents are built on request, sent, and forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address
from typing import TypeVar

from qvmd import nsutil
from qvmd.errors import Failed
from qvmd.metadata.documents import (
    DEFAULT_PORT,
    DOCUMENT_NAMES,
    SEED_PATH,
    Documents,
    GuestMaterial,
    UserDataOptions,
    build_documents,
    seed_url,
)
from qvmd.model import Guest, Lab
from qvmd.pki.store import LabPki

log = logging.getLogger(__name__)

# Linux's value; the socket module lacks the name on some builds.
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
# /proc/net/arp's flag for a resolved entry (ATF_COM).
_ATF_COM = 0x2

T = TypeVar("T")

# Builds a guest's documents. It may block (PKI file I/O, key generation):
# the server calls it on a worker thread.
DocumentSource = Callable[[Lab, Guest], Documents]


@dataclass(frozen=True)
class Limits:
    max_head_bytes: int = 8192  # request line and headers together
    max_headers: int = 32
    head_timeout: float = 10.0  # to receive the whole request head
    write_timeout: float = 10.0  # to hand the response to the kernel
    max_connections: int = 64


@dataclass
class Stats:
    served: int = 0
    refused: int = 0  # 403
    not_found: int = 0  # 404
    bad_requests: int = 0  # 400, 405, 431, and connections dropped for time or load
    errors: int = 0  # 500: the documents could not be built


@dataclass(frozen=True)
class PkiDocumentSource:
    """Documents from the lab PKI: the guest's certificate, issued if needed."""

    pki: LabPki
    options: UserDataOptions

    def __call__(self, lab: Lab, guest: Guest) -> Documents:
        issued = self.pki.issue(guest.name)
        material = GuestMaterial(
            cert_pem=issued.cert_pem,
            fullchain_pem=issued.fullchain_pem,
            ca_pem=self.pki.ca_pem(),
            key_pem=issued.key_pem,
        )
        return build_documents(lab, guest, material, self.options)


class NeighbourTable:
    """The IPv4 neighbour table of one namespace, read through /proc/net/arp.

    `fd` was opened inside that namespace, so reading it shows that
    namespace's table wherever the reader runs.
    """

    def __init__(self, fd: int, interface: str) -> None:
        self._fd = fd
        self.interface = interface

    def mac_of(self, ip: IPv4Address) -> str | None:
        """The resolved MAC for `ip` on our interface, or None."""
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 65536):
            chunks.append(chunk)
        return parse_arp(b"".join(chunks).decode("ascii", "replace"), ip, self.interface)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def parse_arp(text: str, ip: IPv4Address, interface: str) -> str | None:
    """The MAC of a resolved entry for `ip` on `interface` in /proc/net/arp text."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        # IP address, HW type, Flags, HW address, Mask, Device
        if len(fields) != 6 or fields[5] != interface:
            continue
        try:
            if IPv4Address(fields[0]) != ip or not int(fields[2], 16) & _ATF_COM:
                continue
        except (AddressValueError, ValueError):
            continue
        return fields[3].lower()
    return None


def _run_in_fresh_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run `fn` on a new thread that ends afterwards.

    Never on a pooled thread: a thread that entered another namespace
    would stay there and run later, unrelated work in it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, exc: BaseException | None) -> None:
        if future.cancelled():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(deliver, None, exc)
        else:
            loop.call_soon_threadsafe(deliver, result, None)

    threading.Thread(target=body, name="qvmd-metadata-setns", daemon=True).start()
    return future


def open_in_netns(
    netns: str, address: IPv4Address, port: int, interface: str
) -> tuple[socket.socket, NeighbourTable]:
    """Bind a listening TCP socket and open the neighbour table inside `netns`.

    Blocking and namespace-changing: call it on a thread of its own
    (MetadataServer does) and let that thread end.
    """
    nsutil.enter(netns)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # The plane may be re-adding the address right now (healing); bind
        # anyway, the socket works as soon as the address is back.
        sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
        sock.bind((str(address), port))
        sock.listen(128)
        sock.setblocking(False)
        fd = os.open("/proc/thread-self/net/arp", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        sock.close()
        raise
    return sock, NeighbourTable(fd, interface)


def _close_opened(done: asyncio.Future[tuple[socket.socket, NeighbourTable]]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    sock, neighbours = done.result()
    sock.close()
    neighbours.close()


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}


class MetadataServer:
    """Serves each guest its own NoCloud documents, from the event loop."""

    def __init__(
        self,
        lab: Lab,
        source: DocumentSource,
        *,
        port: int = DEFAULT_PORT,
        limits: Limits | None = None,
    ) -> None:
        self.lab = lab
        self.source = source
        self.port = port
        self.limits = limits or Limits()
        self.stats = Stats()
        self._server: asyncio.Server | None = None
        self._neighbours: NeighbourTable | None = None
        self._connections = 0

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        return seed_url(self.lab, self.port)

    async def start(self) -> None:
        if self._server is not None:
            return
        services = self.lab.services
        opening = _run_in_fresh_thread(
            lambda: open_in_netns(services.netns, services.address, self.port, services.interface)
        )
        try:
            sock, neighbours = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread still finishes; close what it opens.
            opening.add_done_callback(_close_opened)
            raise
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason = "the port is taken by another program"
            raise Failed(
                f"cannot serve cloud-init metadata on {services.address}:{self.port} "
                f"in namespace {services.netns}: {reason}"
            ) from None
        try:
            self._server = await asyncio.start_server(
                self._handle, sock=sock, limit=self.limits.max_head_bytes
            )
        except BaseException:
            sock.close()
            neighbours.close()
            raise
        self._neighbours = neighbours
        log.info("cloud-init metadata served at %s", self.url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            # Connections in flight end on their own timeouts; wait_closed
            # would wait for them on Python 3.12+.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
        if self._neighbours is not None:
            self._neighbours.close()
            self._neighbours = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def update(self, lab: Lab, source: DocumentSource | None = None) -> None:
        """Take a new lab (config reload); rebind only if the place changed."""
        old = self.lab.services
        self.lab = lab
        if source is not None:
            self.source = source
        new = lab.services
        moved = (old.netns, old.address, old.interface) != (
            new.netns,
            new.address,
            new.interface,
        )
        if moved and self.running:
            await self.restart()

    # --- one connection -------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= self.limits.max_connections:
            self.stats.bad_requests += 1
            writer.transport.abort()
            return
        self._connections += 1
        try:
            await self._serve_one(reader, writer)
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self.limits.write_timeout):
                    await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(self.limits.head_timeout):
                method, target = await self._read_head(reader)
        except TimeoutError:
            self.stats.bad_requests += 1
            return  # a slow client gets nothing more
        except _BadRequest as exc:
            self.stats.bad_requests += 1
            await self._send(writer, exc.status, b"", head_only=False)
            return
        status, body = await self._answer(method, target, peer)
        await self._send(writer, status, body, head_only=method == "HEAD")

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(431) from None
        except asyncio.IncompleteReadError:
            raise _BadRequest(400) from None
        if len(head) > self.limits.max_head_bytes:
            raise _BadRequest(431)
        lines = head[:-4].split(b"\r\n")
        if len(lines) - 1 > self.limits.max_headers:
            raise _BadRequest(431)
        if any(b":" not in line for line in lines[1:]):
            raise _BadRequest(400)
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise _BadRequest(400)
        method, target, version = (p.decode("ascii", "replace") for p in parts)
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505)
        return method, target

    async def _answer(self, method: str, target: str, peer: object) -> tuple[int, bytes]:
        if method not in ("GET", "HEAD"):
            self.stats.bad_requests += 1
            return 405, b""
        name = target[len(SEED_PATH) :] if target.startswith(SEED_PATH) else ""
        if name not in DOCUMENT_NAMES:
            self.stats.not_found += 1
            return 404, b""
        source_ip = peer[0] if isinstance(peer, tuple) and peer else "?"
        guest, reason = self._identify(str(source_ip))
        if guest is None:
            self.stats.refused += 1
            log.warning("metadata: refused %s %s from %s: %s", method, target, source_ip, reason)
            return 403, b""
        try:
            documents = await asyncio.to_thread(self.source, self.lab, guest)
        except Exception as exc:
            self.stats.errors += 1
            log.error("metadata: cannot build the documents of %s: %s", guest.name, exc)
            return 500, b""
        self.stats.served += 1
        log.info("metadata: %s %s to %s (%s)", method, name, guest.name, source_ip)
        return 200, documents.by_name()[name]

    def _identify(self, source_ip: str) -> tuple[Guest | None, str]:
        try:
            ip = IPv4Address(source_ip)
        except AddressValueError:
            return None, "not an IPv4 address"
        guest = next((g for g in self.lab.guests if g.ip == ip), None)
        if guest is None:
            return None, "no guest has this address"
        if self._neighbours is None:
            return None, "the server is stopping"
        mac = self._neighbours.mac_of(ip)
        if mac is None:
            return None, f"no neighbour entry for it on {self._neighbours.interface}"
        if mac != guest.mac.lower():
            return None, f"it is {guest.name}'s address but comes from MAC {mac}, not {guest.mac}"
        return guest, ""

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, *, head_only: bool
    ) -> None:
        headers = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",  # user-data carries a private key
            "Connection: close",
        ]
        if status == 405:
            headers.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("ascii"))
        if not head_only:
            writer.write(body)
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await writer.drain()
        except (TimeoutError, ConnectionError):
            self.stats.bad_requests += 1


__all__ = [
    "DocumentSource",
    "Limits",
    "MetadataServer",
    "NeighbourTable",
    "PkiDocumentSource",
    "Stats",
    "open_in_netns",
    "parse_arp",
]
