"""A real `pystrato -accel kvm` process running a test guest, for the integration tests and the
benchmarks: serial on the process's stdio (input through a pipe, output collected with arrival
times by a reader thread), QMP on a unix socket, stderr in a file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.e2e.qmpclient import RawQmp

ROOT = Path(__file__).resolve().parents[2]


class GuestVm:
    def __init__(self, workdir: Path, kernel: Path | str, append: str = "", *extra: str,
                 mem_mib: int = 128, name: str = "vm"):
        self.workdir = Path(workdir)
        self.sock = str(self.workdir / f"{name}.qmp")
        self.stderr_path = self.workdir / f"{name}.stderr"
        self.args = [sys.executable, "-m", "application.cli", "-accel", "kvm", "-machine", "microvm",
                     "-m", str(mem_mib), "-kernel", str(kernel), "-append", append, "-serial", "stdio",
                     *extra, "-qmp", f"unix:{self.sock},server,nowait"]
        self._out = bytearray()
        self._arrivals: list[tuple[float, int]] = []  # (monotonic time, output length after it)
        self._cond = threading.Condition()
        self._eof = False
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._qmp: RawQmp | None = None

    # --- serial ------------------------------------------------------------------------------------

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._out += chunk
                self._arrivals.append((now, len(self._out)))
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._out.decode(errors="replace")

    def send_serial(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait_line(self, pattern: str, timeout: float = 60.0) -> tuple[re.Match, float]:
        """The first complete output line matching ``pattern`` (re.search) and when its newline
        arrived (time.monotonic)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pos = 0
                while (nl := self._out.find(b"\n", pos)) >= 0:
                    m = rx.search(self._out[pos:nl].decode(errors="replace"))
                    if m:
                        return m, self._arrival_of(nl + 1)
                    pos = nl + 1
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise AssertionError(f"no serial line matching {pattern!r} "
                                         f"({'pystrato exited' if self._eof else 'timeout'})\n"
                                         f"serial:\n{self._out.decode(errors='replace')}\nstderr:\n{self.stderr}")
                self._cond.wait(min(left, 0.5))

    def _arrival_of(self, end: int) -> float:
        for t, length in self._arrivals:
            if length >= end:
                return t
        return time.monotonic()

    @property
    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    # --- QMP ---------------------------------------------------------------------------------------

    def qmp(self, timeout: float = 30.0) -> RawQmp:
        """The QMP connection, negotiated (qmp_capabilities done)."""
        if self._qmp is not None:
            return self._qmp
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"pystrato exited {self.proc.returncode}:\n{self.stderr}")
            try:
                q = RawQmp(self.sock)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        q.execute("qmp_capabilities")
        self._qmp = q
        return q

    def command(self, execute: str, arguments: dict | None = None) -> tuple[object, list[dict]]:
        """Run a command; returns its result and the events that arrived before the reply."""
        msgs = self.qmp().cmd(execute, arguments)
        reply = msgs[-1]
        if "error" in reply:
            raise AssertionError(f"{execute} failed: {reply}")
        return reply["return"], [m for m in msgs[:-1] if "event" in m]

    def event(self, name: str, seen: list[dict], timeout: float = 10.0) -> dict:
        """The event ``name`` from ``seen`` (already received) or the next ones."""
        for m in seen:
            if m.get("event") == name:
                return m
        return self.qmp().wait_event(name, timeout)

    def pmem(self, addr: int, size: int) -> bytes:
        path = self.workdir / "pmem.bin"
        self.command("pmemsave", {"val": addr, "size": size, "filename": str(path)})
        data = path.read_bytes()
        path.unlink()
        return data

    # --- process -------------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._reader.join(5)
