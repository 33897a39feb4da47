"""The client end of a unix stream socket (a socket chardev's peer) for the integration tests."""

import socket

TIMEOUT = 10.0


def connect(path: str, timeout: float = TIMEOUT) -> socket.socket:
    """A connected client whose reads and writes give up (socket.timeout) after ``timeout``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return buf
