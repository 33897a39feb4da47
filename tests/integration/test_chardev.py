"""The chardev adapters on real sockets, pipes and files (adapters/chardev)."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time

import pytest

from tests.integration.unix_client import connect, recv_exactly
from tests.integration.waiting import until

from adapters.chardev import ChardevOpener
from adapters.chardev import socket as sockdev
from adapters.chardev.socket import UnixSocketChardev
from adapters.chardev.stream import FileChardev, StdioChardev
from domain.config import ChardevConfig
from domain.errors import ConfigError, HostResourceError


class Guest:
    """The consumer side: takes at most ``room`` bytes until given more room."""

    def __init__(self, room=1 << 30):
        self.room = room
        self.got = bytearray()
        self.calls = 0
        self.lock = threading.Lock()

    def receive(self, data):
        with self.lock:
            self.calls += 1
            n = min(len(data), self.room)
            self.got += data[:n]
            self.room -= n
            return n

    def give(self, backend, room):
        with self.lock:
            self.room += room
        backend.input_ready()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "con.sock")


@pytest.fixture
def chardev(path):
    opened = []

    def make(receive=None):
        dev = UnixSocketChardev("con", path)
        opened.append(dev)
        if receive is not None:
            dev.start(receive)
        return dev

    yield make
    for dev in opened:
        dev.close()


def test_socket_is_0600_and_removed_on_close(chardev, path):
    dev = chardev()
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    dev.close()
    assert not os.path.exists(path)
    dev.close()  # idempotent


def test_output_without_a_client_is_dropped(chardev):
    dev = chardev(Guest().receive)
    dev.write(b"nobody listens")
    assert dev.dropped == len(b"nobody listens")


def test_client_gets_output_and_its_input_reaches_the_guest(chardev, path):
    guest = Guest()
    dev = chardev(guest.receive)
    client = connect(path)
    until(lambda: dev.connected, "the client to be accepted")
    dev.write(memoryview(b"login: "))
    assert recv_exactly(client, 7) == b"login: "
    client.sendall(b"root\n")
    until(lambda: bytes(guest.got) == b"root\n", "input to reach the guest")
    assert dev.dropped == 0


def test_back_pressure_pauses_reading_until_input_ready(chardev, path):
    guest = Guest(room=3)
    dev = chardev(guest.receive)
    client = connect(path)
    client.sendall(b"abcdefgh")
    until(lambda: bytes(guest.got) == b"abc", "the first 3 bytes")
    calls = guest.calls
    time.sleep(0.05)
    assert guest.calls == calls  # no room: the chardev does not retry on its own
    guest.give(dev, 100)
    until(lambda: bytes(guest.got) == b"abcdefgh", "the rest after input_ready")


def test_input_waits_for_start(chardev, path):
    dev = chardev()
    client = connect(path)
    client.sendall(b"early")
    until(lambda: dev.connected, "accept")
    guest = Guest()
    dev.start(guest.receive)
    until(lambda: bytes(guest.got) == b"early", "input after start")


def test_one_client_at_a_time_and_the_next_one_after(chardev, path):
    guest = Guest()
    dev = chardev(guest.receive)
    first = connect(path)
    until(lambda: dev.connected, "first client")
    second = connect(path)  # waits in the backlog
    second.sendall(b"2")
    dev.write(b"to first")
    assert recv_exactly(first, 8) == b"to first"
    time.sleep(0.05)
    assert bytes(guest.got) == b""  # the second client is not read while the first is served
    first.close()
    until(lambda: bytes(guest.got) == b"2", "the second client to be served")
    dev.write(b"to second")
    assert recv_exactly(second, 9) == b"to second"


def test_slow_client_never_blocks_the_writer(chardev, path, monkeypatch):
    monkeypatch.setattr(sockdev, "OUT_LIMIT", 64 << 10)
    dev = chardev(Guest().receive)
    client = connect(path)
    until(lambda: dev.connected, "accept")
    chunk = b"x" * 65536
    total = 64 * len(chunk)  # far more than the socket buffer plus OUT_LIMIT
    for _ in range(64):
        dev.write(chunk)  # returns although the client reads nothing
    assert dev.dropped > 0
    client.settimeout(0.5)
    got = 0
    try:
        while True:
            data = client.recv(1 << 20)
            if not data:
                break
            got += len(data)
    except TimeoutError:
        pass
    assert got + dev.dropped == total


def test_client_leaving_mid_output_is_noticed(chardev, path):
    dev = chardev(Guest().receive)
    client = connect(path)
    until(lambda: dev.connected, "accept")
    client.close()
    until(lambda: not dev.connected, "the hang-up")
    dev.write(b"after")
    assert dev.dropped == 5


def test_stale_socket_is_replaced(path, chardev):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    chardev()
    connect(path).close()


def test_live_socket_or_regular_file_is_refused(path, chardev, tmp_path):
    chardev()
    with pytest.raises(HostResourceError, match="in use by another process"):
        UnixSocketChardev("other", path)
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(HostResourceError, match="exists and is not a socket"):
        UnixSocketChardev("other", str(plain))
    with pytest.raises(HostResourceError, match="No such file or directory"):
        UnixSocketChardev("other", str(tmp_path / "missing" / "s.sock"))


def test_socket_replaced_by_someone_else_is_not_removed(chardev, path):
    dev = chardev()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    dev.close()
    assert os.path.exists(path)
    other.close()


def test_file_chardev_appends_output(tmp_path):
    p = tmp_path / "console.log"
    p.write_bytes(b"old\n")
    dev = FileChardev("log", str(p))
    dev.start(Guest().receive)
    dev.write(b"new ")
    dev.write(memoryview(b"line\n"))
    dev.close()
    assert p.read_bytes() == b"old\nnew line\n"
    with pytest.raises(HostResourceError, match="No such file or directory"):
        FileChardev("log", str(tmp_path / "missing" / "x.log"))


def test_stdio_chardev_with_back_pressure():
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    dev = StdioChardev("s", in_fd=in_r, out_fd=out_w)
    guest = Guest(room=2)
    dev.start(guest.receive)
    os.write(in_w, b"hello")
    until(lambda: bytes(guest.got) == b"he", "the first 2 bytes")
    guest.give(dev, 10)
    until(lambda: bytes(guest.got) == b"hello", "the rest")
    dev.write(b"out")
    assert os.read(out_r, 10) == b"out"
    dev.close()
    for fd in (in_r, in_w, out_r, out_w):
        os.close(fd)


def test_opener_refuses_what_pystrato_does_not_do(path):
    opener = ChardevOpener()
    with pytest.raises(ConfigError, match="'server' is required"):
        opener.open(ChardevConfig("c", "socket", path, server=False, nowait=True))
    with pytest.raises(ConfigError, match="'nowait' is required"):
        opener.open(ChardevConfig("c", "socket", path, server=True, nowait=False))
    with pytest.raises(ConfigError, match="pty chardev 'c' is not supported"):
        opener.open(ChardevConfig("c", "pty"))
    assert not os.path.exists(path)


def test_opener_closes_what_it_opened(path, tmp_path):
    opener = ChardevOpener()
    opener.open(ChardevConfig("c", "socket", path, server=True, nowait=True))
    opener.open(ChardevConfig("f", "file", str(tmp_path / "f.log")))
    assert os.path.exists(path)
    opener.close()
    assert not os.path.exists(path)
