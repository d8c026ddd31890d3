"""A minimal guest on a lab TAP, holding the TAP's fd the way QEMU does.

Usage: fault_guest.py NETNS TAP UID MAC IP
Enters NETNS, opens /dev/net/tun as root, drops to UID, attaches to TAP
(IFF_VNET_HDR, like QEMU), prints "attached" (or "error <errno-name>") and
then answers, until stdin closes or it is killed:
  - ARP requests for IP, with MAC;
  - ICMP echo requests to IP, with an echo reply.
That is enough for `ping` from the gateway to measure the loss a fault costs
a running guest whose TAP survives (its fd is never reopened).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import sys
import threading

from pyroute2 import netns as pnetns

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
VNET_HDR = bytes(10)  # struct virtio_net_hdr, all zero: no offloads


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_reply(frame: bytes, mac: bytes, ip: bytes) -> bytes | None:
    if frame[20:22] != b"\x00\x01" or frame[38:42] != ip:
        return None
    sender_mac, sender_ip = frame[22:28], frame[28:32]
    eth = sender_mac + mac + b"\x08\x06"
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + mac + ip + sender_mac + sender_ip
    return eth + arp


def echo_reply(frame: bytes, mac: bytes, ip: bytes) -> bytes | None:
    iph = frame[14:]
    ihl = (iph[0] & 0x0F) * 4
    if iph[9] != 1 or iph[16:20] != ip:  # not ICMP, or not to us
        return None
    total = struct.unpack("!H", iph[2:4])[0]
    icmp = bytearray(iph[ihl:total])
    if not icmp or icmp[0] != 8:  # not an echo request
        return None
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    hdr = bytearray(iph[:ihl])
    hdr[12:16], hdr[16:20] = iph[16:20], iph[12:16]
    hdr[8] = 64
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
    return frame[6:12] + mac + b"\x08\x00" + bytes(hdr) + bytes(icmp)


def serve(fd: int, mac: bytes, ip: bytes) -> None:
    while True:
        select.select([fd], [], [])
        try:
            frame = os.read(fd, 65536)[len(VNET_HDR) :]
        except OSError:
            return  # the TAP was deleted under us: the fd is dead
        if len(frame) < 42:
            continue
        reply = None
        if frame[12:14] == b"\x08\x06":
            reply = arp_reply(frame, mac, ip)
        elif frame[12:14] == b"\x08\x00":
            reply = echo_reply(frame, mac, ip)
        if reply is not None:
            try:
                os.write(fd, VNET_HDR + reply)
            except OSError:
                return


def main() -> int:
    ns, name, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mac = bytes(int(b, 16) for b in sys.argv[4].split(":"))
    ip = socket.inet_aton(sys.argv[5])
    pnetns.setns(ns, flags=0)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    try:
        fcntl.ioctl(
            fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        )
    except OSError as exc:
        print("error", errno.errorcode.get(exc.errno or 0, str(exc.errno)), flush=True)
        return 1
    print("attached", flush=True)
    threading.Thread(target=serve, args=(fd, mac, ip), daemon=True).start()
    sys.stdin.read()  # until the test closes our stdin
    return 0


if __name__ == "__main__":
    sys.exit(main())
