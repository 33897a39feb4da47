"""Migration byte streams over TCP and unix sockets (the ChannelFactory port)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from typing import Sequence

from domain.migration import MigrationUri

# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024
# Bigger socket buffers let one sendmsg move a whole 1 MiB batch (unix sockets default ~200 KiB).
_SOCK_BUF = 4 << 20


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SocketChannel:
    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._lock = threading.Lock()
        self._closed = False

    def send(self, buffers: Sequence) -> None:
        bufs = [m for m in (memoryview(b).cast("B") for b in buffers) if len(m)]
        i = 0
        while i < len(bufs):
            n = self._sock.sendmsg(bufs[i : i + _IOV_MAX])
            while n:
                if n >= len(bufs[i]):
                    n -= len(bufs[i])
                    i += 1
                else:
                    bufs[i] = bufs[i][n:]
                    n = 0

    def recv_into(self, buf: memoryview) -> int:
        return self._sock.recv_into(buf)

    def set_timeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def abort(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._sock.close()


class SocketListener:
    def __init__(self, sock: socket.socket, address: str, unix_path: str | None = None):
        self._sock = sock
        self.address = address
        self._unix_path = unix_path
        self._lock = threading.Lock()
        self._closed = False

    def accept(self) -> SocketChannel:
        conn, _ = self._sock.accept()
        conn.settimeout(None)
        _tune(conn)
        return SocketChannel(conn)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            # On Linux, shutdown() of a listening socket wakes a thread blocked in accept().
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass


class SocketChannelFactory:
    def connect(self, uri: MigrationUri, timeout: float) -> SocketChannel:
        if uri.scheme == "tcp":
            sock = socket.create_connection((uri.host or "localhost", uri.port), timeout=timeout)
        elif uri.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(uri.path)
            except OSError:
                sock.close()
                raise
        else:
            raise ValueError(f"no channel for scheme '{uri.scheme}'")
        _tune(sock)
        return SocketChannel(sock)

    def listen(self, uri: MigrationUri) -> SocketListener:
        if uri.scheme == "tcp":
            infos = socket.getaddrinfo(uri.host or None, uri.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(addr)
                sock.listen(1)
            except OSError:
                sock.close()
                raise
            host, port = sock.getsockname()[:2]
            bound = MigrationUri("tcp", host=host, port=port)
            return SocketListener(sock, str(bound))
        if uri.scheme == "unix":
            path = uri.path
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                pass
            else:
                # A socket left behind by an earlier run is replaced; anything else is not ours.
                if not stat.S_ISSOCK(st.st_mode):
                    raise FileExistsError(17, "File exists and is not a socket", path)
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
                sock.listen(1)
            except OSError:
                sock.close()
                raise
            return SocketListener(sock, f"unix:{path}", unix_path=path)
        raise ValueError(f"no channel for scheme '{uri.scheme}'")
