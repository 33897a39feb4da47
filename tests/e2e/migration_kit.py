"""Helpers for the snapshot/migration end-to-end tests: real `pystrato` processes, qemu.qmp
sessions and the waits on them, a fake-guest "toucher" thread that dirties memory during a
transfer, and file digests. (The proxy that cuts a stream is tests/stream_proxy.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from qemu.qmp import QMPClient

from tests.e2e.qmpclient import RawQmp

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096
TERMINAL = ("completed", "failed", "cancelled")


class Vmm:
    """One `pystrato -accel test` process with a QMP socket and a log file (-D)."""

    def __init__(self, workdir: str, name: str, args: list[str], *, prefix: list[str] = (),
                 wait: bool = True, accel: str = "test"):
        self.name = name
        self.sock = os.path.join(workdir, f"{name}.qmp")
        self.logfile = os.path.join(workdir, f"{name}.log")
        self.args = [*prefix, sys.executable, "-m", "application.cli", "-accel", accel, *args,
                     "-D", self.logfile, "-qmp", f"unix:{self.sock},server,nowait"]
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._stderr: str | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the QMP greeting, not just the socket file: the greeting is sent only
        once start-up is over (e.g. an -incoming listener is bound)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.stderr()}")
            try:
                RawQmp(self.sock, timeout=5).close()
                return
            except OSError:
                time.sleep(0.01)
        raise TimeoutError(f"{self.name}: no QMP greeting")

    def raw(self) -> RawQmp:
        c = RawQmp(self.sock)
        c.execute("qmp_capabilities")
        return c

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        if self._stderr is None:
            if self.proc.poll() is None:
                return ""
            self._stderr = self.proc.stderr.read().decode(errors="replace")
        return self._stderr

    def log(self) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def run_cli(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run pystrato to completion (start-up refusals)."""
    return subprocess.run([sys.executable, "-m", "application.cli", *args], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


@contextlib.asynccontextmanager
async def qmp_session(vmm: Vmm, name: str = "test"):
    """A negotiated qemu.qmp QMPClient; tolerates the VMM closing the socket (quit, or the
    source exiting after a completed migration)."""
    qmp = QMPClient(name)
    await qmp.connect(vmm.sock)
    try:
        yield qmp
    finally:
        try:
            await qmp.disconnect()
        except (EOFError, ConnectionError, OSError):
            pass


async def wait_status(qmp: QMPClient, done=TERMINAL, timeout: float = 120.0,
                      poll: float = 0.02) -> dict:
    """Poll query-migrate until its status is in ``done``."""
    deadline = time.monotonic() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        if info["status"] in done:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration still {info}")
        await asyncio.sleep(poll)


async def wait_transferred(qmp: QMPClient, at_least: int, poll: float = 0.02) -> dict:
    """query-migrate once an active migration has sent ``at_least`` bytes (it must still be
    active then: one that ends first is an AssertionError)."""
    info = await wait_status(qmp, done=("active",))
    while info["status"] == "active" and info["ram"]["transferred"] < at_least:
        await asyncio.sleep(poll)
        info = await qmp.execute("query-migrate")
    assert info["status"] == "active", info
    return info


async def until_source_exits(qmp: QMPClient, seen: list | None = None, poll: float = 0.05,
                             on_info=None) -> None:
    """Poll the source's query-migrate until it closes the connection (it exits after a
    completed migration). A failed or cancelled migration is an AssertionError.
    ``on_info`` is called with each reply."""
    from qemu.qmp import ExecuteError

    while True:
        try:
            info = await qmp.execute("query-migrate")
        except ExecuteError:
            raise
        except Exception:  # EOF, reset, disconnected: the source went away
            return
        if seen is not None:
            seen.append(info)
        assert info["status"] in ("setup", "active", "completed"), info
        if on_info is not None:
            on_info(info)
        await asyncio.sleep(poll)


async def wait_exit(vmm: Vmm, timeout: float = 60.0) -> int:
    return await asyncio.to_thread(vmm.wait, timeout)


class Toucher(threading.Thread):
    """Makes the fake guest write pages (x-guest-touch, seeds first_seed, first_seed+1, ...)
    over its own QMP connection until stopped or refused. ``applied`` lists (pages, seed) of
    every touch the VMM confirmed, in order; ``unknown`` is a touch whose reply was lost (the
    VMM went away), which may or may not have landed."""

    def __init__(self, vmm: Vmm, pages: int, *, first_seed: int = 1000, interval: float = 0.0):
        super().__init__(name=f"toucher-{vmm.name}", daemon=True)
        self.vmm, self.pages, self.seed, self.interval = vmm, pages, first_seed, interval
        self.applied: list[tuple[int, int]] = []
        self.refused: str | None = None
        self.unknown: tuple[int, int] | None = None
        self._stop_flag = threading.Event()
        self._client = vmm.raw()

    def run(self) -> None:
        c = self._client
        while not self._stop_flag.is_set():
            touch = (self.pages, self.seed)
            try:
                reply = c.cmd("x-guest-touch", {"pages": touch[0], "seed": touch[1]})[-1]
            except OSError:
                self.unknown = touch
                return
            if "error" in reply:
                self.refused = reply["error"]["desc"]
                return
            self.applied.append(touch)
            self.seed += 1
            if self.interval:
                self._stop_flag.wait(self.interval)

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(30)
        with contextlib.suppress(OSError):
            self._client.close()


async def still_writing(toucher: Toucher, touches: int = 3, poll: float = 0.02) -> None:
    """Wait for ``touches`` more confirmed touches: the guest runs and writes (a toucher that
    stops meanwhile is an AssertionError)."""
    n = len(toucher.applied)
    while len(toucher.applied) < n + touches:
        assert toucher.is_alive(), toucher.refused
        await asyncio.sleep(poll)


def replay_digest(workdir: str, args: list[str], touches: list[tuple[int, int]],
                  name: str = "reference") -> str:
    """The memory digest a fresh VM with ``args`` has after the same touches in the same
    order: what the source's memory was when it paused, computed without the source."""
    ref = Vmm(workdir, name, args)
    try:
        c = ref.raw()
        for pages, seed in touches:
            c.execute("x-guest-touch", {"pages": pages, "seed": seed})
        c.execute("stop")
        return c.execute("x-query-memory-digest")["sha256"]
    finally:
        ref.kill()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
