"""QEMU's own Python QMP client (qemu.qmp) against our server."""

from __future__ import annotations

import asyncio

import pytest
from qemu.qmp import ExecuteError, QMPClient

from .test_qmp_server_kit import TIMEOUT, running_server, sock_path  # noqa: F401


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 3))


def test_qmpclient_negotiates_executes_and_receives_events(sock_path):
    async def main():
        async with running_server(sock_path) as server:
            qmp = QMPClient("pystrato-test")
            await qmp.connect(str(sock_path))
            greeting = qmp.greeting
            status = await qmp.execute("query-status")
            version = await qmp.execute("query-version")
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("balloon", {"value": "lots"})
            error = info.value.error.error.desc
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("no-such-command")
            not_found = info.value.error_class
            assert await qmp.execute("stop") == {}
            stop = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
            paused = await qmp.execute("query-status")
            assert await qmp.execute("device_add", {"driver": "virtio-blk-mmio", "id": "drive-0", "addr": "0x1"}) == {}
            assert await qmp.execute("quit") == {}
            shutdown = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
            await qmp.disconnect()
            return greeting, status, version, error, not_found, stop, paused, shutdown, server.api

    greeting, status, version, error, not_found, stop, paused, shutdown, api = run(main())
    assert greeting.QMP.capabilities == []
    assert status == {"running": True, "singlestep": False, "status": "running"}
    assert version["qemu"] == {"micro": 1, "minor": 0, "major": 5}
    assert error == "Invalid parameter type for 'value', expected: integer"
    assert not_found == "CommandNotFound"
    assert stop["event"] == "STOP"
    assert paused["status"] == "paused"
    assert shutdown["event"] == "SHUTDOWN" and shutdown["data"]["reason"] == "host-qmp-quit"
    assert ("device_add", {"args": {"driver": "virtio-blk-mmio", "id": "drive-0", "addr": "0x1"}}) in api.calls
    assert api.violations == []


def test_two_qmpclients_see_the_same_events(sock_path):
    async def main():
        async with running_server(sock_path):
            a, b = QMPClient("a"), QMPClient("b")
            await a.connect(str(sock_path))
            await b.connect(str(sock_path))
            await a.execute("stop")
            await b.execute("cont")
            events = []
            for c in (a, b):
                events.append([(await asyncio.wait_for(c.events.get(), TIMEOUT))["event"] for _ in range(2)])
            await a.disconnect()
            await b.disconnect()
            return events

    assert run(main()) == [["STOP", "RESUME"], ["STOP", "RESUME"]]
