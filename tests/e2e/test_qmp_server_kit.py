"""Shared pieces of the QMP server tests: a stand-in VmApi that records its calls and checks
their types, a server running in the test's loop or in a thread, and raw socket clients.
(No tests here; the name keeps it next to the tests that import it.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import socket
import tempfile
import threading
from typing import Any, AsyncIterator, Iterator

import pytest

from adapters.qmp.commands import MIGRATE_FLAGS, standard_table
from adapters.qmp.events import QmpEventBroadcaster
from adapters.qmp.server import QmpServer
from application.api import AfterReply
from domain import errors
from domain.events import DeviceDeleted, ShutdownEvent, Stopped, Resumed

TIMEOUT = 20.0  # a hang fails the test instead of stalling the run; never a duration check


@pytest.fixture
def sock_path(tmp_path):
    """A socket path in tmp_path, or in a short temporary directory when tmp_path is too long
    for sun_path (108 bytes)."""
    path = tmp_path / "qmp.sock"
    if len(os.fsencode(path)) < 100:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="qmp") as short:
        yield pathlib.Path(short) / "qmp.sock"


def _is(v: Any, *types: type) -> bool:
    return type(v) in types


def _opt(v: Any, *types: type) -> bool:
    return v is None or type(v) in types


class FakeApi:
    """Implements VmApi. Records every call; ``violations`` lists calls whose arguments do not
    have the types VmApi promises (the schema must make that impossible)."""

    def __init__(self, events: QmpEventBroadcaster | None = None):
        self.events = events
        self.calls: list[tuple[str, dict]] = []
        self.violations: list[tuple[str, dict]] = []
        self.running = True
        self.fail: dict[str, BaseException] = {}

    def _record(self, name: str, ok: bool, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))
        if not ok:
            self.violations.append((name, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def _emit(self, event) -> None:
        if self.events is not None:
            self.events.emit(event)

    # queries
    def query_status(self) -> dict:
        self._record("query_status", True)
        return {"running": self.running, "singlestep": False, "status": "running" if self.running else "paused"}

    def query_cpus(self) -> list[dict]:
        self._record("query_cpus", True)
        return [{"CPU": 0, "current": True, "halted": False, "qom_path": "/machine/unattached/device[0]",
                 "thread_id": threading.get_native_id(), "props": {"core-id": 0, "socket-id": 0, "thread-id": 0},
                 "arch": "x86"}]

    def query_hotpluggable_cpus(self) -> list[dict]:
        self._record("query_hotpluggable_cpus", True)
        return []

    def query_balloon(self) -> dict:
        self._record("query_balloon", True)
        return {"actual": 1 << 30}

    def query_migrate(self) -> dict:
        self._record("query_migrate", True)
        return {"status": "none"}

    # lifecycle
    def stop(self) -> dict:
        self._record("stop", True)
        self.running = False
        self._emit(Stopped())
        return {}

    def cont(self) -> dict:
        self._record("cont", True)
        self.running = True
        self._emit(Resumed())
        return {}

    def quit(self) -> AfterReply:
        self._record("quit", True)
        return AfterReply({}, lambda: self._emit(ShutdownEvent()))

    # hotplug
    def blockdev_add(self, node_name, file, read_only, cache, driver) -> dict:
        ok = (_is(node_name, str) and _is(file, dict) and _is(file.get("driver"), str)
              and _is(file.get("filename"), str) and _opt(file.get("aio"), str)
              and set(file) <= {"driver", "filename", "aio"} and _opt(read_only, bool) and _opt(driver, str)
              and _opt(cache, dict) and (cache is None or (set(cache) <= {"direct", "no-flush"}
                                                         and all(_is(v, bool) for v in cache.values()))))
        self._record("blockdev_add", ok, node_name=node_name, file=file, read_only=read_only, cache=cache,
                     driver=driver)
        return {}

    def blockdev_del(self, node_name) -> dict:
        self._record("blockdev_del", _is(node_name, str), node_name=node_name)
        return {}

    def netdev_add(self, id, ifname, type, fd, vhost, queues) -> dict:
        ok = (_is(id, str) and _opt(ifname, str) and _opt(type, str) and _opt(fd, str) and _opt(vhost, bool)
              and _opt(queues, int))
        self._record("netdev_add", ok, id=id, ifname=ifname, type=type, fd=fd, vhost=vhost, queues=queues)
        return {}

    def netdev_del(self, id) -> dict:
        self._record("netdev_del", _is(id, str), id=id)
        return {}

    def device_add(self, args) -> dict:
        ok = _is(args, dict) and _is(args.get("driver"), str) and _is(args.get("id"), str)
        self._record("device_add", ok, args=args)
        return {}

    def device_del(self, id) -> AfterReply:
        self._record("device_del", _is(id, str), id=id)
        if id == "missing":
            raise errors.DeviceNotFoundError(f"Device '{id}' not found")
        # As on a microvm in the manual: DEVICE_DELETED before the return.
        self._emit(DeviceDeleted(device=id))
        return AfterReply({})

    def balloon(self, value) -> dict:
        self._record("balloon", _is(value, int), value=value)
        return {}

    def migrate(self, uri, extra) -> dict:
        ok = _is(uri, str) and _is(extra, dict) and all(k in MIGRATE_FLAGS and _is(v, bool) for k, v in extra.items())
        self._record("migrate", ok, uri=uri, extra=extra)
        return {}

    def migrate_cancel(self) -> dict:
        self._record("migrate_cancel", True)
        return {}


@contextlib.asynccontextmanager
async def running_server(path, api: FakeApi | None = None, **kw: Any) -> AsyncIterator[QmpServer]:
    """A server in the current loop; ``server.api`` is the FakeApi wired to its events."""
    events = QmpEventBroadcaster()
    api = api or FakeApi()
    api.events = events
    server = QmpServer(path, standard_table(), api, events=events, **kw)
    server.api = api  # type: ignore[attr-defined]
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class RawClient:
    """A QMP client that sends bytes and reads lines, nothing more."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path) -> tuple[RawClient, bytes]:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=8 << 20)
        client = cls(reader, writer)
        return client, await client.raw_line()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def raw_line(self) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
        assert line.endswith(b"\r\n"), line
        return line

    async def line(self) -> dict:
        return json.loads(await self.raw_line())

    async def execute(self, name: str, arguments: dict | None = None, **extra: Any) -> dict:
        msg: dict[str, Any] = {"execute": name, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        await self.send(json.dumps(msg).encode())
        return await self.line()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class ThreadedServer:
    """A server in its own loop thread, for tests that drive it with blocking sockets."""

    def __init__(self, path):
        self.loop = asyncio.new_event_loop()
        self.events = QmpEventBroadcaster(self.loop)
        self.api = FakeApi(self.events)
        self.server = QmpServer(path, standard_table(), self.api, loop=self.loop, events=self.events)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


class BlockingClient:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.greeting = json.loads(self.readline())

    def readline(self) -> bytes:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def lines_until_eof(self) -> Iterator[bytes]:
        while line := self.file.readline():
            assert line.endswith(b"\r\n"), line
            yield line

    def close(self) -> None:
        self.file.close()
        self.sock.close()
