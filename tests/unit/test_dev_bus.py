import threading

import pytest

from domain.devices.bus import CACHE_LIMIT, Bus, BusConflictError


class Recorder:
    def __init__(self, fill=0xAB):
        self.fill = fill
        self.reads = []
        self.writes = []

    def read(self, offset, data):
        self.reads.append((offset, len(data)))
        data[:] = bytes([self.fill]) * len(data)

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


def test_dispatch_with_offsets():
    bus = Bus("pio")
    a, b = Recorder(1), Recorder(2)
    bus.insert(a, 0x3F8, 8)
    bus.insert(b, 0x60, 5)
    buf = bytearray(1)
    assert bus.read(0x3FD, memoryview(buf)) and buf == b"\x01"
    assert bus.write(0x64, memoryview(b"\xfe"))
    assert a.reads == [(5, 1)] and b.writes == [(4, b"\xfe")]


def test_unmapped_and_straddling_accesses_return_false():
    bus = Bus()
    bus.insert(Recorder(), 0x1000, 0x100)
    for addr, n in ((0xFFF, 1), (0x1100, 1), (0x10FE, 4), (0, 4)):
        buf = bytearray(n)
        assert not bus.read(addr, memoryview(buf))
        assert not bus.write(addr, memoryview(buf))
    assert bus.read(0x10FC, memoryview(bytearray(4)))


def test_overlaps_are_refused():
    bus = Bus()
    bus.insert(Recorder(), 0x1000, 0x100)
    for base, n in ((0x1000, 1), (0xF00, 0x101), (0x10FF, 2), (0x800, 0x1000)):
        with pytest.raises(BusConflictError):
            bus.insert(Recorder(), base, n)
    bus.insert(Recorder(), 0x1100, 0x100)  # adjacent is fine
    bus.insert(Recorder(), 0xF00, 0x100)
    with pytest.raises(BusConflictError):
        bus.insert(Recorder(), 0x2000, 0)


def test_remove():
    bus = Bus()
    dev = Recorder()
    bus.insert(dev, 0x1000, 0x10)
    with pytest.raises(BusConflictError):
        bus.remove(0x1001)
    assert bus.remove(0x1000) is dev
    assert not bus.read(0x1000, memoryview(bytearray(1)))
    bus.insert(Recorder(), 0x1000, 0x10)


def test_device_lock_is_used_when_the_device_has_one():
    class Locked(Recorder):
        def __init__(self):
            super().__init__()
            self.lock = threading.RLock()

        def read(self, offset, data):
            assert self.lock._is_owned()
            super().read(offset, data)

    bus = Bus()
    dev = Locked()
    bus.insert(dev, 0, 4)
    assert bus.read(0, memoryview(bytearray(4)))


def test_concurrent_insert_and_dispatch():
    bus = Bus()
    stable = Recorder()
    bus.insert(stable, 0, 0x10)
    stop = threading.Event()
    errors = []

    def churn():
        i = 0
        while not stop.is_set():
            base = 0x1000 + (i % 50) * 0x10
            bus.insert(Recorder(), base, 0x10)
            bus.remove(base)
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(20000):
            if not bus.read(4, memoryview(bytearray(1))):
                errors.append("lost the stable device")
    finally:
        stop.set()
        t.join()
    assert not errors


def test_cached_answers_follow_insert_and_remove():
    """The per-address cache must not keep a miss after an insert or a hit after a remove."""
    bus = Bus()
    one = memoryview(bytearray(1))
    assert not bus.write(0x1004, one)  # a miss, now cached
    dev = Recorder()
    bus.insert(dev, 0x1000, 0x10)
    assert bus.write(0x1004, one) and dev.writes == [(4, b"\x00")]
    assert bus.remove(0x1000) is dev
    assert not bus.write(0x1004, one) and not bus.read(0x1004, one)
    other = Recorder()
    bus.insert(other, 0x1004, 4)  # a new device at the old address: offsets from its own base
    assert bus.write(0x1004, one) and other.writes == [(0, b"\x00")]


def test_cached_hit_still_refuses_an_access_past_the_range_end():
    bus = Bus()
    bus.insert(Recorder(), 0x1000, 0x10)
    assert bus.read(0x100C, memoryview(bytearray(4)))  # cached with 4 bytes of room
    assert not bus.read(0x100C, memoryview(bytearray(8)))
    assert not bus.write(0x100C, memoryview(bytearray(8)))


def test_a_guest_probing_every_address_cannot_grow_the_cache_without_bound():
    bus = Bus()
    dev = Recorder()
    bus.insert(dev, 0, 4)
    one = memoryview(bytearray(1))
    for addr in range(0x10000, 0x10000 + 3 * CACHE_LIMIT):
        assert not bus.read(addr, one)
    assert len(bus._table[2]) <= CACHE_LIMIT
    assert bus.read(1, one) and dev.reads[-1] == (1, 1)
