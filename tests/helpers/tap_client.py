"""Attach to a TAP the way QEMU does, as an unprivileged user, and pass frames.

Usage: tap_client.py NETNS TAP UID GID
Enters NETNS and opens /dev/net/tun as root (the device node is 0600 on these
machines; on a desktop it is 0666), then drops to UID/GID *before* TUNSETIFF,
which is where the kernel checks the TAP's owner. Prints "attached" or
"error <errno-name>", then answers commands on stdin, one per line:
  arp SRC_MAC SRC_IP TARGET_IP -> "reply <mac>" or "timeout"
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import sys
import time

from pyroute2 import netns as pnetns

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_TUN_EXCL = 0x0002, 0x1000, 0x4000, 0x8000
VNET_HDR = bytes(10)  # struct virtio_net_hdr, all zero: no offloads


def mac_bytes(mac: str) -> bytes:
    return bytes(int(b, 16) for b in mac.split(":"))


def arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    eth = b"\xff" * 6 + mac_bytes(src_mac) + b"\x08\x06"
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
    arp += mac_bytes(src_mac) + socket.inet_aton(src_ip) + bytes(6) + socket.inet_aton(target_ip)
    return eth + arp


def wait_reply(fd: int, target_ip: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    want = socket.inet_aton(target_ip)
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        frame = os.read(fd, 65536)[len(VNET_HDR) :]
        if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02" and frame[28:32] == want:
            return ":".join(f"{b:02x}" for b in frame[22:28])
    return None


def main() -> int:
    ns, name, uid, gid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "attach"
    pnetns.setns(ns, flags=0)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_TUN_EXCL if mode == "create" else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError as exc:
        print("error", errno.errorcode.get(exc.errno or 0, str(exc.errno)), flush=True)
        return 1
    print("attached", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "arp":
            os.write(fd, VNET_HDR + arp_request(cmd[1], cmd[2], cmd[3]))
            reply = wait_reply(fd, cmd[3], 3.0)
            print(f"reply {reply}" if reply else "timeout", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
