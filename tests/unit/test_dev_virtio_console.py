"""virtio-console driven through virtio-mmio by the mock driver, with a scripted chardev."""

import struct

import pytest

from domain.devices.virtio import console as c
from domain.devices.virtio import mmio as r
from domain.devices.virtio.console import VirtioConsole
from domain.devices.virtio.device import (
    COMMON_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
)
from domain.devices.virtio.mmio import VirtioMmioTransport
from domain.devices.virtio.mock import MmioDriver, MockQueue
from domain.memory import GuestMemory

RAM = 0x80000
RXBUF = 0x20000
TXBUF = 0x40000
QSIZE = 16


class Chardev:
    """CharBackend double that behaves as the contract says: input the guest does not take is
    kept and offered again only after input_ready()."""

    def __init__(self, fail_writes=False):
        self.written = []
        self.receive = None
        self.pending = b""
        self.ready_calls = 0
        self.fail_writes = fail_writes
        self.view_types = set()

    def start(self, receive):
        self.receive = receive

    def input_ready(self):
        self.ready_calls += 1
        self.offer(b"")

    def feed(self, data):
        assert not self.pending, "a real chardev does not read while input is held back"
        self.offer(data)

    def offer(self, data):
        self.pending += data
        if self.pending:
            self.pending = self.pending[self.receive(self.pending):]

    def write(self, data):
        self.view_types.add(type(data))
        if self.fail_writes:
            raise OSError(32, "Broken pipe")
        self.written.append(bytes(data))

    def close(self):
        pass

    @property
    def output(self):
        return b"".join(self.written)


class Rig:
    def __init__(self, backend=True, features=None, start=True):
        self.mem = GuestMemory([(0, bytearray(RAM))])
        self.chardev = Chardev() if backend is True else backend
        self.dev = VirtioConsole(self.mem, self.chardev, queue_size=QSIZE)
        self.irqs = 0
        self.t = VirtioMmioTransport(self.dev, self.irq)
        self.drv = MmioDriver(self.t)
        self.rxq = MockQueue(self.mem, QSIZE, 0x1000)
        self.txq = MockQueue(self.mem, QSIZE, 0x3000)
        if start:
            assert self.drv.start([self.rxq, self.txq], features) & r.DRIVER_OK

    def irq(self):
        self.irqs += 1

    def post_rx(self, sizes, notify=True):
        heads = []
        for size in sizes:  # one buffer per chain, at RXBUF + head * 4 KiB
            heads.append(self.rxq.add_chain([(RXBUF + self.rxq.next_desc * 0x1000, size, True)]))
        if notify:
            self.drv.notify(c.RX_QUEUE)
        return heads

    def rx_data(self):
        """Bytes the guest received, in used-ring order."""
        out = b""
        for head, length in self.rxq.take_used():
            out += self.mem.read(RXBUF + head * 0x1000, length)
        return out

    def transmit(self, *parts):
        """One transmit chain of readable buffers holding ``parts``."""
        bufs, addr = [], TXBUF
        for p in parts:
            self.mem.write(addr, p)
            bufs.append((addr, len(p), False))
            addr += 0x1000
        head = self.txq.add_chain(bufs)
        self.drv.notify(c.TX_QUEUE)
        return head


def test_identity_features_and_config():
    rig = Rig()
    assert rig.drv.read32(r.DEVICE_ID) == 3
    # No SIZE, MULTIPORT or EMERG_WRITE: only the transport-level features.
    assert rig.drv.device_features() == COMMON_FEATURES
    assert len(rig.dev.queues) == 2
    cols, rows, max_ports, emerg = struct.unpack("<HHII", rig.drv.read_config(0, 12))
    assert (cols, rows, max_ports, emerg) == (0, 0, 1, 0)


def test_transmit_reaches_the_chardev_and_completes_at_once():
    rig = Rig()
    head = rig.transmit(b"hello, ", b"world\n")
    assert rig.chardev.output == b"hello, world\n"
    assert rig.txq.take_used() == [(head, 0)]  # the device wrote nothing into the chain
    assert rig.irqs == 1 and rig.drv.ack_interrupt() & r.INT_USED_RING
    assert rig.dev.stats["tx_bytes"] == 13
    # Zero copy: the chardev is handed views of guest memory, valid during the call only.
    assert rig.chardev.view_types == {memoryview}


def test_transmit_several_chains_in_one_notify():
    rig = Rig()
    for i in range(5):
        rig.mem.write(TXBUF + i * 0x100, b"%d" % i)
        rig.txq.add_chain([(TXBUF + i * 0x100, 1, False)])
    rig.drv.notify(c.TX_QUEUE)
    assert rig.chardev.output == b"01234"
    assert len(rig.txq.take_used()) == 5


def test_transmit_through_an_indirect_table():
    rig = Rig()
    rig.mem.write(TXBUF, b"ab")
    rig.mem.write(TXBUF + 0x100, b"cd")
    head = rig.txq.add_indirect([(TXBUF, 2, False), (TXBUF + 0x100, 2, False)], 0x6000)
    rig.drv.notify(c.TX_QUEUE)
    assert rig.chardev.output == b"abcd"
    assert rig.txq.take_used() == [(head, 0)]


def test_transmit_ignores_device_writable_buffers():
    rig = Rig()
    rig.mem.write(TXBUF, b"out")
    head = rig.txq.add_chain([(TXBUF, 3, False), (TXBUF + 0x1000, 64, True)])
    rig.drv.notify(c.TX_QUEUE)
    assert rig.chardev.output == b"out"
    assert rig.txq.take_used() == [(head, 0)]


def test_transmit_without_chardev_or_with_a_failing_one_still_completes():
    rig = Rig(backend=None)
    head = rig.transmit(b"lost")
    assert rig.txq.take_used() == [(head, 0)]
    failing = Rig(backend=Chardev(fail_writes=True))
    head = failing.transmit(b"lost too")
    assert failing.txq.take_used() == [(head, 0)]
    assert failing.dev.stats["tx_errors"] == 1


def test_receive_fills_posted_buffers():
    rig = Rig()
    rig.post_rx([64, 64])
    rig.chardev.feed(b"ls -l\n")
    assert rig.rx_data() == b"ls -l\n"
    assert rig.irqs == 1
    assert rig.dev.stats["rx_bytes"] == 6
    assert not rig.chardev.pending


def test_receive_spreads_over_buffers_and_chains_with_several_segments():
    rig = Rig()
    h = rig.rxq.add_chain([(RXBUF, 3, True), (RXBUF + 0x800, 3, True)])
    h2 = rig.rxq.add_chain([(RXBUF + 0x1000, 16, True)])
    rig.drv.notify(c.RX_QUEUE)
    rig.chardev.feed(b"0123456789")
    assert rig.rxq.take_used() == [(h, 6), (h2, 4)]
    assert rig.mem.read(RXBUF, 3) + rig.mem.read(RXBUF + 0x800, 3) == b"012345"
    assert rig.mem.read(RXBUF + 0x1000, 4) == b"6789"


def test_back_pressure_keeps_input_until_the_guest_posts_buffers():
    rig = Rig()
    rig.post_rx([4])
    rig.chardev.feed(b"abcdefghij")
    assert rig.rx_data() == b"abcd"
    assert rig.chardev.pending == b"efghij" and rig.dev.rx_stalled
    assert rig.chardev.ready_calls == 0
    rig.post_rx([4, 4])  # the guest refills: the kick wakes the chardev, which offers again
    assert rig.chardev.ready_calls == 1
    assert rig.rx_data() == b"efghij"
    assert not rig.chardev.pending and not rig.dev.rx_stalled


def test_stalled_device_asks_for_the_kick_with_event_idx():
    rig = Rig(features=VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX)
    rig.chardev.feed(b"xy")
    assert rig.dev.rx_stalled
    # avail_event = next_avail: the driver must notify on its next buffer.
    assert rig.rxq.avail_event() == 0
    rig.post_rx([8])
    assert rig.chardev.ready_calls == 1
    assert rig.rx_data() == b"xy"


def test_input_before_the_driver_is_ready_waits_for_it():
    rig = Rig(start=False)
    rig.chardev.feed(b"early")
    assert rig.chardev.pending == b"early"
    assert rig.drv.start([rig.rxq, rig.txq]) & r.DRIVER_OK
    rig.post_rx([16])
    assert rig.rx_data() == b"early"


def test_kicks_without_a_stall_do_not_wake_the_chardev():
    rig = Rig()
    rig.post_rx([16])
    rig.post_rx([16])
    assert rig.chardev.ready_calls == 0


def test_readable_only_receive_chain_is_returned_empty():
    rig = Rig()
    h = rig.rxq.add_chain([(RXBUF, 16, False)])
    h2 = rig.rxq.add_chain([(RXBUF + 0x1000, 16, True)])
    rig.drv.notify(c.RX_QUEUE)
    rig.chardev.feed(b"data")
    assert rig.rxq.take_used() == [(h, 0), (h2, 4)]
    assert rig.mem.read(RXBUF + 0x1000, 4) == b"data"


def test_hostile_receive_chain_needs_reset_and_input_is_held():
    rig = Rig()
    rig.rxq.add_chain([(RAM - 8, 64, True)])  # runs past the end of guest RAM
    rig.drv.notify(c.RX_QUEUE)
    rig.chardev.feed(b"abc")
    assert rig.drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET
    assert rig.chardev.pending == b"abc"
    # The driver resets and starts over; the held input arrives then.
    rig.rxq = MockQueue(rig.mem, QSIZE, 0x1000)
    rig.txq = MockQueue(rig.mem, QSIZE, 0x3000)
    assert rig.drv.start([rig.rxq, rig.txq]) & r.DRIVER_OK
    rig.post_rx([16])
    assert rig.rx_data() == b"abc"


def test_hostile_transmit_chain_needs_reset():
    rig = Rig()
    rig.txq.write_desc(0, TXBUF, 4, 1, 0)  # NEXT pointing at itself: a loop
    rig.txq.publish(0)
    rig.drv.notify(c.TX_QUEUE)
    assert rig.drv.read32(r.STATUS) & r.DEVICE_NEEDS_RESET
    assert rig.chardev.output == b""


def test_receive_after_reset_is_held():
    rig = Rig()
    rig.drv.write32(r.STATUS, 0)
    assert rig.dev.receive(b"abc") == 0
    assert rig.dev.rx_stalled


def test_port_without_chardev_takes_a_chardev_later():
    mem = GuestMemory([(0, bytearray(RAM))])
    dev = VirtioConsole(mem)
    assert dev.backend is None
    chardev = Chardev()
    dev.connect(chardev)
    assert dev.backend is chardev and chardev.receive == dev.receive


@pytest.mark.parametrize("stalled", [False, True])
def test_snapshot_round_trip(stalled):
    rig = Rig()
    rig.post_rx([4])
    if stalled:
        rig.chardev.feed(b"abcdef")
        rig.rx_data()
    state = rig.dev.save_state()
    assert state["device"] == {"rx_stalled": stalled}
    dest_mem = GuestMemory([(0, bytearray(rig.mem.read(0, RAM)))])
    chardev = Chardev()
    dest = VirtioConsole(dest_mem, chardev, queue_size=QSIZE)
    dest.restore_state(state)
    assert dest.activated and dest.rx_stalled == stalled
    # A restored device with buffers posted takes input at once.
    if not stalled:
        chardev.feed(b"zz")
        assert dest_mem.read(RXBUF, 2) == b"zz"


def test_restore_refuses_bad_device_state():
    from domain.errors import SnapshotFormatError

    rig = Rig()
    state = rig.dev.save_state()
    state["device"] = {"rx_stalled": "yes"}
    with pytest.raises(SnapshotFormatError):
        VirtioConsole(rig.mem, Chardev(), queue_size=QSIZE).restore_state(state)
