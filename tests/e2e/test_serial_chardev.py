"""-serial on a chardev (socket): guest output reaches the client, client input reaches the
guest with back-pressure (nothing dropped when the client sends more than the 64-byte FIFO)."""

import socket
import time

import pytest

from tests.e2e.test_cli import elf_kernel

# LSR until DR; RBR -> THR; forever. Runs on the test hypervisor's x86 interpreter.
ECHO = bytes.fromhex("66BAFD03" "EC" "3C61" "75FB" "66BAF803" "EC" "EE" "66BAFD03" "EBEF")


def _connect(path: str, timeout: float = 15.0) -> socket.socket:
    end = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.settimeout(timeout)
            return s
        except OSError:
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


@pytest.mark.parametrize("form", ["socket", "chardev"])
def test_serial_chardev_echoes_everything(vmm, tmp_path, form):
    kernel = elf_kernel(tmp_path / "echo.elf", ECHO)
    con = str(tmp_path / "con.sock")
    if form == "socket":
        args = ["-serial", f"socket,path={con},server,nowait"]
    else:
        args = ["-chardev", f"socket,id=ser0,path={con},server,nowait", "-serial", "chardev:ser0"]
    p = vmm("-kernel", kernel, *args)
    s = _connect(con)
    payload = bytes(range(32, 127)) * 11  # 1045 bytes: 16 times the receive FIFO
    s.sendall(payload)
    assert _recv_exactly(s, len(payload)) == payload
    s.close()
    q = p.client()
    q.execute("quit")
    assert p.wait() == 0
