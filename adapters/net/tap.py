"""TAP backends for virtio-net: /dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR."""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Sequence

from domain.errors import HostResourceError

TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
VNET_HDR_SIZE = 12  # virtio_net_hdr_v1 (VIRTIO_F_VERSION_1)


def valid_ifname(name: str) -> str | None:
    """None when ``name`` is a valid Linux interface name, else the reason."""
    if not name:
        return "interface name is empty"
    if len(name.encode()) >= IFNAMSIZ:
        return f"interface name '{name}' is longer than {IFNAMSIZ - 1} bytes"
    if name in (".", "..") or any(c in name for c in "/: \t\n") :
        return f"interface name '{name}' contains an invalid character"
    return None


class Tap:
    def __init__(self, fd: int, ifname: str):
        self.fd = fd
        self.ifname = ifname

    def recv_into(self, buf: memoryview) -> int:
        try:
            return os.readv(self.fd, [buf])
        except BlockingIOError:
            return 0

    def sendv(self, bufs: Sequence[memoryview]) -> int:
        return os.writev(self.fd, bufs)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TapOpener:
    def __init__(self, tun_path: str = "/dev/net/tun"):
        self._tun = tun_path

    def open_tap(self, ifname: str) -> Tap:
        why = valid_ifname(ifname)
        if why:
            raise HostResourceError(why)
        try:
            fd = os.open(self._tun, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise HostResourceError(f"cannot open {self._tun}: {e.strerror}") from None
        try:
            ifr = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as e:
            os.close(fd)
            raise HostResourceError(f"cannot attach to tap '{ifname}': {e.strerror}") from None
        return Tap(fd, ifname)
