"""A raw-socket QMP client for tests: what `ncat -U` would show, line by line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class RawQmp:
    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.recv()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj) -> None:
        self.send_raw(json.dumps(obj).encode() + b"\n")

    def recv_line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP socket closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def recv(self) -> dict:
        return json.loads(self.recv_line())

    def cmd(self, execute: str, arguments: dict | None = None, **extra) -> list[dict]:
        """Send one command; return every message up to and including its reply."""
        msg = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        msg.update(extra)
        self.send(msg)
        out = []
        while True:
            m = self.recv()
            out.append(m)
            if "return" in m or "error" in m:
                return out

    def execute(self, execute: str, arguments: dict | None = None):
        reply = self.cmd(execute, arguments)[-1]
        if "error" in reply:
            raise AssertionError(f"{execute} failed: {reply}")
        return reply["return"]

    def wait_event(self, name: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.recv()
            if m.get("event") == name:
                return m
        raise TimeoutError(name)

    def close(self) -> None:
        self.sock.close()


class VmmProcess:
    """A `pystrato` process under test, with its QMP socket."""

    def __init__(self, args: list[str], sock: str, *, env=None, wait=True, stdout=None):
        self.sock = sock
        self.args = [sys.executable, "-m", "application.cli", *args, "-qmp", f"unix:{sock},server,nowait"]
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env or {**os.environ, "PYTHONUNBUFFERED": "1"})
        if wait:
            self.wait_socket()

    def wait_socket(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pystrato exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            if os.path.exists(self.sock):
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(self.sock)
                    s.close()
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise TimeoutError("QMP socket did not appear")

    def client(self) -> RawQmp:
        return RawQmp(self.sock)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
