"""QMP event fan-out: format, timestamps, thread-safety and order."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from dataclasses import dataclass

from adapters.qmp.events import QmpEventBroadcaster
from domain.events import DeviceDeleted, DomainEvent, ShutdownEvent, Stopped


class Client:
    def __init__(self):
        self.lines: list[bytes] = []

    def send(self, line: bytes) -> None:
        self.lines.append(line)

    def events(self) -> list[dict]:
        assert all(line.endswith(b"\r\n") for line in self.lines)
        return [json.loads(line) for line in self.lines]


@dataclass(frozen=True)
class Numbered(DomainEvent):
    n: int = 0
    name = "X-NUMBERED"

    def data(self):
        return {"n": self.n}


def test_format_and_timestamp_taken_at_emit():
    async def main():
        b = QmpEventBroadcaster(clock_ns=lambda: 1583908726_162739_999)
        b.bind(asyncio.get_running_loop())
        c = Client()
        b.attach(c)
        b.emit(Stopped())
        b.emit(ShutdownEvent())
        return c

    c = asyncio.run(main())
    assert c.lines[0] == b'{"event":"STOP","data":{},"timestamp":{"seconds":1583908726,"microseconds":162739}}\r\n'
    assert c.events()[1]["data"] == {"guest": False, "reason": "host-qmp-quit"}


def test_from_the_loop_thread_the_event_is_written_at_once():
    async def main():
        b = QmpEventBroadcaster(asyncio.get_running_loop())
        c = Client()
        b.attach(c)
        b.emit(DeviceDeleted(device="drive-0"))
        return list(c.lines)  # before the loop had any chance to run callbacks

    (line,) = asyncio.run(main())
    assert json.loads(line)["data"] == {"device": "drive-0", "path": "drive-0"}


def test_every_client_gets_every_event_and_detached_ones_none():
    async def main():
        b = QmpEventBroadcaster(asyncio.get_running_loop())
        c1, c2, c3 = Client(), Client(), Client()
        for c in (c1, c2, c3):
            b.attach(c)
        b.detach(c3)
        b.detach(c3)  # twice is harmless
        for n in range(5):
            b.emit(Numbered(n))
        return c1, c2, c3, b.clients

    c1, c2, c3, clients = asyncio.run(main())
    assert [e["data"]["n"] for e in c1.events()] == list(range(5))
    assert c1.lines == c2.lines and c3.lines == []
    assert clients == (c1, c2)


def test_events_from_other_threads_arrive_in_order_per_thread_and_after_earlier_ones():
    async def main():
        loop = asyncio.get_running_loop()
        ticks = itertools.count(1_000_000_000_000)  # a clock that never steps back
        b = QmpEventBroadcaster(loop, clock_ns=lambda: next(ticks) * 1000)
        c = Client()
        b.attach(c)

        def worker(base):
            for n in range(500):
                b.emit(Numbered(base + n))

        threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(3)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            await asyncio.sleep(0.001)
        b.emit(Numbered(-1))  # loop thread, after every other emit returned: last
        await asyncio.sleep(0)
        return c

    c = asyncio.run(main())
    ns = [e["data"]["n"] for e in c.events()]
    assert len(ns) == 1501 and ns[-1] == -1
    for k in range(3):
        mine = [n for n in ns if k * 1000 <= n < k * 1000 + 1000]
        assert mine == list(range(k * 1000, k * 1000 + 500))
    stamps = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"]) for e in c.events()]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # stamped and queued under one lock


def test_without_clients_or_loop_events_are_dropped_quietly():
    b = QmpEventBroadcaster()
    b.emit(Stopped())  # no loop bound yet: no client can exist

    async def main():
        b.bind(asyncio.get_running_loop())
        b.emit(Stopped())
        c = Client()
        b.attach(c)
        return c

    assert asyncio.run(main()).lines == []  # not replayed to a later client


def test_emit_after_the_loop_closed_does_not_raise():
    loop = asyncio.new_event_loop()
    b = QmpEventBroadcaster(loop)
    b.attach(Client())
    loop.close()
    t = threading.Thread(target=b.emit, args=(Stopped(),))
    t.start()
    t.join()


def test_bind_to_another_loop_is_refused():
    b = QmpEventBroadcaster()
    l1, l2 = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        b.bind(l1)
        b.bind(l1)
        try:
            b.bind(l2)
        except RuntimeError:
            pass
        else:
            raise AssertionError("bound to a second loop")
    finally:
        l1.close()
        l2.close()


def test_event_with_non_json_data_is_dropped_and_logged(caplog):
    @dataclass(frozen=True)
    class Bad(DomainEvent):
        name = "BAD"

        def data(self):
            return {"x": object()}

    async def main():
        b = QmpEventBroadcaster(asyncio.get_running_loop())
        c = Client()
        b.attach(c)
        b.emit(Bad())
        b.emit(Stopped())
        return c

    c = asyncio.run(main())
    assert [e["event"] for e in c.events()] == ["STOP"]
    assert "BAD" in caplog.text
